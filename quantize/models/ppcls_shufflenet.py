"""PaddleClas ShuffleNetV2 (v2.4.0 ``ppcls/arch/backbone/model_zoo/shufflenet_v2.py``) rebuilt in PyTorch, so that
PaddleClas's ImageNet ``.pdparams`` weights load with strict key and shape matching.

Architecture (same for every scale, only the widths change)::

    stem      3x3/2 conv + BN + act (24 channels)  ->  3x3/2 max pool (padding 1)
    stage2-4  4 / 8 / 4 units; the first unit of a stage halves the resolution (both branches, concatenated),
              the others split the channels in halves, transform the second half and concatenate it back
              after the untouched first half; every unit ends with a channel shuffle of 2 groups
    head      1x1 conv + BN + act -> global average pool -> fully connected layer (no dropout)

A branch is 1x1 conv+BN+act -> 3x3 depthwise conv+BN (no activation) -> 1x1 conv+BN+act; the downsampling unit's
other branch is 3x3/2 depthwise conv+BN -> 1x1 conv+BN+act. The activation is ReLU, or swish (x * sigmoid(x),
``nn.SiLU``) for ``ShuffleNetV2_swish`` (x1.0 widths). BatchNorm uses Paddle's defaults: eps 1e-5, momentum 0.9
(0.1 in PyTorch's convention).

The x0.25 and x0.33 widths are PaddleClas's own (not the paper's): 24-24-48-96 and 24-32-64-128 with a 512-channel
head conv.

x2.0's stage-2 width: PaddleClas's code said 224 from its first commit (2020, when the ImageNet weights were trained)
until PR #1926 (2022-05-14, just before v2.4.0) changed it to the paper's 244 "to match torchvision". The published
``ShuffleNetV2_x2_0_pretrained.pdparams`` predates that change, Paddle's own ``paddle.vision.models.shufflenet_v2_x2_0``
still loads that same file (md5 4ab1f622...) with 224, and PaddleClas's table (7.40 M params, 571.70 M FLOPs) is
exactly what ``paddle.flops`` gives for 224 (244 gives 7.43 M / 590.84 M). So ``ppcls_shufflenet_v2_x2_0`` -- the zoo
entry for those weights -- uses 224, and ``ppcls_shufflenet_v2_x2_0_w244`` is the v2.4.0 code's 244 (for weights
trained with PaddleClas >= v2.4.0). A checkpoint of the other width is refused with a hint naming the right arch.

Key layouts. ``paddle.save(layer.state_dict())`` -- how PaddleClas's ``*_pretrained.pdparams`` are written and what
its loader (``Layer.set_dict``, structured names) reads -- keys the arrays by *structured* name:
``_conv1._conv.weight``, ``2_1._conv_dw_1._batch_norm._mean``, ``_fc.weight``, ... and keeps the *parameter*
names given by ``ParamAttr`` (``stage1_conv_weights``, ``stage_2_1_conv4_bn_mean``, ``fc6_weights``, ...) only in
its ``StructuredToParameterName@@`` table. :func:`convert_ppcls_state_dict` accepts either naming (parameter names
are also what Paddle inference/static-graph exports use), and PyTorch's own layout unchanged. Paddle stores a
``Linear`` weight as [in, out]; it is transposed to PyTorch's [out, in].
"""

from __future__ import annotations

import torch
from torch import nn

from quantize.core.errors import ModelError
from quantize.models.spec import register
from quantize.models.checkpoint import describe_key_mismatch

__all__ = [
    "PPCLS_SHUFFLENETS",
    "PPClsShuffleNetV2",
    "PUBLISHED_X2_0_CHANNELS",
    "STAGE_CHANNELS",
    "STAGE_REPEATS",
    "convert_ppcls_state_dict",
    "paddle_key_map",
]

