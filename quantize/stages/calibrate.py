"""Calibrate stage: stream batches through the fp32 model and reduce every activation to a range.

Only running statistics are kept (a min/max pair or a fixed-size histogram per tensor), never the activations
themselves, so memory is set by one batch, not by the number of images. The ranges are written in ONNX Runtime's
own calibration-cache format, which ``quantize_static`` reads instead of calibrating again.

What makes it cheap:

- It runs on the graph the quantizer will see (``graph_opt.optimize``: shape arithmetic folded, Pads folded into
  convolutions, channel shuffles as Splits/Concats), so the ranges name exactly the tensors that get quantized.
- Statistics are collected only for tensors whose range is its own. A tensor whose only reader is Relu/Clip takes
  that activation's output range (ONNX Runtime's quantizer overwrites it with exactly that, and quantizing the
  input with the output's range gives the same result after the activation); the output of a Reshape, Transpose,
  Flatten, Squeeze, Unsqueeze or Identity holds the same values as its input, so it takes the input's range; the
  parts a Split cuts get their input's quantization parameters from the quantizer, so they take its range too.
  (EfficientNet-Lite0: 61 of 95 tensors measured, 7.1 of 13.3 M values per image; ShuffleNetV2 x1.0: 76 of 182.)
- Minima and maxima are reduced inside the graph (ReduceMin/ReduceMax, as ONNX Runtime's own MinMax calibrator
  does): MinMax copies no activation out of ONNX Runtime at all, and the graph keeps its fusions.
- Histogram methods bind the measured activations of EXPOSED_BATCH images to preallocated buffers (no allocation
  or copy per batch) and bin them in two threads, each owning half of the tensors, while ONNX Runtime computes the
  next chunk into a second buffer set; the batch extremes come from the graph, so binning is four passes over the
  values and one ``np.bincount`` (which releases the GIL), in cache-sized slices.
- ONNX Runtime's memory pattern is off: with its arena, the second run would otherwise plan a block for all
  intermediates on top of what the first run left in the arena, doubling the resident memory.

Chunked statistics are exact: minima and maxima trivially, histograms because every tensor's bins sit on a grid
anchored at zero (``histogram.py``), so a percentile read after any split into batches is within two bins of the
single-pass one (tests/test_perf_calibrate.py checks it against one histogram of all values).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

from quantize.graph import optimize as graph_opt
from quantize.config import CalibMethod, choice
from quantize.core.errors import ConfigError, ModelError
from quantize.stages.histogram import StreamingHistogram
from quantize.core.memory import peak_rss_mb, reset_peak_rss
from quantize.core.runtime import input_name, make_session

log = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    # ONNX Runtime has no such method; its cache format only needs a label (the ranges are read as written)
    "mse": CalibrationMethod.Percentile,
}
# Bumped when a method's ranges change for the same images, so calibrations cached by an older version are redone
# (entropy 2: exact zeros left out, 256 levels for tensors that are never negative).
METHOD_VERSIONS = {"minmax": 1, "percentile": 1, "entropy": 2, "mse": 1}

# Ops whose output holds exactly the values of their first input, rearranged.
SAME_VALUES_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
# Ops whose outputs ONNX Runtime's quantizer gives the quantization parameters of their input, in QDQ and QOperator
# formats alike (each output is a part of the input): their own ranges are never read.
SHARED_PARAMS_OPS = ("Split",)
ACTIVATIONS = ("Relu", "Clip")
# Images per run when activations are exposed: two buffer sets of this many images are the calibration's memory.
EXPOSED_BATCH = 4


@dataclass
class Calibration:
    ranges: dict[str, tuple[float, float]]
    method: str
    num_images: int
    seconds: float
    peak_rss_mb: float
    measured: int = 0                  # tensors whose statistics were collected (the rest derive their range)
    graph_opt: dict[str, int] = field(default_factory=dict)


@dataclass
class RangePlan:
    measured: list[str]                # statistics collected for these
    derived: dict[str, str]            # tensor -> measured tensor whose range it takes


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors that feed or leave a node, excluding weights: what ONNX Runtime's quantizer asks ranges for.
    A tensor computed from weights alone (a weight passed through Identity, as the TorchScript exporter writes
    shared weights) is a weight too: it has no batch dimension to measure over."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    weights = {init.name for init in graph.initializer} - {i.name for i in graph.input}
    for node in graph.node:  # topological order, as ONNX requires
        if all(name in weights for name in node.input if name):
            weights.update(name for name in node.output if name)
    names: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + list(node.output):
            if name and name not in weights and types.get(name) == onnx.TensorProto.FLOAT:
                names[name] = None
    return list(names)


def range_plan(model: onnx.ModelProto, tensors: list[str]) -> RangePlan:
    """Which tensors need statistics of their own, and where every other one takes its range from: the input of a
    Relu/Clip that is its only reader takes the activation's output range; the output of a value-preserving op or
    of a Split takes its input's range."""
    wanted = set(tensors)
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    source: dict[str, str] = {}
    for node in model.graph.node:
        if not node.input or not node.output:
            continue
        if node.op_type in SHARED_PARAMS_OPS and node.domain in ("", "ai.onnx") and node.input[0] in wanted:
            for out in node.output:
                if out in wanted:
                    source[out] = node.input[0]
            continue
        src, dst = node.input[0], node.output[0]
        if src not in wanted or dst not in wanted:
            continue
        if node.op_type in ACTIVATIONS and len(readers.get(src, [])) == 1 and src not in outputs:
            source[src] = dst
        elif node.op_type in SAME_VALUES_OPS and node.domain in ("", "ai.onnx"):
            source[dst] = src
        elif node.op_type == "Gather" and node.domain in ("", "ai.onnx") and _gathers_everything(node, model):
            source[dst] = src  # every value again, some twice (graph.stem_channels): the same range
    derived: dict[str, str] = {}
    for name in source:
        seen = {name}
        target = source[name]
        while target in source and target not in seen:
            seen.add(target)
            target = source[target]
        if target in source:  # a cycle cannot occur in a DAG; measure rather than guess
            continue
        derived[name] = target
    return RangePlan([t for t in tensors if t not in derived], derived)


