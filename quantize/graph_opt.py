"""fp32-exact graph rewrites applied before calibration and quantization.

The TorchScript exporter leaves work in the graph that ONNX Runtime's int8 path handles badly:

- shape arithmetic (``Shape -> Gather -> Div -> Cast -> Unsqueeze -> Concat -> Reshape``, ``Slice`` bounds computed
  from ``Shape``) that exists only because the batch is dynamic. It keeps every data-movement op in float between
  DequantizeLinear/QuantizeLinear pairs and stops layout optimizations. All of it is folded to constants here; a
  dimension that really is the dynamic batch becomes ``0`` (copy the input dimension) or ``-1`` in Reshape.
- ``Constant`` nodes, which the quantizer takes for activations (a ``Pad`` value got its own QuantizeLinear);
  they become initializers. ``Identity`` nodes on weights (the exporter deduplicates equal biases, for example
  the all-zero biases of a randomly initialised network, through Identity) stop ONNX Runtime from fusing
  DequantizeLinear -> Conv -> QuantizeLinear; they are removed.
- an explicit zero ``Pad`` before a ``Conv`` (TensorFlow "same" padding), which has no int8 kernel fused with the
  convolution: it is folded into the convolution's own ``pads``.
- the ShuffleNet channel shuffle followed by the split of the next unit (Reshape -> Transpose(5-D) -> Reshape -> two
  Slices): a fixed permutation of channels, which ONNX Runtime can only run in the channels-first layout, so every
  unit of the int8 model went channels-last -> first -> last through Transposes around it. ``shuffle_opt`` tracks
  where every channel comes from through the Concats, shuffles and Slices, and has each reader take its channels
  straight from the tensors that computed them: one Split per such tensor and one Concat per reader, in an order
  a convolution absorbs by permuting its weights (a depthwise convolution passes the order on to the convolutions
  after it). Split and Concat on channels run channels-last, so the int8 model keeps one layout end to end.

Every rewrite keeps the fp32 function exactly (tests compare the rewritten and original models' outputs).
Tensor names of activations that survive are kept, so ranges computed on the rewritten graph name the same tensors.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

# Bumped whenever a rewrite changes which tensors exist or what they hold: calibration ranges computed on the
# graph of one version name the tensors of that version.
VERSION = 1


class _Sym:
    """A dimension known only at run time (the dynamic batch), by its dim_param."""

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Sym) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("sym", self.name))

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _is_concrete(value: np.ndarray) -> bool:
    return value.dtype != object


def _has_sym(value: np.ndarray) -> bool:
    return value.dtype == object


def _normalize(value: Any) -> np.ndarray:
    """An evaluated value as an array: object dtype only while it holds a run-time dimension."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    array = np.array(value, dtype=object)
    if any(isinstance(v, _Sym) for v in array.reshape(-1)):
        return array
    return array.astype(np.int64)


