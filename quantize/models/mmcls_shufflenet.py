"""ShuffleNetV1 (groups=3) and ShuffleNetV2 x1.0 as OpenMMLab's mmcls v0.23.1 builds them, laid out so that the
mmcls ImageNet checkpoints load with strict key matching and no renaming.

An mmcls ``ImageClassifier`` is ``backbone -> neck (GlobalAveragePooling) -> head (LinearClsHead)``; its state
dict therefore reads ``backbone.conv1.conv.weight``, ``backbone.layers.0.0.branch2.1.bn.running_var``, ...,
``head.fc.weight``, ``head.fc.bias``. Every conv of these backbones is an mmcv ``ConvModule`` (bias-free conv,
BatchNorm named ``bn``, optional ReLU), reproduced by :class:`ConvModule` below.

The models take ImageNet-normalised RGB input (mmcls: mean 123.675/116.28/103.53, std 58.395/57.12/57.375 on
0-255 RGB, i.e. torchvision's normalisation; Resize 256 with the pillow backend, CenterCrop 224) and return logits
(mmcls applies a softmax only in ``simple_test``, which changes no ranking).

Checkpoints (mmcls model-zoo metadata, ``configs/shufflenet_v{1,2}/metafile.yml``) are whole mmcv checkpoints:
``{"meta": {...}, "state_dict": {...}}``; ``build_model`` unwraps ``state_dict``. The 8 hex digits before ``.pth``
are the sha256 prefix of the file (mmcls ``publish_model``), so torch.hub's hash check applies.
"""

from __future__ import annotations

import torch
from torch import nn

from quantize.models.spec import register

__all__ = [
    "MMCLS_WEIGHTS",
    "ConvModule",
    "MMClsImageClassifier",
    "ShuffleNetV1Backbone",
    "ShuffleNetV2Backbone",
    "ShuffleUnit",
    "InvertedResidual",
    "channel_shuffle",
    "make_divisible",
]

