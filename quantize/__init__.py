"""Post-training int8 quantization of ImageNet classifiers with ONNX Runtime.

    import quantize
    result = quantize.quantize_model("model.onnx", image_paths, "model.int8.onnx")

``quantize_model`` quantizes an ONNX file or a torch module from an iterable of images or arrays (no Hydra, no
dataset folder); ``run_pipeline`` runs the staged, cached pipeline of ``python -m quantize`` on a composed config.
Names are loaded on first use, so ``import quantize`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "quantize_model": "quantize.api", "run_pipeline": "quantize.api", "QuantizeResult": "quantize.api",
    "Preprocess": "quantize.data.preprocess",
    "CalibConfig": "quantize.config", "QuantConfig": "quantize.config", "ExportConfig": "quantize.config",
    "QuantizeError": "quantize.core.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantize' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
