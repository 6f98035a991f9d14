"""Bias correction: make every quantized Conv/Gemm's mean output per channel match fp32, layer after layer.

Rounding weights and activations shifts the expected output of a layer, channel by channel, and with ReLU6 and
residual Adds these shifts pile up through the network. The correction measures them on calibration images and
moves them into the layer's bias (the "empirical" bias correction; NNCF's full BiasCorrection does the same):

1. the fp32 model gives ``E[y_c]``, the mean of every Conv/Gemm output channel (pre-activation);
2. the int8 QDQ model runs with optimizations disabled (quantization emulated in float), cut into segments that
   each end at one Conv/Gemm, in graph order. Each segment runs on every calibration image,
   ``delta_c = E[y_c] - E[y_q,c]`` is measured at its Conv/Gemm, the node's int32 bias moves by ``delta``
   (rounded to the bias grid, ``input scale * weight scale``), and the segment's stored output moves by the same
   amount before the next segment reads it. So every layer is corrected for the error of the layers before it
   *after* their correction. Correcting all layers at once from one measurement over-corrects (each layer also
   compensates an upstream error that is being removed): on EfficientNet-Lite0 that made the error 16x worse.
3. Only the int32 bias initializers of the int8 model change; ONNX Runtime fuses it like any other int8 model, and
   the fp32 reference used for evaluation stays the original model.

Only the tensors crossing the current cut are held in memory, for every calibration image (the price of going
layer by layer with one pass over the network); the number of images bounds it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.core.errors import ConfigError
from quantize.core.memory import peak_rss_mb
from quantize.accuracy.sensitivity import expose
from quantize.core.runtime import make_session
from quantize.graph.onnx_graph import attr, constant_nodes_to_initializers

log = logging.getLogger(__name__)

CORRECTABLE = ("Conv", "Gemm")
NP_TO_ONNX = {np.dtype(k): v for k, v in ((np.float32, onnx.TensorProto.FLOAT), (np.uint8, onnx.TensorProto.UINT8),
                                          (np.int8, onnx.TensorProto.INT8), (np.int64, onnx.TensorProto.INT64),
                                          (np.int32, onnx.TensorProto.INT32))}


@dataclass
class BiasCorrection:
    nodes: list[str]                # nodes whose bias was corrected
    # mean over corrected nodes of the mean |E[y] - E[y_q]| per channel, as a fraction of the mean |E[y]| per
    # channel of that node: for the quantized original, and for the quantized corrected model
    relative_error_before: float = 0.0
    relative_error_after: float = 0.0
    mean_abs_error_before: float = 0.0  # the same without normalization (output units)
    mean_abs_error_after: float = 0.0
    max_abs_delta: float = 0.0      # largest bias change applied
    saturated_channels: int = 0     # channels left alone: their int32 bias was clamped by the quantizer
    num_images: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    per_node: dict[str, dict[str, float]] = field(default_factory=dict)  # node -> before/after/delta


def correctable_nodes(model: onnx.ModelProto, op_types: Iterable[str] = CORRECTABLE,
                      skip: Iterable[str] = ()) -> list[str]:
    """Names of Conv/Gemm nodes with constant weights whose output has its channels on axis 1."""
    weights = {i.name for i in model.graph.initializer}
    op_types, skip = set(op_types), set(skip)
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types or not node.name or node.name in skip:
            continue
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        names.append(node.name)
    return names


def _node_outputs(model: onnx.ModelProto, names: list[str]) -> list[str]:
    by_name = {n.name: n for n in model.graph.node}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"bias correction: nodes {missing[:3]} are not in the quantized model")
    return [by_name[n].output[0] for n in names]


class ChannelMeans:
    """Running per-channel sums of one tensor (channels on axis 1)."""

    def __init__(self):
        self.sum: np.ndarray | None = None
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        axes = tuple(i for i in range(values.ndim) if i != 1)
        part = values.sum(axis=axes, dtype=np.float64)
        self.sum = part if self.sum is None else self.sum + part
        self.count += values.size // values.shape[1]

    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


def channel_means(model: onnx.ModelProto, tensors: list[str], batches: Iterable[np.ndarray],
                  threads: int = 0) -> tuple[list[np.ndarray], int]:
    """Mean of every channel (axis 1) of ``tensors`` over ``batches``, running the graph exactly as written."""
    session = make_session(expose(model, tensors), threads=threads, level="disable")
    feed = session.get_inputs()[0].name
    acc = [ChannelMeans() for _ in tensors]
    count = 0
    for batch in batches:
        for a, values in zip(acc, session.run(tensors, {feed: batch})):
            a.add(values)
        count += len(batch)
    if count == 0:
        raise ConfigError("bias correction received no images")
    return [a.mean() for a in acc], count


def _segments(nodes: list[onnx.NodeProto], targets: set[str]) -> list[list[onnx.NodeProto]]:
    """Nodes in graph order, cut after each target; nodes after the last target are not needed."""
    segments, current = [], []
    for node in nodes:
        current.append(node)
        if node.name in targets:
            segments.append(current)
            current = []
    return segments


class _SegmentRunner:
    """Runs a graph segment by segment, keeping every tensor that a later segment reads, for every batch."""

    def __init__(self, model: onnx.ModelProto, segments: list[list[onnx.NodeProto]], threads: int):
        self.model, self.segments, self.threads = model, segments, threads
        self.initializers = {i.name: i for i in model.graph.initializer}
        produced_in: dict[str, int] = {}
        for k, seg in enumerate(segments):
            for node in seg:
                for out in node.output:
                    produced_in[out] = k
        self.last_use: dict[str, int] = defaultdict(lambda: -1)
        self.inputs: list[list[str]] = []
        for k, seg in enumerate(segments):
            made = {o for n in seg for o in n.output}
            needed = []
            for node in seg:
                for name in node.input:
                    if name and name not in made and name not in self.initializers and name not in needed:
                        needed.append(name)
                        self.last_use[name] = max(self.last_use[name], k)
            self.inputs.append(needed)
        self.outputs: list[list[str]] = []
        for k, seg in enumerate(segments):
            outs = [o for n in seg for o in n.output if o and self.last_use[o] > k]
            self.outputs.append(outs)

    def session(self, k: int, dtypes: dict[str, np.dtype], extra_outputs: list[str]):
        seg = self.segments[k]
        used = {name for node in seg for name in node.input}
        graph = helper.make_graph(
            list(seg), f"segment{k}",
            [helper.make_tensor_value_info(n, NP_TO_ONNX[dtypes[n]], None) for n in self.inputs[k]],
            [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
             for n in dict.fromkeys(self.outputs[k] + extra_outputs)],
            [self.initializers[n] for n in used if n in self.initializers])
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        return make_session(sub.SerializeToString(), threads=self.threads, level="disable")


def _bias_of(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[onnx.TensorProto, np.ndarray | None] | None:
    """The initializer holding ``node``'s bias and, for an int32 bias behind DequantizeLinear, its scale per
    channel (None for a float bias). None when the bias is absent, computed or shared."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    inits = {i.name: i for i in model.graph.initializer}
    readers = sum(list(n.input).count(node.input[2]) for n in model.graph.node)
    if node.input[2] in inits:
        return (inits[node.input[2]], None) if readers == 1 else None
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[2]), None)
    if dq is None or dq.input[0] not in inits or readers != 1:
        return None
    values = inits[dq.input[0]]
    if numpy_helper.to_array(values).dtype != np.int32 or dq.input[1] not in inits:
        return None
    return values, numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)