def _gathers_everything(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """A Gather with constant indices that takes every index of its axis at least once."""
    indices = next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[1]), None)
    if indices is None or indices.ndim != 1 or indices.size == 0:
        return False
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    value_infos = list(model.graph.input) + list(model.graph.value_info)
    info = next((vi for vi in value_infos if vi.name == node.input[0]), None)
    if info is None:
        info = next((vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info
                     if vi.name == node.input[0]), None)
    dims = info.type.tensor_type.shape.dim if info is not None else []
    if not -len(dims) <= axis < len(dims) or not dims[axis].HasField("dim_value"):
        return False
    size = dims[axis].dim_value
    return set(int(i) % size for i in indices) == set(range(size))


def _calibration_graph(model: onnx.ModelProto, measured: list[str], expose: bool
                       ) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The model plus ReduceMin/ReduceMax of every measured tensor as outputs (and the tensors themselves)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    del graph.output[:]  # without an axes input (opset 18) or attribute, ReduceMin/ReduceMax reduce everything
    mins, maxs = [], []
    for i, name in enumerate(measured):
        for op, names in (("ReduceMin", mins), ("ReduceMax", maxs)):
            out = f"__calib_{op[6:].lower()}_{i}"
            flat = f"__calib_flat_{i}"
            if op == "ReduceMin":
                # reduce a flat view: one contiguous pass whatever the rank (and rank-0 tensors work too)
                graph.node.append(helper.make_node("Reshape", [name, "__calib_flat_shape"], [flat]))
            graph.node.append(helper.make_node(op, [flat], [out], keepdims=0))
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
            names.append(out)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "__calib_flat_shape"))
    if expose:
        inputs = {i.name for i in graph.input}
        for name in measured:
            if name not in inputs:  # the network input is the batch itself
                graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    del graph.value_info[:]
    return model, mins, maxs


