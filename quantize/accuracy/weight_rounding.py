"""Weight rounding that minimizes each layer's output error (GPTQ), applied to the int8 model's weights.

Rounding every weight to the nearest int8 level is optimal for the weights but not for the layer's output: on
EfficientNet-Lite0 the weights alone, rounded to nearest per channel (~42 dB SQNR each), bring the logits down to
19 dB SQNR, while all activations quantized with fp32 weights keep 25 dB. GPTQ (Frantar et al., 2022, after
Optimal Brain Quantization) rounds the weights of a layer one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse of ``H = sum x x^T`` over the layer's
input patches on calibration images. That minimizes ``||W x - W_q x||^2`` on those inputs instead of
``||W - W_q||^2``.

The scales and zero points the quantizer chose are kept; only the int8 weight values change, so the model stays
exactly as fusable as before. Conv layers (dense: one ``H`` per layer over ``C*kh*kw`` patch columns; depthwise:
one small ``H`` per channel) and, on request, Gemm layers are handled. ``H`` comes from the fp32 model's inputs to
each layer, accumulated streaming over batches (memory: one ``d x d`` matrix per layer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from quantize.core.errors import ConfigError
from quantize.accuracy.sensitivity import expose
from quantize.core.runtime import make_session
from quantize.graph.onnx_graph import attr

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    name: str
    kind: str                  # dense | depthwise | gemm
    input: str                 # fp32 input tensor
    weight: np.ndarray         # fp32 weights as (rows, cols) (depthwise: (channels, kh*kw))
    shape: tuple               # original int8 initializer shape
    q_name: str                # int8 weight initializer
    scale: np.ndarray          # per row
    zero_point: np.ndarray     # per row
    qmin: int
    qmax: int
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)
    gemm_trans: bool = False
    hessian: np.ndarray | None = None
    samples: int = 0


@dataclass
class WeightRounding:
    layers: int = 0
    skipped: list[str] = field(default_factory=list)
    # per layer, relative output error ||W x - W_q x||^2 / ||W x||^2 (from H) with nearest rounding and after GPTQ
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    output_error_nearest_db: float = 0.0  # mean over layers of the layer output SQNR, nearest rounding
    output_error_gptq_db: float = 0.0     # the same after GPTQ
    changed_fraction: float = 0.0         # share of weights whose int8 value changed
    num_images: int = 0
    seconds: float = 0.0


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _find_layers(fp32: onnx.ModelProto, int8: onnx.ModelProto, op_types: Iterable[str]) -> tuple[list[_Layer], list[str]]:
    f_inits = {i.name: i for i in fp32.graph.initializer}
    q_inits = _initializers(int8)
    f_nodes = {n.name: n for n in fp32.graph.node}
    dq_by_out = {n.output[0]: n for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    layers, skipped = [], []
    for node in int8.graph.node:
        if node.op_type not in op_types or node.name not in f_nodes or len(node.input) < 2:
            continue
        dq = dq_by_out.get(node.input[1])
        f_node = f_nodes[node.name]
        if dq is None or dq.input[0] not in q_inits or f_node.input[1] not in f_inits:
            continue  # an fp32 (excluded) node or computed weights
        q = numpy_helper.to_array(q_inits[dq.input[0]])
        if q.dtype not in (np.int8, np.uint8):
            continue
        w = numpy_helper.to_array(f_inits[f_node.input[1]]).astype(np.float64)
        scale = numpy_helper.to_array(q_inits[dq.input[1]]).astype(np.float64).reshape(-1)
        zp = (numpy_helper.to_array(q_inits[dq.input[2]]).astype(np.float64).reshape(-1)
              if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale))
        info = np.iinfo(q.dtype)
        qmin, qmax = (int(info.min) + 1, int(info.max)) if q.dtype == np.int8 else (int(info.min), int(info.max))
        if q.shape != w.shape or not _matches(w, q, dq, q_inits):
            skipped.append(node.name)  # the quantized graph differs from this fp32 model here (rewritten weights)
            continue
        node = f_node  # attributes and input as in the fp32 model the statistics come from
        if node.op_type == "Conv":
            if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or \
                    any(d != 1 for d in attr(node, "dilations", [1, 1])) or w.ndim != 4:
                skipped.append(node.name)
                continue
            group = attr(node, "group", 1)
            axis = attr(dq, "axis", 1)
            if scale.size not in (1, w.shape[0]) or (scale.size > 1 and axis != 0):
                skipped.append(node.name)
                continue
            rows = w.shape[0]
            common = dict(input=f_node.input[0], shape=q.shape, q_name=dq.input[0],
                          scale=np.broadcast_to(scale, (rows,)).copy(), zero_point=np.broadcast_to(zp, (rows,)).copy(),
                          qmin=qmin, qmax=qmax, kernel=tuple(w.shape[2:]), strides=tuple(attr(node, "strides", [1, 1])),
                          pads=tuple(attr(node, "pads", [0, 0, 0, 0])))
            if group == 1:
                layers.append(_Layer(node.name, "dense", weight=w.reshape(rows, -1), **common))
            elif group == w.shape[0] and w.shape[1] == 1:
                layers.append(_Layer(node.name, "depthwise", weight=w.reshape(rows, -1), **common))
            else:
                skipped.append(node.name)
        elif node.op_type == "Gemm":
            trans_b = bool(attr(node, "transB", 0))
            if attr(node, "transA", 0) or w.ndim != 2:
                skipped.append(node.name)
                continue
            w_rows = w if trans_b else w.T  # (out, in)
            axis = attr(dq, "axis", 1)
            out_axis = 0 if trans_b else 1
            if scale.size not in (1, w_rows.shape[0]) or (scale.size > 1 and axis != out_axis):
                skipped.append(node.name)
                continue
            rows = w_rows.shape[0]
            layers.append(_Layer(node.name, "gemm", f_node.input[0], w_rows.copy(), q.shape, dq.input[0],
                                 np.broadcast_to(scale, (rows,)).copy(), np.broadcast_to(zp, (rows,)).copy(),
                                 qmin, qmax, gemm_trans=not trans_b))
    return layers, skipped


def _matches(w: np.ndarray, q: np.ndarray, dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether the int8 weights are these fp32 weights rounded (so GPTQ may replace them)."""
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    if scale.size > 1:
        shape = [1] * w.ndim
        shape[attr(dq, "axis", 1)] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.ndim(zp) else zp
    deq = (q.astype(np.float64) - zp) * scale
    return bool(np.all(np.abs(deq - w) <= 0.5001 * scale + 1e-12))


