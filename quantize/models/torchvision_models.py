"""ShuffleNetV2 variants built with torchvision's own builders (random init here; weights added by build_model)."""

from __future__ import annotations

import functools
from typing import Any

import torchvision
from torch import nn

from quantize.core.errors import ModelError
from quantize.models.spec import register

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


def any_torchvision_classifier(name: str):
    """A registry entry for any torchvision ImageNet classification model, by its builder name."""
    from quantize.models.spec import ArchSpec

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ModelError(f"torchvision has no classification model {name!r} (e.g. {', '.join(known[:6])}, ...; "
                         "see torchvision.models.list_models())")

    def builder(num_classes: int = 1000) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return ArchSpec(f"torchvision/{name}", builder,
                    default_weights=lambda: torchvision.models.get_model_weights(name).DEFAULT.url)


@functools.lru_cache(maxsize=None)
def weights_preprocess(name: str) -> dict[str, Any]:
    """The eval transform of torchvision's default weights for ``name``, as ``model.preprocess`` settings: resize,
    crop, interpolation, mean and std from ``weights.transforms()`` (an ``ImageClassification`` preset: Pillow
    resize of the shorter side, antialiased, then center crop, then ``/ 255`` and mean/std). A name without
    weights, or whose transform is not that preset, gets the standard ImageNet transform: the builder reports an
    unknown name with one line when the model is built."""
    settings: dict[str, Any] = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError, TypeError):
        return settings
    if not all(hasattr(preset, a) for a in ("resize_size", "crop_size", "interpolation", "mean", "std")):
        return settings
    settings.update(resize=int(preset.resize_size[0]), crop=int(preset.crop_size[0]),
                    interpolation=str(preset.interpolation.value), mean=[float(v) for v in preset.mean],
                    std=[float(v) for v in preset.std])
    return settings


def published_reference(name: str) -> dict[str, float] | None:
    """torchvision's own ImageNet top-1/top-5 for its default weights of ``name``, or None."""
    try:
        metrics = torchvision.models.get_model_weights(name).DEFAULT.meta["_metrics"]["ImageNet-1K"]
    except (ValueError, KeyError, AttributeError):
        return None
    return {"top1": float(metrics["acc@1"]), "top5": float(metrics["acc@5"])}