def _shift_bias(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray) -> np.ndarray:
    """Move ``node``'s bias by ``delta`` (on its own grid); returns the shift really applied, per channel."""
    found = _bias_of(model, node)
    if found is None:
        return np.zeros_like(delta)
    init, scale = found
    if node.op_type == "Gemm":
        beta = float(attr(node, "beta", 1.0)) or 1.0
    else:
        beta = 1.0
    values = numpy_helper.to_array(init)
    if values.size != delta.size:
        return np.zeros_like(delta)
    if scale is None:
        new = values.astype(np.float32).reshape(-1) + (delta / beta).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(new.reshape(values.shape).astype(values.dtype), init.name))
        return (new - values.reshape(-1)) * beta
    steps = np.round(delta / beta / scale)
    info = np.iinfo(np.int32)
    old = values.reshape(-1).astype(np.int64)
    # a channel whose bias the quantizer clamped to the int32 limits (a near-zero weight scale) cannot be moved
    steps[(old <= info.min) | (old >= info.max)] = 0
    new = np.clip(old + steps, info.min, info.max)
    init.CopyFrom(numpy_helper.from_array(new.astype(np.int32).reshape(values.shape), init.name))
    return (new - old) * scale * beta


def _saturated(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | None:
    """Channels whose int32 bias sits at the int32 limits (clamped by the quantizer), or None."""
    found = _bias_of(model, node)
    if found is None or found[1] is None:
        return None
    values = numpy_helper.to_array(found[0]).reshape(-1).astype(np.int64)
    info = np.iinfo(np.int32)
    return (values <= info.min) | (values >= info.max)


def correct_biases(fp32: onnx.ModelProto, int8: onnx.ModelProto, batches: Callable[[], Iterable[np.ndarray]],
                   threads: int = 0, op_types: Iterable[str] = CORRECTABLE, skip: Iterable[str] = ()
                   ) -> BiasCorrection:
    """Correct the biases of ``int8`` in place so its Conv/Gemm outputs have ``fp32``'s mean per channel.

    ``batches()`` yields the calibration images (float32 NCHW) anew on each call.
    """
    started = time.perf_counter()
    candidates = set(correctable_nodes(fp32, op_types, skip))
    int8_nodes = {n.name: n for n in int8.graph.node}
    nodes = [n.name for n in int8.graph.node if n.name in candidates and _bias_of(int8, n) is not None]
    if not nodes:
        raise ConfigError(f"bias correction: no {'/'.join(op_types)} node with a bias to correct")
    reference, num_images = channel_means(fp32, _node_outputs(fp32, nodes), batches(), threads)
    reference = dict(zip(nodes, reference))
    before, _ = channel_means(int8, _node_outputs(int8, nodes), batches(), threads)
    before = dict(zip(nodes, before))

    work = onnx.ModelProto()
    work.CopyFrom(int8)
    work = constant_nodes_to_initializers(work)
    segments = _segments(list(work.graph.node), set(nodes))
    runner = _SegmentRunner(work, segments, threads)
    graph_input = work.graph.input[0].name
    store: dict[str, list[np.ndarray]] = {graph_input: [np.ascontiguousarray(b) for b in batches()]}
    num_batches = len(store[graph_input])
    deltas: dict[str, np.ndarray] = {}
    for k, segment in enumerate(segments):
        target = segment[-1]
        out = target.output[0]
        session = runner.session(k, {n: store[n][0].dtype for n in runner.inputs[k]}, [out])
        names = list(dict.fromkeys(runner.outputs[k] + [out]))
        results: dict[str, list[np.ndarray]] = {n: [] for n in names}
        means = ChannelMeans()
        for b in range(num_batches):
            for n, v in zip(names, session.run(names, {n: store[n][b] for n in runner.inputs[k]})):
                if n == out:
                    means.add(v)
                if n in runner.outputs[k]:
                    results[n].append(v)
        applied = _shift_bias(int8, int8_nodes[target.name], reference[target.name] - means.mean())
        deltas[target.name] = applied
        if out in runner.outputs[k]:  # later segments read the corrected output
            shift = applied.astype(np.float32).reshape([1, -1] + [1] * (results[out][0].ndim - 2))
            for v in results[out]:
                v += shift
        for n in runner.outputs[k]:
            store[n] = results[n]
        for n in [n for n in store if runner.last_use[n] <= k]:
            del store[n]
    del store, work

    after, _ = channel_means(int8, _node_outputs(int8, nodes), batches(), threads)
    after = dict(zip(nodes, after))
    result = BiasCorrection(nodes, num_images=num_images)
    rel_b, rel_a, abs_b, abs_a = [], [], [], []
    for name in nodes:
        # channels whose bias the quantizer clamped are left out: no bias can fix them (they are dead filters with a
        # large negative bias in practice, zero after the activation either way)
        saturated = _saturated(int8, int8_nodes[name])
        keep = ~saturated if saturated is not None and saturated.size == reference[name].size else \
            np.ones(reference[name].size, bool)
        result.saturated_channels += int((~keep).sum())
        ref, bef, aft = reference[name][keep], before[name][keep], after[name][keep]
        scale = float(np.mean(np.abs(ref))) + 1e-12 if ref.size else 1.0
        eb = float(np.mean(np.abs(ref - bef))) if ref.size else 0.0
        ea = float(np.mean(np.abs(ref - aft))) if ref.size else 0.0
        result.per_node[name] = {"before": eb, "after": ea, "max_delta": float(np.abs(deltas[name]).max())}
        abs_b.append(eb)
        abs_a.append(ea)
        rel_b.append(eb / scale)
        rel_a.append(ea / scale)
        result.max_abs_delta = max(result.max_abs_delta, result.per_node[name]["max_delta"])
    result.mean_abs_error_before, result.mean_abs_error_after = float(np.mean(abs_b)), float(np.mean(abs_a))
    result.relative_error_before, result.relative_error_after = float(np.mean(rel_b)), float(np.mean(rel_a))
    result.seconds = time.perf_counter() - started
    result.peak_rss_mb = peak_rss_mb()
    log.info("bias correction: %d nodes on %d images in %.1f s; mean per-channel output error %.4g -> %.4g "
             "(relative %.3g -> %.3g)", len(nodes), num_images, result.seconds, result.mean_abs_error_before,
             result.mean_abs_error_after, result.relative_error_before, result.relative_error_after)
    return result
