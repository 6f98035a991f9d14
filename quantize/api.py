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


def cli_defaults() -> tuple[CalibConfig, QuantConfig]:
    """The calib and quant blocks ``python -m quantize`` runs with when none is chosen on the command line."""
    from omegaconf import OmegaConf

    from quantize.config import CONF_DIR

    chosen = {}
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults:
        if not isinstance(entry, str):
            chosen.update(OmegaConf.to_container(entry))
    blocks = []
    for group, schema in (("calib", CalibConfig), ("quant", QuantConfig)):
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{chosen[group]}.yaml"))
        blocks.append(OmegaConf.to_object(merged))
    return blocks[0], blocks[1]


def _first_images(batches: list[np.ndarray], n: int | None) -> list[np.ndarray]:
    """The leading ``n`` images of ``batches`` (all when ``n`` is None), as batches."""
    if n is None:
        return batches
    kept, count = [], 0
    for batch in batches:
        if count >= n:
            break
        kept.append(batch[: n - count])
        count += len(kept[-1])
    return kept


def quantize_model(model: str | Path | "torch.nn.Module", calibration_data: Iterable[ImageLike], out_path: str | Path,
                   *, preprocess: Preprocess | None = None, calib: CalibConfig | None = None,
                   quant: QuantConfig | None = None, export: ExportConfig | None = None,
                   threads: int = 0) -> QuantizeResult:
    """Write an int8 ONNX model of ``model`` to ``out_path`` and return where everything is.

    ``model``: an ONNX file (one float NCHW input, class logits out) or a ``torch.nn.Module`` (exported at
    ``export.opset``). ``calibration_data``: image files, PIL images (both preprocessed with ``preprocess``,
    ImageNet's Resize 256 / CenterCrop 224 / mean-std by default), or float32 arrays already preprocessed
    (``CHW`` images or ``NCHW`` batches). ``calib``/``quant``/``export``: the CLI's config blocks; left out, each is
    what ``python -m quantize`` runs with no override (``cli_defaults``: the groups ``conf/config.yaml`` selects,
    today ``calib=mse quant=u8s8_fidelity``). ``QuantConfig()`` / ``CalibConfig()`` themselves are the plain recipe.
    """
    default_calib, default_quant = cli_defaults()
    calib = calib or default_calib
    quant = quant or default_quant
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
        source = fp32.path  # what is calibrated and quantized: the model, or its range-balanced copy
        details: dict[str, Any] = {}
        if quant.equalize and quant.balance:
            raise ConfigError("quant.equalize and quant.balance both rescale the fp32 model's channels: choose one")
        if quant.balance:
            from quantize.accuracy.range_balance import balance

            source = work / "model.balanced.onnx"
            subset = _first_images(batches, quant.balance_images)
            details["balance"] = {"chains": len(balance(fp32.path, source, iter(subset), strength=quant.balance_strength,
                                                        threads=threads).chains)}
        import onnx

        from quantize.graph.optimize import optimize

        optimized = work / "fp32.optimized.onnx"  # the graph calibrated and quantized (the rewrites are exact)
        pixels = preprocess.pixel_mapping() if quant.pixel_input else None
        onnx.save(optimize(onnx.load(str(source)), pixels=pixels)[0], str(optimized))
        calibration = calibrate(optimized, iter(batches), method=calib.method, percentile=calib.percentile,
                                num_bins=calib.num_bins, threads=threads, optimize_graph=False)
        ranges = work / "ranges.json"
        save_ranges(calibration, ranges)
        if quant.shared_concat_ranges:
            from quantize.accuracy.shared_ranges import share_concat_ranges

            details["shared_ranges"] = share_concat_ranges(onnx.load(str(optimized)), ranges, work / "ranges.shared.json")
            ranges = work / "ranges.shared.json"
        int8_target = work / "model.int8.onnx"
        quantized = quantize_static_model(
            optimized, ranges, int8_target, method=calib.method, fmt=quant.format,
            activation_type=quant.activation_type, weight_type=quant.weight_type, per_channel=quant.per_channel,
            reduce_range=quant.reduce_range, opset=quant.opset,
            op_types=list(quant.op_types) if quant.op_types else None, nodes_to_exclude=list(quant.nodes_to_exclude),
            float_stem=quant.float_stem, optimize_graph=False, fp32_out=work / "quantizer_input.onnx")
        details.update(calibration_seconds=calibration.seconds, calibration_peak_rss_mb=calibration.peak_rss_mb)
        final = quantized.path
        if quant.weight_rounding != "nearest" or quant.bias_correction or quant.weight_scales != "max":
            from quantize.accuracy.refine import refine

            final = work / "model.int8.refined.onnx"
            subset = _first_images(batches, quant.refine_images)
            details["refine"] = refine(quantized.fp32_path or optimized, quantized.path, final, lambda: iter(subset),
                                       weight_rounding=quant.weight_rounding,
                                       bias_correction=bool(quant.bias_correction), threads=threads,
                                       weight_scales=quant.weight_scales)
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