def _static_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list]:
    """Inferred shapes of ``names``; the first (batch) dimension may be symbolic."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.name in names and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return shapes


class _MinMax:
    def __init__(self):
        self.min, self.max = np.inf, -np.inf

    def add(self, values: np.ndarray | None, lo: float, hi: float) -> None:
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def range(self) -> tuple[float, float]:
        return self.min, self.max


def _collector(method: str, percentile: float, num_bins: int):
    if method == "minmax":
        return _MinMax()
    histogram = StreamingHistogram(num_bins, count_zeros=method == "entropy")
    if method == "percentile":
        histogram.range = lambda: histogram.percentile_range(percentile)
    elif method == "mse":
        histogram.range = histogram.mse_range
    else:
        histogram.range = histogram.entropy_range
    return histogram


class _Runner:
    """Runs the calibration graph with its outputs bound to buffers: the reduced minima and maxima, and (for
    histograms) the measured activations in the buffers ``buffers(set_index, images)`` provides. Two buffer sets
    alternate, so one can be binned while ONNX Runtime fills the other."""

    def __init__(self, session, measured: list[str], mins: list[str], maxs: list[str], buffers=None):
        self.session = session
        self.feed = input_name(session)
        self.measured, self.mins, self.maxs = measured, mins, maxs
        self.buffers = buffers
        self.scalars = {name: np.zeros((), dtype=np.float32) for name in mins + maxs}
        self.turn = 0

    def run(self, batch: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, list[np.ndarray | None]]:
        set_index = self.turn % 2
        self.turn += 1
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        arrays = dict(self.buffers(set_index, len(batch))) if self.buffers is not None else {}
        bound = {**self.scalars, **{n: a for n, a in arrays.items() if n != self.feed}}
        order = list(bound)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.feed, batch)
        for name in order:
            array = bound[name]
            if array is None:  # shape unknown before running: ONNX Runtime allocates it
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        produced = binding.get_outputs()
        for i, name in enumerate(order):
            # ONNX Runtime writes into a bound buffer, unless it hands back another tensor as the output
            array = bound[name]
            if array is None or produced[i].data_ptr() != array.ctypes.data:
                value = produced[i].numpy()
                if array is not None and array.shape == value.shape:
                    np.copyto(array, value)
                else:
                    bound[name] = np.array(value, copy=True)
        lows = np.array([float(self.scalars[n]) for n in self.mins], dtype=np.float64)
        highs = np.array([float(self.scalars[n]) for n in self.maxs], dtype=np.float64)
        if self.buffers is None:
            return set_index, lows, highs, [None] * len(self.measured)
        if self.feed in arrays:  # the network input is measured: it is the batch itself
            if arrays[self.feed] is None:
                bound[self.feed] = batch
            else:
                np.copyto(arrays[self.feed], batch)
                bound[self.feed] = arrays[self.feed]
        return set_index, lows, highs, [bound[n] for n in self.measured]


def calibrate(onnx_path: Path, batches: Iterable[np.ndarray], method: str = "percentile",
              percentile: float = 99.999, num_bins: int = 2048, threads: int = 0,
              optimize_graph: bool = True) -> Calibration:
    """Ranges of every activation of ``onnx_path`` (after ``graph_opt.optimize``) over ``batches`` (float32 NCHW)."""
    method = choice(CalibMethod, method, "calib.method").value
    if method == "percentile" and not 0 < percentile <= 100:
        raise ConfigError(f"calib.percentile={percentile} must be in (0, 100]")
    model = onnx.load(str(onnx_path))
    rewrites: dict[str, int] = {}
    if optimize_graph:
        model, report = graph_opt.optimize(model)
        rewrites = report.as_dict()
    tensors = activation_tensors(model)
    plan = range_plan(model, tensors)
    expose = method != "minmax"
    calib_model, mins, maxs = _calibration_graph(model, plan.measured, expose)
    # Intra-op threads sleep rather than spin when a binning process or thread wants a core too.
    session = make_session(calib_model.SerializeToString(), threads=threads, level="all", memory_pattern=False,
                           spinning=not expose)
    shapes = _per_image_shapes(calib_model, plan.measured) if expose else {}
    del model, calib_model
    reset_peak_rss()
    started = time.perf_counter()
    if not expose:
        measured_ranges, count = _run_minmax(session, plan.measured, mins, maxs, batches)
    else:
        measured_ranges, count = _run_in_thread(session, plan.measured, mins, maxs, shapes, batches,
                                                            method, percentile, num_bins)
    if count == 0:
        raise ConfigError("calibration received no images")
    ranges = dict(zip(plan.measured, measured_ranges))
    for name, source in plan.derived.items():
        ranges[name] = ranges[source]
    ranges = {name: tuple(map(float, ranges[name])) for name in tensors}
    seconds = time.perf_counter() - started
    result = Calibration(ranges, method, count, seconds, peak_rss_mb(), measured=len(plan.measured),
                         graph_opt=rewrites)
    log.info("calibrated %d tensors (%d measured) on %d images with %s in %.1f s, peak RSS %.0f MiB",
             len(ranges), len(plan.measured), count, method, seconds, result.peak_rss_mb)
    return result


def _per_image_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...] | None]:
    """Per-image shape of each tensor (batch dimension dropped), None where it is not static."""
    shapes = _static_shapes(model, names)
    result: dict[str, tuple[int, ...] | None] = {}
    for name in names:
        dims = shapes.get(name)
        result[name] = tuple(dims[1:]) if dims and all(d is not None for d in dims[1:]) else None
    return result


def _chunks(batches: Iterable[np.ndarray], size: int) -> Iterable[np.ndarray]:
    """The batches cut into at most ``size`` images (exposed activations of a chunk are the calibration's memory)."""
    for batch in batches:
        for start in range(0, len(batch), size):
            yield batch[start:start + size]


def _check_finite(names: list[str], start_image: int, lows: np.ndarray, highs: np.ndarray) -> None:
    if not (np.isfinite(lows).all() and np.isfinite(highs).all()):
        bad = next(n for n, lo, hi in zip(names, lows, highs) if not (np.isfinite(lo) and np.isfinite(hi)))
        raise ModelError(f"activation {bad!r} on the calibration batch starting at image {start_image}: values "
                         f"contain NaN or infinity; the fp32 model is broken")


def _run_minmax(session, measured, mins, maxs, batches):
    runner = _Runner(session, measured, mins, maxs)
    low = np.full(len(measured), np.inf)
    high = np.full(len(measured), -np.inf)
    count = 0
    for batch in batches:
        _, lows, highs, _ = runner.run(batch)
        _check_finite(measured, count, lows, highs)
        np.minimum(low, lows, out=low)
        np.maximum(high, highs, out=high)
        count += len(batch)
    return list(zip(low.tolist(), high.tolist())), count


def _run_in_thread(session, measured, mins, maxs, shapes, batches, method, percentile, num_bins, workers=2):
    """Histograms binned by ``workers`` threads (np.bincount and the float passes release the GIL), each owning a
    share of the tensors balanced by size, while ONNX Runtime computes the next chunk into the other buffer set."""
    collectors = [_collector(method, percentile, num_bins) for _ in measured]
    sizes = [int(np.prod(shapes[n])) if shapes.get(n) is not None else 1 for n in measured]
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(measured)), key=lambda i: -sizes[i]):
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += sizes[i]
    free = threading.Semaphore(2)
    sets: dict[int, list[dict[str, np.ndarray | None]]] = {}

    def buffers(set_index: int, images: int) -> dict[str, np.ndarray | None]:
        free.acquire()  # the binning threads are done with this set
        if images not in sets:
            sets.clear()
            sets[images] = [{n: None if shapes.get(n) is None else np.empty((images,) + shapes[n], np.float32)
                             for n in measured} for _ in range(2)]
        return sets[images][set_index]

    runner = _Runner(session, measured, mins, maxs, buffers)
    queues = [queue.Queue() for _ in range(workers)]
    pending: dict[int, int] = {}
    lock = threading.Lock()
    failure: list[BaseException] = []

    def consume(share: list[int], work: queue.Queue) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            ticket, start_image, lows, highs, values = item
            i = None
            try:
                if not failure:
                    for i in share:
                        collectors[i].add(values[i], float(lows[i]), float(highs[i]))
            except ValueError as exc:  # NaN slips past ReduceMin/ReduceMax; binning it fails
                failure.append(ModelError(f"activation {measured[i]!r} on the calibration batch starting at image "
                                          f"{start_image}: values contain NaN or infinity ({exc}); the fp32 model "
                                          f"is broken"))
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)
            finally:
                with lock:
                    pending[ticket] -= 1
                    done = pending[ticket] == 0
                if done:
                    free.release()

    threads = [threading.Thread(target=consume, args=(share, work), name=f"calibrate-bins-{k}", daemon=True)
               for k, (share, work) in enumerate(zip(shares, queues))]
    for t in threads:
        t.start()
    count = 0
    ticket = 0
    try:
        for batch in _chunks(batches, EXPOSED_BATCH):
            _, lows, highs, values = runner.run(batch)
            _check_finite(measured, count, lows, highs)
            with lock:
                pending[ticket] = workers
            for work in queues:
                work.put((ticket, count, lows, highs, values))
            ticket += 1
            count += len(batch)
            if failure:
                break
    finally:
        for work in queues:
            work.put(None)
        for t in threads:
            t.join()
    if failure:
        raise failure[0]
    return [tuple(map(float, c.range())) for c in collectors], count


def save_ranges(calibration: Calibration, path: Path) -> None:
    """Write ranges as ONNX Runtime's calibration cache (atomically: ORT writes a temporary file and renames)."""
    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in calibration.ranges.items()}
    save_tensors_data(TensorsData(METHODS[calibration.method], data), path)