def _patches(x: np.ndarray, layer: _Layer) -> np.ndarray:
    """Input patches of a conv: dense -> (P, C*kh*kw); depthwise -> (C, P, kh*kw)."""
    t, l, b, r = layer.pads
    if any(layer.pads):
        x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    kh, kw = layer.kernel
    sh, sw = layer.strides
    if (kh, kw) == (1, 1):
        view = x[:, :, ::sh, ::sw][..., None, None]
    else:
        view = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    n, c, ho, wo = view.shape[:4]
    if layer.kind == "dense":
        return np.ascontiguousarray(view.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c * kh * kw)
    return np.ascontiguousarray(view.transpose(1, 0, 2, 3, 4, 5)).reshape(c, n * ho * wo, kh * kw)


def _accumulate(layer: _Layer, x: np.ndarray) -> None:
    x = x.astype(np.float32, copy=False)
    if layer.kind == "gemm":
        cols = x.reshape(x.shape[0], -1)
        part, count = cols.T @ cols, cols.shape[0]
    elif layer.kind == "dense":
        cols = _patches(x, layer)
        part, count = cols.T @ cols, cols.shape[0]
    else:
        cols = _patches(x, layer)
        part, count = np.matmul(cols.transpose(0, 2, 1), cols), cols.shape[1]
    part = part.astype(np.float64)
    layer.hessian = part if layer.hessian is None else layer.hessian + part
    layer.samples += count


def _round(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.round(w / scale + zp), qmin, qmax)


def _relative_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """||(W - Wq) x||^2 / ||W x||^2 summed over the inputs behind ``h`` (batched over a leading axis if 3-d)."""
    d = w - wq
    if h.ndim == 2:
        num = np.einsum("ri,ij,rj->", d, h, d)
        den = np.einsum("ri,ij,rj->", w, h, w)
    else:
        num = np.einsum("ci,cij,cj->", d, h, d)
        den = np.einsum("ci,cij,cj->", w, h, w)
    return float(num / den) if den > 0 else 0.0


