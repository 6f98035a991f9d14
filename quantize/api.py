"""The library entry point: quantize a model from an iterable of images, without Hydra or a dataset folder.

``quantize_model`` runs the same engines, in the same order and with the same defaults (the structured configs'
dataclasses), as ``python -m quantize``: export at opset 11 (for a torch module), exact graph rewrites, calibration,
ONNX Runtime static quantization, the refinements the quant config asks for, and validation of the int8 model.
What it does not do is cache stages, read ImageNet folders or evaluate: that is the pipeline's job
(``run_pipeline``, which the CLI calls).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from quantize.config import CalibConfig, ExportConfig, QuantConfig
from quantize.core.errors import ConfigError
from quantize.data.preprocess import Preprocess, load_rgb, normalize_batch, crop_uint8
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.export import export_onnx, import_onnx
from quantize.stages.static_quant import quantize_model as quantize_static_model

if TYPE_CHECKING:
    import torch

    from omegaconf import DictConfig

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class QuantizeResult:
    int8_path: Path
    fp32_path: Path            # the fp32 ONNX model that was quantized (exported, or the file given)
    num_images: int            # calibration images read
    opset: int                 # of the int8 model
    details: dict[str, Any]    # what each step reported (calibration seconds and peak RSS, refinements)


def quantize_model(model: str | Path | "torch.nn.Module", calibration_data: Iterable[ImageLike], out_path: str | Path,
                   *, preprocess: Preprocess | None = None, calib: CalibConfig | None = None,
                   quant: QuantConfig | None = None, export: ExportConfig | None = None,
                   threads: int = 0) -> QuantizeResult:
    """Write an int8 ONNX model of ``model`` to ``out_path`` and return where everything is.

    ``model``: an ONNX file (one float NCHW input, class logits out) or a ``torch.nn.Module`` (exported at
    ``export.opset``). ``calibration_data``: image files, PIL images (both preprocessed with ``preprocess``,
    ImageNet's Resize 256 / CenterCrop 224 / mean-std by default), or float32 arrays already preprocessed
    (``CHW`` images or ``NCHW`` batches). ``calib``/``quant``/``export``: the CLI's config blocks; their defaults
    are the CLI's defaults.
    """
    calib = calib or CalibConfig()
    quant = quant or QuantConfig()
    export = export or ExportConfig()
    preprocess = preprocess or Preprocess()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batches = list(_batches(calibration_data, calib.batch_size, preprocess, calib.num_images))
    if not batches:
        raise ConfigError("calibration_data is empty: give at least one image")
    num_images = sum(len(b) for b in batches)
    with tempfile.TemporaryDirectory(prefix="quantize-api.") as scratch:
        work = Path(scratch)
        check = batches[0][: export.check_images]
        if isinstance(model, (str, Path)):
            fp32 = import_onnx(Path(model), work / "model.onnx", check, threads=threads)
        else:
            fp32 = export_onnx(model, work / "model.onnx", check, opset=export.opset, tolerance=export.tolerance,
                               threads=threads)
        calibration = calibrate(fp32.path, iter(batches), method=calib.method, percentile=calib.percentile,
                                num_bins=calib.num_bins, threads=threads)
        ranges = work / "ranges.json"
        save_ranges(calibration, ranges)
        int8_target = work / "model.int8.onnx"
        quantized = quantize_static_model(
            fp32.path, ranges, int8_target, method=calib.method, fmt=quant.format,
            activation_type=quant.activation_type, weight_type=quant.weight_type, per_channel=quant.per_channel,
            reduce_range=quant.reduce_range, opset=quant.opset,
            op_types=list(quant.op_types) if quant.op_types else None, nodes_to_exclude=list(quant.nodes_to_exclude))
        details: dict[str, Any] = {"calibration_seconds": calibration.seconds,
                                   "calibration_peak_rss_mb": calibration.peak_rss_mb}
        final = quantized.path
        if quant.weight_rounding != "nearest" or quant.bias_correction:
            from quantize.accuracy.refine import refine
            from quantize.graph.optimize import optimize
            import onnx

            reference = work / "fp32.optimized.onnx"
            onnx.save(optimize(onnx.load(str(fp32.path)))[0], str(reference))
            final = work / "model.int8.refined.onnx"
            details["refine"] = refine(reference, quantized.path, final, lambda: iter(batches),
                                       weight_rounding=quant.weight_rounding,
                                       bias_correction=bool(quant.bias_correction), threads=threads)
        final.replace(out_path)
        fp32_out = out_path.with_name(out_path.name.replace(".int8", "").replace(".onnx", "") + ".fp32.onnx")
        fp32.path.replace(fp32_out)
    log.info("quantized %s on %d images -> %s", model if isinstance(model, (str, Path)) else type(model).__name__,
             num_images, out_path)
    return QuantizeResult(out_path, fp32_out, num_images, quantized.opset, details)


def run_pipeline(cfg: "DictConfig", run_dir: str | Path) -> dict[str, Any] | None:
    """The staged, cached pipeline the CLI runs (export, calibrate, quantize, evaluate, report) on a composed
    config; returns the report."""
    from quantize.pipeline.runner import Pipeline

    return Pipeline(cfg, Path(run_dir)).run()


def _batches(data: Iterable[ImageLike], batch_size: int, preprocess: Preprocess, limit: int | None
             ) -> Iterator[np.ndarray]:
    """float32 NCHW batches of at most ``batch_size`` images, at most ``limit`` images in all."""
    if batch_size < 1:
        raise ConfigError(f"calib.batch_size={batch_size} must be >= 1")
    images = (image for item in data for image in _as_images(item, preprocess))
    if limit is not None:
        images = itertools.islice(images, limit)
    while chunk := list(itertools.islice(images, batch_size)):
        yield np.ascontiguousarray(np.stack(chunk), dtype=np.float32)


def _as_images(item: ImageLike, preprocess: Preprocess) -> Iterator[np.ndarray]:
    if isinstance(item, np.ndarray):
        if item.ndim == 3:
            yield item
        elif item.ndim == 4:
            yield from item
        else:
            raise ConfigError(f"calibration arrays must be CHW images or NCHW batches, got shape {list(item.shape)}")
        return
    image = item if isinstance(item, Image.Image) else load_rgb(item)
    if image.mode != "RGB":
        image = image.convert("RGB")
    yield normalize_batch(crop_uint8(image, preprocess)[None], preprocess)[0]