@dataclass
class Report:
    """What the rewrites did, for logs and reports."""
    counts: Counter = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class _Graph:
    """A mutable view of a GraphProto: nodes in order, initializers as numpy arrays."""

    def __init__(self, model: onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # passes edit nodes in place: never the caller's
        self.model = model = copy
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.inits: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.init_protos: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        self.inputs = list(graph.input)
        self.outputs = list(graph.output)
        self.output_names = {o.name for o in graph.output}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self._counter = 0

    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}__gopt{self._counter}"

    def set_init(self, name: str, value: np.ndarray) -> None:
        self.inits[name] = value
        self.init_protos.pop(name, None)

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {out: node for node in self.nodes for out in node.output if out}

    def rename_uses(self, old: str, new: str) -> None:
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def to_model(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        del graph.node[:]
        graph.node.extend(self.nodes)
        del graph.initializer[:]
        for name, value in self.inits.items():
            proto = self.init_protos.get(name)
            graph.initializer.append(proto if proto is not None else numpy_helper.from_array(value, name))
        del graph.value_info[:]
        return model

    def shapes(self) -> dict[str, list[Any]]:
        """Inferred shapes: a list of int / _Sym / None per dimension, by tensor name."""
        inferred = onnx.shape_inference.infer_shapes(self.to_model())
        graph = inferred.graph
        shapes: dict[str, list[Any]] = {}
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = vi.type.tensor_type
            if not t.HasField("shape"):
                continue
            dims = []
            for d in t.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(_Sym(d.dim_param))
                else:
                    dims.append(None)
            shapes[vi.name] = dims
        return shapes

    def elem_types(self) -> dict[str, int]:
        inferred = onnx.shape_inference.infer_shapes(self.to_model())
        graph = inferred.graph
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
        for name, value in self.inits.items():
            types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
        return types


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


# --- passes ---------------------------------------------------------------------------------------------------

def _constants_to_initializers(g: _Graph, report: Report) -> None:
    kept = []
    for node in g.nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                value = np.array(helper.get_attribute_value(attr),
                                 dtype=np.float32 if attr.name == "value_float" else np.int64)
            elif attr.name in ("value_floats", "value_ints"):
                value = np.array(helper.get_attribute_value(attr),
                                 dtype=np.float32 if attr.name == "value_floats" else np.int64)
            else:
                kept.append(node)
                continue
            g.set_init(node.output[0], value)
            report.add("constant_to_initializer")
            continue
        kept.append(node)
    g.nodes = kept


def _remove_identities(g: _Graph, report: Report) -> None:
    kept = []
    for node in g.nodes:
        if node.op_type == "Identity" and node.output[0] not in g.output_names:
            source, target = node.input[0], node.output[0]
            for other in g.nodes:
                for i, name in enumerate(other.input):
                    if name == target:
                        other.input[i] = source
            report.add("identity_removed")
            continue
        kept.append(node)
    g.nodes = kept


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


def _evaluate(node: onnx.NodeProto, values: list[np.ndarray | None], shapes: dict[str, list[Any]],
              opset: int) -> list[np.ndarray] | None:
    """Outputs of a shape-arithmetic node from known inputs (object arrays may hold _Sym), or None."""
    op = node.op_type
    if op == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None or any(d is None for d in dims):
            return None
        if any(isinstance(d, _Sym) for d in dims):
            return [np.array(dims, dtype=object)]
        return [np.array(dims, dtype=np.int64)]
    if any(v is None for v in values):
        return None
    x = values[0]
    sym = any(_has_sym(v) for v in values)
    if op == "Gather":
        indices = values[1]
        if _has_sym(indices):
            return None
        return [np.take(x, indices.astype(np.int64), axis=_attr(node, "axis", 0))]
    if op == "Unsqueeze":
        axes = _attr(node, "axes") if opset < 13 else (list(values[1]) if len(values) > 1 else None)
        if axes is None:
            return None
        out = x
        rank = x.ndim + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Squeeze":
        axes = _attr(node, "axes") if opset < 13 else (list(values[1]) if len(values) > 1 else None)
        return [np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes) if axes is not None else None)]
    if op == "Concat":
        arrays = [v.astype(object) if sym else v for v in values]
        return [np.concatenate(arrays, axis=_attr(node, "axis"))]
    if op == "Cast":
        to = helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
        if _has_sym(x):
            return [x] if np.issubdtype(to, np.integer) else None
        return [x.astype(to)]
    if op == "Identity":
        return [x]
    if op == "Reshape":
        if sym:
            return None
        shape = [int(d) for d in values[1]]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Transpose":
        perm = _attr(node, "perm")
        return [np.transpose(x, perm)]
    if op == "ConstantOfShape":
        if sym:
            return None
        fill = _attr(node, "value")
        fill = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, dtype=np.float32)
        return [np.full([int(d) for d in x], fill.reshape(-1)[0], dtype=fill.dtype)]
    if op == "Slice":
        if sym and any(_has_sym(v) for v in values[1:]):
            return None
        if opset < 10:
            starts, ends = _attr(node, "starts"), _attr(node, "ends")
            axes = _attr(node, "axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = values[1], values[2]
            axes = values[3] if len(values) > 3 and values[3] is not None else list(range(len(starts)))
            steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
        return [_slice(x, starts, ends, axes, steps)]
    if op in ("Add", "Sub", "Mul", "Div"):
        if sym:
            return None
        a, b = values
        result = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _int_div}[op](a, b)
        return [np.asarray(result).astype(np.result_type(a, b))]
    if op in ("Floor", "Ceil", "Sqrt", "Neg", "Abs"):
        if sym:
            return None
        return [getattr(np, op.lower() if op != "Neg" else "negative")(x)]
    if op == "Range":
        if sym:
            return None
        return [np.arange(values[0].item(), values[1].item(), values[2].item()).astype(values[0].dtype)]
    if op == "Equal":
        if sym:
            return None
        return [np.equal(values[0], values[1])]
    if op == "Where":
        if sym:
            return None
        return [np.where(*values)]
    return None


