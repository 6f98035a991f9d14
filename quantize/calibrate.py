"""Calibrate stage: stream batches through the fp32 model and reduce every activation to a range.

Only running statistics are kept (a min/max pair or a fixed-size histogram per tensor), never the activations
themselves, so memory is set by one batch, not by the number of images. The ranges are written in ONNX Runtime's
own calibration-cache format, which ``quantize_static`` reads instead of calibrating again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

from .errors import ConfigError, ModelError
from .histogram import StreamingHistogram
from .memory import peak_rss_mb, reset_peak_rss
from .runtime import input_name, make_session

log = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


@dataclass
class Calibration:
    ranges: dict[str, tuple[float, float]]
    method: str
    num_images: int
    seconds: float
    peak_rss_mb: float


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors that feed or leave a node, excluding weights: what ONNX Runtime's quantizer asks ranges for."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    weights = {init.name for init in graph.initializer}
    names: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + list(node.output):
            if name and name not in weights and types.get(name) == onnx.TensorProto.FLOAT:
                names[name] = None
    return list(names)


def _expose(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed.SerializeToString()


class _MinMax:
    def __init__(self):
        self.min, self.max = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        lo, hi = float(values.min()), float(values.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("values contain NaN or infinity")
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def range(self) -> tuple[float, float]:
        return self.min, self.max


def _collector(method: str, percentile: float, num_bins: int):
    if method == "minmax":
        return _MinMax()
    histogram = StreamingHistogram(num_bins)
    histogram.range = (lambda: histogram.percentile_range(percentile)) if method == "percentile" \
        else histogram.entropy_range
    return histogram


def calibrate(onnx_path: Path, batches: Iterable[np.ndarray], method: str = "percentile",
              percentile: float = 99.999, num_bins: int = 2048, threads: int = 0) -> Calibration:
    """Ranges of every activation of ``onnx_path`` over ``batches`` (float32 NCHW arrays)."""
    if method not in METHODS:
        raise ConfigError(f"calib.method={method!r} is not one of {', '.join(METHODS)}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise ConfigError(f"calib.percentile={percentile} must be in (0, 100]")
    model = onnx.load(str(onnx_path))
    tensors = activation_tensors(model)
    session = make_session(_expose(model, tensors), threads=threads, basic_optimizations_only=True)
    del model
    feed_name = input_name(session)
    collectors = {name: _collector(method, percentile, num_bins) for name in tensors}
    reset_peak_rss()
    started = time.perf_counter()
    count = 0
    for batch in batches:
        outputs = session.run(tensors, {feed_name: batch})
        for name, values in zip(tensors, outputs):
            try:
                collectors[name].add(values)
            except ValueError as exc:
                raise ModelError(f"activation {name!r} on the calibration batch starting at image {count}: "
                                 f"{exc}; the fp32 model is broken") from exc
        del outputs
        count += len(batch)
    if count == 0:
        raise ConfigError("calibration received no images")
    ranges = {name: tuple(map(float, c.range())) for name, c in collectors.items()}
    seconds = time.perf_counter() - started
    result = Calibration(ranges, method, count, seconds, peak_rss_mb())
    log.info("calibrated %d tensors on %d images with %s in %.1f s, peak RSS %.0f MiB",
             len(ranges), count, method, seconds, result.peak_rss_mb)
    return result


def save_ranges(calibration: Calibration, path: Path) -> None:
    """Write ranges as ONNX Runtime's calibration cache (atomically: ORT writes a temporary file and renames)."""
    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in calibration.ranges.items()}
    save_tensors_data(TensorsData(METHODS[calibration.method], data), path)