def _gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
          damp: float, block: int = 128) -> np.ndarray:
    """Integer weights for ``w`` (rows, cols) given ``h`` (cols, cols), columns in descending order of ``diag(h)``."""
    w = w.copy()
    h = h.copy()
    dead = np.diag(h) <= 0  # inputs that were always zero: rounded to nearest, nothing to compensate
    live_mean = float(np.mean(np.diag(h)[~dead])) if (~dead).any() else 1.0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    inverse_order = np.argsort(order)
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += damp * live_mean
    u = _inverse_cholesky_upper(h)
    rows, cols = w.shape
    q = np.zeros_like(w)
    s, z = scale[:, None], zp[:, None]
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        wb = w[:, start:stop].copy()
        errors = np.zeros_like(wb)
        ub = u[start:stop, start:stop]
        for j in range(stop - start):
            col = wb[:, j]
            qc = np.clip(np.round(col / s[:, 0] + z[:, 0]), qmin, qmax)
            q[:, start + j] = qc
            err = (col - (qc - z[:, 0]) * s[:, 0]) / ub[j, j]
            wb[:, j + 1:] -= np.outer(err, ub[j, j + 1:])
            errors[:, j] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return q[:, inverse_order]


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``U^T U = H^-1`` (GPTQ's ordering of the inverse Hessian)."""
    damp = 0.0
    for _ in range(6):
        try:
            hinv = np.linalg.inv(h + damp * np.eye(len(h)))
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            damp = max(damp * 10, 1e-6 * float(np.mean(np.diag(h))))
    raise ConfigError("weight rounding: a layer's input statistics are singular even after damping")


def _gptq_depthwise(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
                    damp: float) -> np.ndarray:
    """Per channel GPTQ for depthwise weights ``w`` (channels, k) with per-channel ``h`` (channels, k, k)."""
    w = w.copy()
    h = h.copy()
    channels, k = w.shape
    diag = np.einsum("cii->ci", h)
    mean = diag.mean(axis=1, keepdims=True)
    dead_channel = mean[:, 0] <= 0
    h[dead_channel] = np.eye(k)
    diag = np.einsum("cii->ci", h)
    h[:, np.arange(k), np.arange(k)] += damp * diag.mean(axis=1, keepdims=True) + 1e-12
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(hinv).transpose(0, 2, 1)
    q = np.zeros_like(w)
    for j in range(k):
        col = w[:, j]
        qc = np.clip(np.round(col / scale + zp), qmin, qmax)
        q[:, j] = qc
        err = (col - (qc - zp) * scale) / u[:, j, j]
        w[:, j + 1:] -= err[:, None] * u[:, j, j + 1:]
    return q


def round_weights(fp32: onnx.ModelProto, int8: onnx.ModelProto, batches: Iterable[np.ndarray],
                  op_types: Iterable[str] = ("Conv",), damp: float = 0.01, threads: int = 0) -> WeightRounding:
    """Replace the int8 weights of ``int8`` (in place) by GPTQ's choice; ``fp32`` supplies weights and inputs."""
    started = time.perf_counter()
    layers, skipped = _find_layers(fp32, int8, tuple(op_types))
    result = WeightRounding(skipped=skipped)
    if not layers:
        return result
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    session = make_session(expose(fp32, inputs), threads=threads, level="disable")
    feed = session.get_inputs()[0].name
    by_input: dict[str, list[_Layer]] = {}
    for layer in layers:
        by_input.setdefault(layer.input, []).append(layer)
    for batch in batches:
        for name, values in zip(inputs, session.run(inputs, {feed: batch})):
            for layer in by_input[name]:
                _accumulate(layer, values)
        result.num_images += len(batch)
    if result.num_images == 0:
        raise ConfigError("weight rounding received no images")
    q_inits = _initializers(int8)
    changed = total = 0
    nearest_db, gptq_db = [], []
    for layer in layers:
        w, h = layer.weight, layer.hessian
        nearest = _round(w, layer.scale[:, None], layer.zero_point[:, None], layer.qmin, layer.qmax)
        if layer.kind == "depthwise":
            q = _gptq_depthwise(w, h, layer.scale, layer.zero_point, layer.qmin, layer.qmax, damp)
        else:
            q = _gptq(w, h, layer.scale, layer.zero_point, layer.qmin, layer.qmax, damp)
        deq = lambda ints: (ints - layer.zero_point[:, None]) * layer.scale[:, None]  # noqa: E731
        e_near, e_gptq = _relative_error(w, deq(nearest), h), _relative_error(w, deq(q), h)
        if e_gptq > e_near:  # never worse than nearest on the calibration inputs
            q, e_gptq = nearest, e_near
        db = lambda e: 10 * np.log10(1 / e) if e > 0 else 99.0  # noqa: E731
        result.per_layer[layer.name] = {"nearest_db": float(db(e_near)), "gptq_db": float(db(e_gptq)),
                                        "samples": layer.samples, "columns": int(w.shape[1])}
        nearest_db.append(db(e_near))
        gptq_db.append(db(e_gptq))
        changed += int((q != nearest).sum())
        total += q.size
        init = q_inits[layer.q_name]
        dtype = numpy_helper.to_array(init).dtype
        ints = q.T if layer.gemm_trans else q
        init.CopyFrom(numpy_helper.from_array(ints.reshape(layer.shape).astype(dtype), init.name))
        layer.hessian = None
    result.layers = len(layers)
    result.output_error_nearest_db = float(np.mean(nearest_db))
    result.output_error_gptq_db = float(np.mean(gptq_db))
    result.changed_fraction = changed / max(total, 1)
    result.seconds = time.perf_counter() - started
    log.info("weight rounding (GPTQ): %d layers on %d images in %.1f s; mean layer output SQNR %.1f -> %.1f dB; "
             "%.1f%% of weights moved off nearest", result.layers, result.num_images, result.seconds,
             result.output_error_nearest_db, result.output_error_gptq_db, 100 * result.changed_fraction)
    return result