MMCLS_WEIGHTS = {
    "mmcls_shufflenet_v2_x1_0": "https://download.openmmlab.com/mmclassification/v0/shufflenet_v2/"
    "shufflenet_v2_batch1024_imagenet_20200812-5bf4721e.pth",
    "mmcls_shufflenet_v1_x1_0_g3": "https://download.openmmlab.com/mmclassification/v0/shufflenet_v1/"
    "shufflenet_v1_batch1024_imagenet_20200804-5d6cec73.pth",
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal channel groups: (N, g*k, H, W) -> channel order 0, k, 2k, ..., 1, k+1, ..."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def make_divisible(value: float, divisor: int, min_value: int | None = None, min_ratio: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``min_ratio`` of it (mmcls' rule)."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


class ConvModule(nn.Module):
    """mmcv ``ConvModule`` with BN: ``conv`` (no bias) -> ``bn`` -> ``activate`` (ReLU, or nothing)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, *, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate: nn.Module = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


# --- ShuffleNetV2 (mmcls/models/backbones/shufflenet_v2.py) ----------------------------------------------------

class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit. Stride 2: ``branch1`` (dw 3x3 -> 1x1) and ``branch2`` (1x1 -> dw 3x3 -> 1x1) both see the
    whole input, each producing ``out/2`` channels. Stride 1: the input is split into halves, the first half passes
    through, the second goes through ``branch2``. Either way the concatenation is channel-shuffled with 2 groups."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError(f"stride-1 unit needs in_channels == out_channels, got {in_channels} -> {out_channels}")
        self.split = in_channels // 2 + in_channels % 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvModule(in_channels, in_channels, 3, stride, 1, groups=in_channels, relu=False),
                ConvModule(in_channels, branch, 1),
            )
        self.branch2 = nn.Sequential(
            ConvModule(in_channels if stride > 1 else branch, branch, 1),
            ConvModule(branch, branch, 3, stride, 1, groups=branch, relu=False),
            ConvModule(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        else:
            out = torch.cat((x[:, : self.split], self.branch2(x[:, self.split :])), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Backbone(nn.Module):
    """``conv1`` (3x3/2, 24) -> maxpool -> ``layers[0..2]`` (4, 8, 4 units) -> ``layers[3]`` (1x1 conv, 1024/2048)."""

    STAGE_CHANNELS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024),
                      1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048)}
    STAGE_BLOCKS = (4, 8, 4)

    def __init__(self, widen_factor: float = 1.0) -> None:
        super().__init__()
        if widen_factor not in self.STAGE_CHANNELS:
            raise ValueError(f"widen_factor must be one of {sorted(self.STAGE_CHANNELS)}, got {widen_factor}")
        channels = self.STAGE_CHANNELS[widen_factor]
        in_ch = 24
        self.conv1 = ConvModule(3, in_ch, 3, 2, 1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList()
        for out_ch, blocks in zip(channels[:3], self.STAGE_BLOCKS):
            units = []
            for i in range(blocks):
                units.append(InvertedResidual(in_ch, out_ch, stride=2 if i == 0 else 1))
                in_ch = out_ch
            self.layers.append(nn.Sequential(*units))
        self.layers.append(ConvModule(in_ch, channels[3], 1))
        self.out_channels = channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for layer in self.layers:
            x = layer(x)
        return x


# --- ShuffleNetV1 (mmcls/models/backbones/shufflenet_v1.py) ----------------------------------------------------

class ShuffleUnit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 compress (to out/4, ReLU) -> dw 3x3 (BN only) -> channel shuffle -> grouped
    1x1 expand (BN only), then

    - ``add`` (stride 1): ``relu(x + out)``;
    - ``concat`` (stride 2): ``cat(avgpool3x3/2(x), relu(out))`` with ``out`` producing ``out - in`` channels.

    The first unit of the network (``first_block``) uses an ungrouped compress conv (its input has only 24
    channels), but still shuffles with ``groups``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 3, first_block: bool = True,
                 combine: str = "add") -> None:
        super().__init__()
        self.groups = groups
        self.combine = combine
        bottleneck = out_channels // 4
        if combine == "add":
            if in_channels != out_channels:
                raise ValueError(f"'add' unit needs in_channels == out_channels, got {in_channels} -> {out_channels}")
            stride = 1
        elif combine == "concat":
            stride = 2
            out_channels -= in_channels
            # count_include_pad=True (the default) as in the source: border windows average over 9 incl. zeros.
            self.avgpool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"combine must be 'add' or 'concat', got {combine!r}")
        self.g_conv_1x1_compress = ConvModule(in_channels, bottleneck, 1, groups=1 if first_block else groups)
        self.depthwise_conv3x3_bn = ConvModule(bottleneck, bottleneck, 3, stride, 1, groups=bottleneck, relu=False)
        self.g_conv_1x1_expand = ConvModule(bottleneck, out_channels, 1, groups=groups, relu=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise_conv3x3_bn(self.g_conv_1x1_compress(x))
        if self.groups > 1:
            out = channel_shuffle(out, self.groups)
        out = self.g_conv_1x1_expand(out)
        if self.combine == "concat":
            return torch.cat((self.avgpool(x), self.act(out)), dim=1)
        return self.act(x + out)


class ShuffleNetV1Backbone(nn.Module):
    """``conv1`` (3x3/2) -> maxpool -> ``layers[0..2]`` (4, 8, 4 units; the first of each stage concatenates)."""

    STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                      4: (272, 544, 1088), 8: (384, 768, 1536)}
    STAGE_BLOCKS = (4, 8, 4)

    def __init__(self, groups: int = 3, widen_factor: float = 1.0) -> None:
        super().__init__()
        if groups not in self.STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(self.STAGE_CHANNELS)}, got {groups}")
        channels = [make_divisible(c * widen_factor, 8) for c in self.STAGE_CHANNELS[groups]]
        in_ch = int(24 * widen_factor)
        self.conv1 = ConvModule(3, in_ch, 3, 2, 1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList()
        for stage, (out_ch, blocks) in enumerate(zip(channels, self.STAGE_BLOCKS)):
            units = []
            for i in range(blocks):
                units.append(ShuffleUnit(in_ch, out_ch, groups, first_block=stage == 0 and i == 0,
                                         combine="concat" if i == 0 else "add"))
                in_ch = out_ch
            self.layers.append(nn.Sequential(*units))
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for layer in self.layers:
            x = layer(x)
        return x


# --- classifier ------------------------------------------------------------------------------------------------

class GlobalAveragePooling(nn.Module):
    """mmcls ``GlobalAveragePooling`` neck: (N, C, H, W) -> (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.gap(x), 1)


class LinearClsHead(nn.Module):
    """mmcls ``LinearClsHead``: one ``fc`` layer with bias; returns logits."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MMClsImageClassifier(nn.Module):
    """mmcls ``ImageClassifier``: ``backbone`` -> ``neck`` -> ``head``, with mmcls' default initialisation."""

    def __init__(self, backbone: nn.Module, num_classes: int = 1000) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = GlobalAveragePooling()
        self.head = LinearClsHead(num_classes, backbone.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # Backbone: the stem conv N(0, 0.01), other convs N(0, 1/fan-in channels per group); BN weight 1, bias 1e-4.
        # Head: LinearClsHead's Normal(std=0.01) init, bias 0.
        for name, m in self.backbone.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01 if "conv1" in name else 1.0 / m.weight.shape[1])
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
                nn.init.zeros_(m.running_mean)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


# The mmcls checkpoints' keys are this module's keys (no convert needed).

@register("mmcls_shufflenet_v2_x1_0", default_weights=lambda: MMCLS_WEIGHTS["mmcls_shufflenet_v2_x1_0"])
def mmcls_shufflenet_v2_x1_0(num_classes: int = 1000) -> nn.Module:
    """mmcls ShuffleNetV2 1.0x (config shufflenet-v2-1x_16xb64_in1k), random init."""
    return MMClsImageClassifier(ShuffleNetV2Backbone(widen_factor=1.0), num_classes)


@register("mmcls_shufflenet_v1_x1_0_g3", default_weights=lambda: MMCLS_WEIGHTS["mmcls_shufflenet_v1_x1_0_g3"])
def mmcls_shufflenet_v1_x1_0_g3(num_classes: int = 1000) -> nn.Module:
    """mmcls ShuffleNetV1 1.0x, groups=3 (config shufflenet-v1-1x_16xb64_in1k), random init."""
    return MMClsImageClassifier(ShuffleNetV1Backbone(groups=3, widen_factor=1.0), num_classes)