# scale -> output channels of (stem, stage2, stage3, stage4, head conv), as in PaddleClas v2.4.0.
STAGE_CHANNELS: dict[float, tuple[int, int, int, int, int]] = {
    0.25: (24, 24, 48, 96, 512),
    0.33: (24, 32, 64, 128, 512),
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
# x2.0 as the published weights were trained (PaddleClas before v2.4.0, paddle.vision): see the module docstring.
PUBLISHED_X2_0_CHANNELS = (24, 224, 488, 976, 2048)
STAGE_REPEATS = (4, 8, 4)  # units in stage2, stage3, stage4

# arch -> (PaddleClas builder, channels, activation, pretrained URL). The URLs are PaddleClas v2.4.0's MODEL_URLS in
# ppcls/arch/backbone/model_zoo/shufflenet_v2.py (the same links are in docs/en/algorithm_introduction/
# ImageNet_models_en.md); they are written out in full below so that they can be checked against it.
PPCLS_SHUFFLENETS: dict[str, tuple[str, tuple[int, ...], str, str | None]] = {
    "ppcls_shufflenet_v2_x0_25": (
        "ShuffleNetV2_x0_25", STAGE_CHANNELS[0.25], "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x0_25_pretrained.pdparams"),
    "ppcls_shufflenet_v2_x0_33": (
        "ShuffleNetV2_x0_33", STAGE_CHANNELS[0.33], "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x0_33_pretrained.pdparams"),
    "ppcls_shufflenet_v2_x0_5": (
        "ShuffleNetV2_x0_5", STAGE_CHANNELS[0.5], "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x0_5_pretrained.pdparams"),
    "ppcls_shufflenet_v2_x1_0": (
        "ShuffleNetV2_x1_0", STAGE_CHANNELS[1.0], "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x1_0_pretrained.pdparams"),
    "ppcls_shufflenet_v2_x1_5": (
        "ShuffleNetV2_x1_5", STAGE_CHANNELS[1.5], "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x1_5_pretrained.pdparams"),
    "ppcls_shufflenet_v2_x2_0": (
        "ShuffleNetV2_x2_0", PUBLISHED_X2_0_CHANNELS, "relu",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_x2_0_pretrained.pdparams"),
    # The v2.4.0 code's x2.0: no published weights of this width, so only model.checkpoint / weights_url load it.
    "ppcls_shufflenet_v2_x2_0_w244": ("ShuffleNetV2_x2_0", STAGE_CHANNELS[2.0], "relu", None),
    "ppcls_shufflenet_v2_swish": (
        "ShuffleNetV2_swish", STAGE_CHANNELS[1.0], "swish",
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/ShuffleNetV2_swish_pretrained.pdparams"),
}

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # Paddle's momentum 0.9 (weight of the old running value)


def _activation(act: str | None) -> nn.Module:
    if act is None:
        return nn.Identity()
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "swish":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unsupported activation {act!r} (relu or swish)")


class ConvBNAct(nn.Module):
    """Bias-free conv (padding ``k // 2``) -> BatchNorm -> optional activation: PaddleClas's ``ConvBNLayer``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: [a0 a1 .. b0 b1 ..] -> [a0 b0 a1 b1 ..]."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """Stride-1 unit (PaddleClas ``InvertedResidual``): split channels, transform the second half, shuffle."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        half = channels // 2
        self.pw1 = ConvBNAct(half, half, 1, act=act)
        self.dw = ConvBNAct(half, half, 3, 1, groups=half)
        self.pw2 = ConvBNAct(half, half, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        transformed = self.pw2(self.dw(self.pw1(transformed)))
        return channel_shuffle(torch.cat((kept, transformed), dim=1), 2)


class ShuffleDownUnit(nn.Module):
    """Stride-2 unit (PaddleClas ``InvertedResidualDS``): two strided branches on the whole input, concatenated."""

    def __init__(self, in_channels: int, out_channels: int, act: str) -> None:
        super().__init__()
        half = out_channels // 2
        # Branch 1 (Paddle's conv4, conv5): depthwise 3x3/2 + BN, then 1x1 + BN + act.
        self.proj_dw = ConvBNAct(in_channels, in_channels, 3, 2, groups=in_channels)
        self.proj_pw = ConvBNAct(in_channels, half, 1, act=act)
        # Branch 2 (Paddle's conv1, conv2, conv3).
        self.pw1 = ConvBNAct(in_channels, half, 1, act=act)
        self.dw = ConvBNAct(half, half, 3, 2, groups=half)
        self.pw2 = ConvBNAct(half, half, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.proj_pw(self.proj_dw(x))
        right = self.pw2(self.dw(self.pw1(x)))
        return channel_shuffle(torch.cat((left, right), dim=1), 2)


class PPClsShuffleNetV2(nn.Module):
    """PaddleClas ``ShuffleNet(scale=..., act=...)`` in PyTorch (see the module docstring).

    ``channels``: output channels of (stem, stage2, stage3, stage4, head conv), e.g. ``STAGE_CHANNELS[scale]``.
    """

    def __init__(self, channels: tuple[int, ...] = STAGE_CHANNELS[1.0], act: str = "relu",
                 num_classes: int = 1000) -> None:
        super().__init__()
        if len(channels) != 5 or any(c % 2 for c in channels[1:4]):
            raise ValueError(f"channels must be (stem, stage2, stage3, stage4, head) with even stages, got {channels}")
        stem_ch, *stage_ch, head_ch = channels
        self.channels = tuple(channels)
        self.stem = ConvBNAct(3, stem_ch, 3, 2, act=act)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = stem_ch
        for index, (repeats, out_ch) in enumerate(zip(STAGE_REPEATS, stage_ch), start=2):
            units = [ShuffleDownUnit(in_ch, out_ch, act)] + [ShuffleUnit(out_ch, act) for _ in range(repeats - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*units))
            in_ch = out_ch
        self.last_conv = ConvBNAct(in_ch, head_ch, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Paddle's initialisers here: KaimingNormal (fan_in) convs, unit/zero BN, XavierUniform fc weight, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.pool(self.last_conv(x))
        return self.fc(torch.flatten(x, 1))


# --- PaddleClas key layouts --------------------------------------------------------------------------------------

# Sub-layers of a PaddleClas unit: (structured attribute, parameter-name conv number, our attribute).
_DOWN_UNIT_LAYERS = (("_conv_dw_1", 4, "proj_dw"), ("_conv_linear_1", 5, "proj_pw"), ("_conv_pw_2", 1, "pw1"),
                     ("_conv_dw_2", 2, "dw"), ("_conv_linear_2", 3, "pw2"))
_UNIT_LAYERS = (("_conv_pw", 1, "pw1"), ("_conv_dw", 2, "dw"), ("_conv_linear", 3, "pw2"))

# Per conv+BN layer: Paddle structured suffix / parameter-name suffix -> our suffix.
_STRUCTURED_SUFFIXES = {"._conv.weight": ".conv.weight", "._batch_norm.weight": ".bn.weight",
                        "._batch_norm.bias": ".bn.bias", "._batch_norm._mean": ".bn.running_mean",
                        "._batch_norm._variance": ".bn.running_var"}
_PARAMETER_SUFFIXES = {"_weights": ".conv.weight", "_bn_scale": ".bn.weight", "_bn_offset": ".bn.bias",
                       "_bn_mean": ".bn.running_mean", "_bn_variance": ".bn.running_var"}
_FC_KEYS = {"structured": {"_fc.weight": "fc.weight", "_fc.bias": "fc.bias"},
            "parameter": {"fc6_weights": "fc.weight", "fc6_offset": "fc.bias"}}


def _conv_layers() -> list[tuple[str, str, str]]:
    """(Paddle structured prefix, Paddle parameter-name prefix, our prefix) of every conv+BN layer, in order."""
    layers = [("_conv1", "stage1_conv", "stem")]
    for stage, repeats in zip((2, 3, 4), STAGE_REPEATS):
        for number in range(1, repeats + 1):
            unit = f"{stage}_{number}"  # PaddleClas's add_sublayer name
            for attr, conv_no, ours in _DOWN_UNIT_LAYERS if number == 1 else _UNIT_LAYERS:
                layers.append((f"{unit}.{attr}", f"stage_{unit}_conv{conv_no}", f"stage{stage}.{number - 1}.{ours}"))
    layers.append(("_last_conv", "conv5", "last_conv"))
    return layers


def paddle_key_map(naming: str = "structured") -> dict[str, str]:
    """PaddleClas key -> our key, for ``naming`` ``"structured"`` (``paddle.save(state_dict)`` files, e.g. the
    published ``*_pretrained.pdparams``) or ``"parameter"`` (ParamAttr names, e.g. ``stage_2_1_conv1_weights``).
    The same for every scale: only the tensor shapes differ."""
    if naming not in _FC_KEYS:
        raise ValueError(f"naming must be 'structured' or 'parameter', got {naming!r}")
    structured = naming == "structured"
    suffixes = _STRUCTURED_SUFFIXES if structured else _PARAMETER_SUFFIXES
    mapping = {}
    for structured_prefix, parameter_prefix, ours in _conv_layers():
        prefix = structured_prefix if structured else parameter_prefix
        for paddle_suffix, our_suffix in suffixes.items():
            mapping[prefix + paddle_suffix] = ours + our_suffix
    mapping.update(_FC_KEYS[naming])
    return mapping


_KEY_MAPS = {naming: paddle_key_map(naming) for naming in _FC_KEYS}


def convert_ppcls_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PaddleClas ShuffleNetV2 weights (structured or parameter names) -> our keys; our own layout passes unchanged.

    A Paddle-named dict must hold exactly PaddleClas's keys; otherwise a one-line :class:`ModelError` names the
    missing and unexpected keys in Paddle's naming. BatchNorm scale/offset/mean/variance become
    weight/bias/running_mean/running_var, and the fc weight is transposed from [in, out] to [out, in].
    """
    hits = {naming: sum(k in mapping for k in state) for naming, mapping in _KEY_MAPS.items()}
    naming = max(hits, key=hits.__getitem__)
    if hits[naming] == 0:
        return dict(state)  # our layout (or something else entirely, which load_into reports)
    mapping = _KEY_MAPS[naming]
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        raise ModelError(f"PaddleClas ShuffleNetV2 weights ({naming} names) do not have PaddleClas's keys: "
                         + describe_key_mismatch(missing, unexpected))
    converted = {}
    for key, value in state.items():
        ours = mapping[key]
        if ours == "fc.weight" and value.ndim == 2:
            value = value.t().contiguous()
        converted[ours] = value
    return converted


def _make_builder(arch: str, channels: tuple[int, ...], act: str, paddle_name: str):
    def builder(num_classes: int = 1000) -> nn.Module:
        return PPClsShuffleNetV2(channels=channels, act=act, num_classes=num_classes)

    builder.__name__ = arch
    builder.__doc__ = f"PaddleClas {paddle_name} (channels {channels}, {act}), random init."
    return builder


_STAGE2_PROBE = "stage2.0.proj_pw.conv.weight"  # [stage2 width / 2, stem width, 1, 1]


def _make_convert(arch: str, channels: tuple[int, ...]):
    """:func:`convert_ppcls_state_dict`, plus a pointed hint when x2.0 weights of the other stage-2 width arrive."""
    twin = {"ppcls_shufflenet_v2_x2_0": "ppcls_shufflenet_v2_x2_0_w244",
            "ppcls_shufflenet_v2_x2_0_w244": "ppcls_shufflenet_v2_x2_0"}.get(arch)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        converted = convert_ppcls_state_dict(state)
        probe = converted.get(_STAGE2_PROBE)
        if twin is not None and probe is not None and probe.ndim == 4:
            width = 2 * probe.shape[0]
            twin_width = PPCLS_SHUFFLENETS[twin][1][1]
            if width != channels[1] and width == twin_width:
                raise ModelError(
                    f"these ShuffleNetV2 x2.0 weights have a stage-2 width of {width}, but {arch} is built with "
                    f"{channels[1]}; use model.arch={twin} (PaddleClas changed this width from 224 to 244 in v2.4.0)"
                )
        return converted

    convert.__name__ = f"convert_{arch}"
    return convert


for _arch, (_paddle_name, _channels, _act, _url) in PPCLS_SHUFFLENETS.items():
    register(_arch, default_weights=(lambda _u=_url: _u) if _url else None, convert=_make_convert(_arch, _channels))(
        _make_builder(_arch, _channels, _act, _paddle_name)
    )
