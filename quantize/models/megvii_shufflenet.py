"""ShuffleNetV2 0.5x/1.0x/1.5x/2.0x as Megvii's official ShuffleNet-Series (``ShuffleNetV2/network.py`` and
``blocks.py``) builds them, laid out so that Megvii's checkpoints load strictly once the ``module.`` prefix of
their DataParallel keys is stripped.

How it differs from torchvision's ShuffleNetV2 (the weights are not interchangeable):

- Channel split and shuffle are fused: a stride-1 block takes the *even* channels of its input as the pass-through
  half and the *odd* channels as the branch input; nothing is shuffled after a block. (torchvision shuffles the
  concatenation after every block, then splits it into first/second halves.)
- A stride-2 block gives its main branch ``out - in`` output channels and its projection branch ``in`` (torchvision:
  ``out/2`` each). This only differs in the first block (24 -> 116 at 1.0x: 92 + 24 instead of 58 + 58). Inner
  width is ``out/2`` everywhere.
- The classifier is ``Linear(..., bias=False)``; 2.0x has ``Dropout(0.2)`` before it and a 2048-wide last conv
  (the other widths: 1024).
- Keys: ``first_conv.{0,1}``, ``features.<i>.branch_main.{0,1,3,4,5,6}``, ``features.<i>.branch_proj.{0,1,2,3}``
  (stride-2 blocks only), ``conv_last.{0,1}``, ``classifier.0.weight``.

Input: Megvii trained and evaluated on **BGR pixels in 0..255, not normalised** (``ToBGRTensor`` in ``train.py``;
eval resize is OpenCV bilinear to 256, then center crop 224). The network takes exactly that: the zoo entries'
preprocessing (``conf/model/preprocess/megvii.yaml``) feeds it, so the exported ONNX model expects what Megvii's
own deployment would give it.

Weights: Megvii publishes the checkpoints (``{"state_dict": {"module.first_conv.0.weight": ...}}``, ``.pth.tar``)
only in a OneDrive folder and on BaiduYun, with no stable direct URL; download one and pass
``model.checkpoint=PATH``.
"""

from __future__ import annotations

import torch
from torch import nn

from quantize.core.errors import ModelError
from quantize.models.spec import register

__all__ = ["MEGVII_DOWNLOAD", "MegviiShuffleNetV2", "ShuffleV2Block", "strip_module_prefix"]

MEGVII_DOWNLOAD = (
    "OneDrive https://1drv.ms/f/s!AgaP37NGYuEXhRfQxHRseR7eSxXo or BaiduYun "
    "https://pan.baidu.com/s/1EUQVoFPb74yZm0JWHKjFOw (code mc24), linked from "
    "https://github.com/megvii-model/ShuffleNet-Series/tree/master/ShuffleNetV2"
)

def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megvii's checkpoints were saved from ``nn.DataParallel``: drop the leading ``module.`` of each key.
    Keys without it (a state dict already in our layout) pass unchanged."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


