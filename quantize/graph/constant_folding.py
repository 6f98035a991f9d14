"""Shape arithmetic folded to constants: the exporter's ``Shape -> Gather -> ... -> Reshape`` chains exist only
because the batch is dynamic; a dimension that really is the dynamic batch becomes ``0`` or ``-1`` in Reshape."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.graph.onnx_graph import Graph, Report, SymbolicDim, attr, remove_dead


def _is_concrete(value: np.ndarray) -> bool:
    return value.dtype != object


def _has_sym(value: np.ndarray) -> bool:
    return value.dtype == object


def _normalize(value: Any) -> np.ndarray:
    """An evaluated value as an array: object dtype only while it holds a run-time dimension."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    array = np.array(value, dtype=object)
    if any(isinstance(v, SymbolicDim) for v in array.reshape(-1)):
        return array
    return array.astype(np.int64)




def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        q = np.abs(a) // np.abs(b)
        return (np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))  # C truncation, like ONNX Runtime
    return np.divide(a, b).astype(np.result_type(a, b))


def _slice(data: np.ndarray, starts, ends, axes, steps) -> np.ndarray:
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _shape(node, dims: list[Any] | None) -> list[np.ndarray] | None:
    if dims is None or any(d is None for d in dims):
        return None
    if any(isinstance(d, SymbolicDim) for d in dims):
        return [np.array(dims, dtype=object)]
    return [np.array(dims, dtype=np.int64)]


def _axes(node: onnx.NodeProto, values: list[np.ndarray], opset: int) -> list[int] | None:
    """Unsqueeze/Squeeze axes: an attribute before opset 13, an input from 13 on."""
    if opset < 13:
        return attr(node, "axes")
    return list(values[1]) if len(values) > 1 else None


def _gather(node, values, opset, sym):
    x, indices = values
    return None if _has_sym(indices) else [np.take(x, indices.astype(np.int64), axis=attr(node, "axis", 0))]


def _unsqueeze(node, values, opset, sym):
    axes = _axes(node, values, opset)
    if axes is None:
        return None
    out = values[0]
    rank = out.ndim + len(axes)
    for a in sorted(int(a) % rank for a in axes):
        out = np.expand_dims(out, a)
    return [out]


def _squeeze(node, values, opset, sym):
    x, axes = values[0], _axes(node, values, opset)
    return [np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes) if axes is not None else None)]


def _concat(node, values, opset, sym):
    return [np.concatenate([v.astype(object) if sym else v for v in values], axis=attr(node, "axis"))]


def _cast(node, values, opset, sym):
    x, to = values[0], helper.tensor_dtype_to_np_dtype(attr(node, "to"))
    if _has_sym(x):  # a symbolic dimension stays one through an integer cast
        return [x] if np.issubdtype(to, np.integer) else None
    return [x.astype(to)]


def _reshape(node, values, opset, sym):
    x = values[0]
    shape = [int(d) for d in values[1]]
    return [x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])]


def _constant_of_shape(node, values, opset, sym):
    fill = attr(node, "value")
    fill = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, dtype=np.float32)
    return [np.full([int(d) for d in values[0]], fill.reshape(-1)[0], dtype=fill.dtype)]


def _slice_node(node, values, opset, sym):
    if sym and any(_has_sym(v) for v in values[1:]):
        return None
    if opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = values[1], values[2]
        axes = values[3] if len(values) > 3 and values[3] is not None else list(range(len(starts)))
        steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    return [_slice(values[0], starts, ends, axes, steps)]


def _arithmetic(function):
    def fold(node, values, opset, sym):
        a, b = values
        return [np.asarray(function(a, b)).astype(np.result_type(a, b))]
    return fold


def _unary(function):
    return lambda node, values, opset, sym: [function(values[0])]


