"""Empirical bias correction: make every quantized Conv/Gemm's mean output per channel match fp32.

Rounding weights and activations shifts the expected output of a layer, channel by channel; with ReLU6 and
residual Adds these shifts pile up through the network. The correction measures them on calibration images and
moves them into the layer's bias:

1. the fp32 model gives ``E[y_c]``, the mean of every Conv/Gemm output channel (pre-activation);
2. the model is quantized; its QDQ graph, run with optimizations disabled, gives ``E[y_q,c]`` for the same nodes
   (found by node name: the quantizer keeps them), with every upstream layer quantized too;
3. ``bias_c += E[y_c] - E[y_q,c]`` in a copy of the fp32 model, which is quantized again.

Steps 2-3 repeat ``iterations`` times: correcting early layers changes what later layers see, and a second pass
removes what the first left (the residual is reported per pass). Quantizing the corrected copy changes only the
int32 bias initializers (weight scales depend on the weights alone and activation ranges come from the original
calibration), so the corrected int8 model is the ordinary quantizer's output, fused by ONNX Runtime like any other.
The fp32 reference used for evaluation stays the original model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .artifacts import atomic_path
from .errors import ConfigError
from .sensitivity import expose, plain_session

log = logging.getLogger(__name__)

CORRECTABLE = ("Conv", "Gemm")


@dataclass
class BiasCorrection:
    path: Path                      # the corrected fp32 model
    nodes: list[str]                # nodes whose bias was corrected
    # mean over corrected nodes of the mean |E[y] - E[y_q]| per channel, before any and after each pass
    mean_abs_error: list[float] = field(default_factory=list)
    # relative form: the same error divided by the mean |E[y]| per channel of each node
    relative_error: list[float] = field(default_factory=list)
    max_abs_delta: float = 0.0      # largest bias change applied
    num_images: int = 0
    seconds: float = 0.0


def correctable_nodes(model: onnx.ModelProto, op_types: Iterable[str] = CORRECTABLE,
                      skip: Iterable[str] = ()) -> list[str]:
    """Names of Conv/Gemm nodes whose output is one tensor with channels on axis 1 and whose weights are constant."""
    weights = {i.name for i in model.graph.initializer}
    skip = set(skip)
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types or not node.name or node.name in skip:
            continue
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            continue
        names.append(node.name)
    return names


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_outputs(model: onnx.ModelProto, names: list[str]) -> list[str]:
    by_name = {n.name: n for n in model.graph.node}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"bias correction: nodes {missing[:3]} are not in the quantized model")
    return [by_name[n].output[0] for n in names]


class _ChannelMeans:
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


def channel_means(model: onnx.ModelProto | bytes, tensors: list[str], batches: Iterable[np.ndarray],
                  threads: int = 0) -> tuple[list[np.ndarray], int]:
    """Mean of every channel (axis 1) of ``tensors`` over ``batches``, running the graph exactly as written."""
    data = model if isinstance(model, bytes) else expose(model, tensors)
    session = plain_session(data, threads=threads, optimize=False)
    feed = session.get_inputs()[0].name
    acc = [_ChannelMeans() for _ in tensors]
    count = 0
    for batch in batches:
        for a, values in zip(acc, session.run(tensors, {feed: batch})):
            a.add(values)
        count += len(batch)
    if count == 0:
        raise ConfigError("bias correction received no images")
    return [a.mean() for a in acc], count


def _set_bias(model: onnx.ModelProto, node_name: str, delta: np.ndarray) -> float:
    """Add ``delta`` to the bias of ``node_name`` (creating a private bias initializer when the node has none or
    shares one); returns the largest change applied."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == node_name)
    inits = {i.name: i for i in graph.initializer}
    scale = 1.0
    if node.op_type == "Gemm":
        scale = float(_attr(node, "beta", 1.0)) or 1.0
    delta = (delta / scale).astype(np.float32)
    uses = sum(list(n.input).count(node.input[2]) for n in graph.node) if len(node.input) > 2 and node.input[2] \
        else 0
    if len(node.input) > 2 and node.input[2] in inits and uses == 1:
        init = inits[node.input[2]]
        bias = numpy_helper.to_array(init).astype(np.float32)
        if bias.reshape(-1).shape != delta.shape:
            return 0.0  # a broadcast bias (Gemm C of another shape): leave it
        init.CopyFrom(numpy_helper.from_array((bias.reshape(-1) + delta).reshape(bias.shape), init.name))
    else:
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                return 0.0  # a computed bias: not ours to change
            base = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
            if base.shape != delta.shape:
                return 0.0
        else:
            base = np.zeros_like(delta)
        name = f"{node_name}.corrected_bias"
        while name in inits:
            name += "_"
        graph.initializer.append(numpy_helper.from_array(base + delta, name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return float(np.abs(delta).max()) if delta.size else 0.0


def correct_biases(fp32_path: Path, out_path: Path, quantize: Callable[[Path, Path], Path],
                   batches: Callable[[], Iterable[np.ndarray]], iterations: int = 2, threads: int = 0,
                   op_types: Iterable[str] = CORRECTABLE, skip: Iterable[str] = (),
                   scratch: Path | None = None) -> BiasCorrection:
    """Write a bias-corrected copy of ``fp32_path`` to ``out_path``.

    ``quantize(fp32, int8)`` quantizes a model the way the pipeline will (same ranges, same options);
    ``batches()`` yields the calibration images anew on each call.
    """
    if iterations < 1:
        raise ConfigError(f"quant.bias_correction_iterations={iterations} must be >= 1")
    started = time.perf_counter()
    original = onnx.load(str(fp32_path))
    nodes = correctable_nodes(original, op_types, skip)
    if not nodes:
        raise ConfigError(f"bias correction: {fp32_path} has no {'/'.join(op_types)} node with constant weights")
    reference, num_images = channel_means(original, _node_outputs(original, nodes), batches(), threads)
    ref_scale = np.array([float(np.mean(np.abs(r))) + 1e-12 for r in reference])
    corrected = onnx.ModelProto()
    corrected.CopyFrom(original)
    del original
    scratch = Path(scratch) if scratch is not None else out_path.parent
    current = scratch / "bias_corrected.pass0.onnx"
    onnx.save(corrected, str(current))
    result = BiasCorrection(out_path, nodes, num_images=num_images)
    for step in range(iterations + 1):
        int8_path = scratch / f"bias_corrected.pass{step}.int8.onnx"
        quantize(current, int8_path)
        int8 = onnx.load(str(int8_path))
        measured, _ = channel_means(int8, _node_outputs(int8, nodes), batches(), threads)
        del int8
        errors = [r - m for r, m in zip(reference, measured)]
        per_node = np.array([float(np.mean(np.abs(e))) for e in errors])
        result.mean_abs_error.append(float(per_node.mean()))
        result.relative_error.append(float(np.mean(per_node / ref_scale)))
        log.info("bias correction: pass %d, mean |E[y] - E[y_q]| per channel %.4g (relative %.3g)", step,
                 result.mean_abs_error[-1], result.relative_error[-1])
        int8_path.unlink(missing_ok=True)
        if step == iterations:
            break
        for name, error in zip(nodes, errors):
            result.max_abs_delta = max(result.max_abs_delta, _set_bias(corrected, name, error))
        previous, current = current, scratch / f"bias_corrected.pass{step + 1}.onnx"
        onnx.save(corrected, str(current))
        previous.unlink(missing_ok=True)
    with atomic_path(out_path) as tmp:
        onnx.save(corrected, str(tmp))
    current.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    log.info("bias correction: %d nodes, error per channel %s over %d passes in %.1f s", len(nodes),
             " -> ".join(f"{e:.3g}" for e in result.mean_abs_error), iterations, result.seconds)
    return result
