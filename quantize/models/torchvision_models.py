"""ShuffleNetV2 variants built with torchvision's own builders (random init here; weights added by build_model)."""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from quantize.models import register

__all__ = ["TORCHVISION_WEIGHTS"]

# arch name -> (torchvision builder name, torchvision weights enum name)
_SHUFFLENETS = {
    "shufflenet_v2_x0_5": "ShuffleNet_V2_X0_5_Weights",
    "shufflenet_v2_x1_0": "ShuffleNet_V2_X1_0_Weights",
    "shufflenet_v2_x1_5": "ShuffleNet_V2_X1_5_Weights",
    "shufflenet_v2_x2_0": "ShuffleNet_V2_X2_0_Weights",
}


def _weights_info(enum_name: str) -> dict[str, Any]:
    """Official ImageNet-1k weights of a torchvision model: URL, reference accuracy and eval preprocessing."""
    weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    preset = getattr(weights.transforms, "keywords", {})  # functools.partial(ImageClassification, crop_size=...)
    return {
        "url": weights.url,
        "top1": float(metrics["acc@1"]),
        "top5": float(metrics["acc@5"]),
        # torchvision's eval preprocessing for these numbers (ImageClassification preset, bilinear).
        "resize_size": int(preset.get("resize_size", 256)),
        "crop_size": int(preset.get("crop_size", 224)),
    }


TORCHVISION_WEIGHTS: dict[str, dict[str, Any]] = {arch: _weights_info(enum) for arch, enum in _SHUFFLENETS.items()}


def _make_builder(arch: str):
    tv_builder = getattr(torchvision.models, arch)

    def builder(num_classes: int = 1000) -> nn.Module:
        return tv_builder(weights=None, num_classes=num_classes)

    builder.__name__ = arch
    builder.__doc__ = f"torchvision {arch}, random init."
    return builder


for _arch in _SHUFFLENETS:
    register(_arch, default_weights=lambda _a=_arch: TORCHVISION_WEIGHTS[_a]["url"])(_make_builder(_arch))