class ShuffleV2Block(nn.Module):
    """Megvii's ShuffleNetV2 block.

    ``branch_main``: 1x1 (in -> mid) BN ReLU, dw kxk BN, 1x1 (mid -> out - in) BN ReLU.
    ``branch_proj`` (stride 2 only): dw kxk BN, 1x1 (in -> in) BN ReLU.
    Stride 1 (``in`` is half the block's input): even input channels pass through, odd ones feed ``branch_main``.
    Stride 2: both branches see the whole input. Output: ``cat(pass-through or branch_proj, branch_main)``.
    """

    def __init__(self, inp: int, oup: int, mid_channels: int, *, ksize: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        pad = ksize // 2
        outputs = oup - inp
        self.branch_main = nn.Sequential(
            nn.Conv2d(inp, mid_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, ksize, stride, pad, groups=mid_channels, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.Conv2d(mid_channels, outputs, 1, 1, 0, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
        )
        self.branch_proj: nn.Module | None = None
        if stride == 2:
            self.branch_proj = nn.Sequential(
                nn.Conv2d(inp, inp, ksize, stride, pad, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, inp, 1, 1, 0, bias=False),
                nn.BatchNorm2d(inp),
                nn.ReLU(inplace=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_proj is None:
            # Same as Megvii's reshape/permute: channel 2j goes to the pass-through half, 2j+1 to the branch.
            return torch.cat((x[:, 0::2], self.branch_main(x[:, 1::2])), dim=1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), dim=1)


class MegviiShuffleNetV2(nn.Module):
    """Megvii's ShuffleNetV2: ``first_conv`` (3x3/2, 24) -> maxpool -> ``features`` (4, 8, 4 blocks) -> ``conv_last``
    (1x1) -> global average pool -> [dropout 0.2 at 2.0x] -> ``classifier`` (no bias).

    Megvii pools with ``AvgPool2d(7)`` (global at 224x224); a global average pool is used here, identical at 224.
    """

    STAGE_OUT_CHANNELS = {
        "0.5x": (24, 48, 96, 192, 1024),
        "1.0x": (24, 116, 232, 464, 1024),
        "1.5x": (24, 176, 352, 704, 1024),
        "2.0x": (24, 244, 488, 976, 2048),
    }
    STAGE_REPEATS = (4, 8, 4)

    def __init__(self, model_size: str = "1.0x", num_classes: int = 1000) -> None:
        super().__init__()
        if model_size not in self.STAGE_OUT_CHANNELS:
            raise ValueError(f"model_size must be one of {list(self.STAGE_OUT_CHANNELS)}, got {model_size!r}")
        self.model_size = model_size
        channels = self.STAGE_OUT_CHANNELS[model_size]

        in_ch = channels[0]
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, in_ch, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks = []
        for repeats, out_ch in zip(self.STAGE_REPEATS, channels[1:4]):
            for i in range(repeats):
                if i == 0:
                    blocks.append(ShuffleV2Block(in_ch, out_ch, out_ch // 2, ksize=3, stride=2))
                else:
                    blocks.append(ShuffleV2Block(in_ch // 2, out_ch, out_ch // 2, ksize=3, stride=1))
                in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_ch, channels[4], 1, 1, 0, bias=False),
            nn.BatchNorm2d(channels[4]),
            nn.ReLU(inplace=True),
        )
        self.globalpool = nn.AdaptiveAvgPool2d(1)
        self.dropout: nn.Module = nn.Dropout(0.2) if model_size == "2.0x" else nn.Identity()
        self.classifier = nn.Sequential(nn.Linear(channels[4], num_classes, bias=False))
        self._init_weights()

    def _init_weights(self) -> None:
        # Megvii's init: stem conv N(0, 0.01), other convs N(0, 1/fan-in channels per group), BN weight 1 and
        # bias 1e-4, classifier N(0, 0.01).
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01 if "first" in name else 1.0 / m.weight.shape[1])
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
                nn.init.zeros_(m.running_mean)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.first_conv(x))
        x = self.conv_last(self.features(x))
        x = self.dropout(torch.flatten(self.globalpool(x), 1))
        return self.classifier(x)


def _no_download(arch: str):
    def default_weights() -> str:
        raise ModelError(
            f"{arch}: Megvii publishes these weights only as a shared-folder download ({MEGVII_DOWNLOAD}); "
            "download the .pth.tar and pass model.checkpoint=PATH, or model.pretrained=false"
        )

    return default_weights


def _make_builder(arch: str, size: str):
    def builder(num_classes: int = 1000) -> nn.Module:
        return MegviiShuffleNetV2(size, num_classes)

    builder.__name__ = arch
    builder.__doc__ = f"Megvii ShuffleNetV2 {size} taking BGR 0..255 input, random init."
    return builder


for _arch, _size in (("megvii_shufflenet_v2_x0_5", "0.5x"), ("megvii_shufflenet_v2_x1_0", "1.0x"),
                     ("megvii_shufflenet_v2_x1_5", "1.5x"), ("megvii_shufflenet_v2_x2_0", "2.0x")):
    register(_arch, default_weights=_no_download(_arch), convert=strip_module_prefix)(_make_builder(_arch, _size))