_FOLDABLE = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Reshape", "Transpose",
             "ConstantOfShape", "Slice", "Add", "Sub", "Mul", "Div", "Floor", "Ceil", "Sqrt", "Neg", "Abs",
             "Range", "Equal", "Where"}
_MAX_FOLDED_ELEMENTS = 1 << 16  # shape arithmetic and pads: never a big float computation


def _fold_constants_once(g: _Graph, report: Report) -> bool:
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
        if isinstance(d, _Sym):
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
    if unknown > 1 or (unknown == 1 and -1 in [int(d) for d in target if not isinstance(d, _Sym)]):
        return None
    return np.array(out, dtype=np.int64)


def _fold_constants(g: _Graph, report: Report) -> None:
    for _ in range(200):  # each round can unlock the shapes of the next Reshape
        if not _fold_constants_once(g, report):
            break
        _remove_dead(g)


def _fold_pads_into_convs(g: _Graph, report: Report) -> None:
    users = g.consumers()
    removed = set()
    for node in g.nodes:
        if node.op_type != "Pad" or node.output[0] in g.output_names:
            continue
        if _pad_mode(node) != "constant":
            continue
        pads = _pad_amounts(node, g)
        value = _pad_value(node, g)
        if pads is None or value != 0.0:
            continue
        consumers = users.get(node.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "Conv":
            continue
        conv = consumers[0]
        if conv.input[0] != node.output[0] or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(p < 0 for p in pads) or begin[0] or begin[1] or end[0] or end[1]:
            continue
        spatial = rank - 2
        conv_pads = list(_attr(conv, "pads", [0] * (2 * spatial)))
        new_pads = [conv_pads[i] + begin[2 + i] for i in range(spatial)] + \
                   [conv_pads[spatial + i] + end[2 + i] for i in range(spatial)]
        _set_attr(conv, "pads", new_pads)
        conv.input[0] = node.input[0]
        removed.add(id(node))
        report.add("pad_folded_into_conv")
    g.nodes = [n for n in g.nodes if id(n) not in removed]


def _pad_mode(node: onnx.NodeProto) -> str:
    mode = _attr(node, "mode", b"constant")
    return mode.decode() if isinstance(mode, bytes) else mode


def _pad_amounts(node: onnx.NodeProto, g: _Graph) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = g.inits.get(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    pads = _attr(node, "pads")
    return list(pads) if pads is not None else None


def _pad_value(node: onnx.NodeProto, g: _Graph) -> float | None:
    if len(node.input) > 2 and node.input[2]:
        value = g.inits.get(node.input[2])
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])
    if len(node.input) > 3 and node.input[3]:
        return None  # opset 18 axes: leave alone
    return float(_attr(node, "value", 0.0))


def _remove_dead(g: _Graph) -> None:
    while True:
        used = {name for node in g.nodes for name in node.input if name} | g.output_names
        kept = [n for n in g.nodes if any(o in used for o in n.output if o)]
        if len(kept) == len(g.nodes):
            break
        g.nodes = kept
    used = {name for node in g.nodes for name in node.input if name} | g.output_names
    for name in [n for n in g.inits if n not in used]:
        del g.inits[name]
        g.init_protos.pop(name, None)


def optimize(model: onnx.ModelProto, shuffle: bool = True) -> tuple[onnx.ModelProto, Report]:
    """The rewritten model (a copy) and what was done."""
    g = _Graph(model)
    report = Report()
    _constants_to_initializers(g, report)
    _remove_identities(g, report)
    _fold_constants(g, report)
    _fold_pads_into_convs(g, report)
    if shuffle:
        from .shuffle_opt import rewrite_channel_dataflow, rewrite_channel_shuffles
        rewrite_channel_shuffles(g, report)
        _remove_dead(g)
        rewrite_channel_dataflow(g, report)
    _remove_dead(g)
    out = g.to_model()
    onnx.checker.check_model(out)
    return out, report