# op -> (fold(node, input values, opset, any input symbolic), whether it can take symbolic dimensions)
_FOLDERS = {
    "Gather": (_gather, True), "Unsqueeze": (_unsqueeze, True), "Squeeze": (_squeeze, True),
    "Concat": (_concat, True), "Cast": (_cast, True), "Identity": (lambda n, v, o, s: [v[0]], True),
    "Transpose": (lambda n, v, o, s: [np.transpose(v[0], attr(n, "perm"))], True), "Slice": (_slice_node, True),
    "Reshape": (_reshape, False), "ConstantOfShape": (_constant_of_shape, False),
    "Add": (_arithmetic(np.add), False), "Sub": (_arithmetic(np.subtract), False),
    "Mul": (_arithmetic(np.multiply), False), "Div": (_arithmetic(_int_div), False),
    "Floor": (_unary(np.floor), False), "Ceil": (_unary(np.ceil), False), "Sqrt": (_unary(np.sqrt), False),
    "Neg": (_unary(np.negative), False), "Abs": (_unary(np.abs), False),
    "Range": (lambda n, v, o, s: [np.arange(v[0].item(), v[1].item(), v[2].item()).astype(v[0].dtype)], False),
    "Equal": (lambda n, v, o, s: [np.equal(v[0], v[1])], False),
    "Where": (lambda n, v, o, s: [np.where(*v)], False),
}


def _evaluate(node: onnx.NodeProto, values: list[np.ndarray | None], shapes: dict[str, list[Any]],
              opset: int) -> list[np.ndarray] | None:
    """Outputs of a shape-arithmetic node from known inputs (object arrays may hold SymbolicDim), or None."""
    if node.op_type == "Shape":
        return _shape(node, shapes.get(node.input[0]))
    if any(v is None for v in values) or node.op_type not in _FOLDERS:
        return None
    fold, takes_symbols = _FOLDERS[node.op_type]
    sym = any(_has_sym(v) for v in values)
    if sym and not takes_symbols:
        return None
    return fold(node, values, opset, sym)


_FOLDABLE = {"Shape", *_FOLDERS}
_MAX_FOLDED_ELEMENTS = 1 << 16  # shape arithmetic and pads: never a big float computation


def _fold_constants_once(g: Graph, report: Report) -> bool:
    shapes = g.shapes()
    known: dict[str, np.ndarray] = dict(g.inits)
    changed = False
    kept = []
    for node in g.nodes:
        if node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx"):
            inputs = [known.get(name) if name else None for name in node.input]
            if node.op_type == "Shape" or all(v is not None for v in inputs):
                try:
                    outputs = _evaluate(node, inputs, shapes, g.opset)
                    outputs = None if outputs is None else [_normalize(v) for v in outputs]
                except Exception:  # an op variant this folder does not model: leave the node alone
                    outputs = None
                if outputs is not None:
                    for name, value in zip(node.output, outputs):
                        known[name] = value
                    if all(_is_concrete(v) and v.size <= _MAX_FOLDED_ELEMENTS for v in outputs) \
                            and not any(o in g.output_names for o in node.output):
                        for name, value in zip(node.output, outputs):
                            g.set_init(name, value)
                        report.add(f"folded_{node.op_type}")
                        changed = True
                        continue
        if node.op_type == "Reshape" and node.input[1] not in g.inits:
            target = known.get(node.input[1])
            if target is not None and _has_sym(target):
                data_shape = shapes.get(node.input[0])
                static = _static_reshape_target(target, data_shape)
                if static is not None:
                    name = g.fresh(node.input[1])
                    g.set_init(name, static)
                    node.input[1] = name
                    report.add("reshape_shape_made_constant")
                    changed = True
        kept.append(node)
    g.nodes = kept
    return changed


def _static_reshape_target(target: np.ndarray, data_shape: list[Any] | None) -> np.ndarray | None:
    """A constant Reshape target for one holding run-time dimensions: a dimension equal to the input's at the same
    position becomes 0 (copy it); one other unknown becomes -1 (infer it)."""
    out = []
    unknown = 0
    for i, d in enumerate(target):
        if isinstance(d, SymbolicDim):
            if data_shape is not None and i < len(data_shape) and data_shape[i] == d:
                out.append(0)
            else:
                unknown += 1
                out.append(-1)
        else:
            d = int(d)
            if d == 0:  # a literal zero would mean "copy" too; keep the meaning unambiguous
                return None
            out.append(d)
    if unknown > 1 or (unknown == 1 and -1 in [int(d) for d in target if not isinstance(d, SymbolicDim)]):
        return None
    return np.array(out, dtype=np.int64)


def fold_constants(g: Graph, report: Report) -> None:
    for _ in range(200):  # each round can unlock the shapes of the next Reshape
        if not _fold_constants_once(g, report):
            break
        remove_dead(g)

