"""The small ONNX graph model every rewrite works on: nodes, initializers, shapes, attributes, and the
clean-up passes all rewrites share (constants to initializers, Identity removal, dead-node removal)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class SymbolicDim:
    """A dimension known only at run time (the dynamic batch), by its dim_param."""

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SymbolicDim) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("sym", self.name))

    def __repr__(self) -> str:
        return f"<{self.name}>"



@dataclass
class Report:
    """What the rewrites did, for logs and reports."""
    counts: Counter = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class Graph:
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
        """A new tensor name: ``base__goptN``, N counting up, skipping names the graph holds (a graph rewritten
        before holds such names already)."""
        taken = set(self.inits) | {t for n in self.nodes for t in (*n.input, *n.output)} | \
            {v.name for v in (*self.inputs, *self.outputs)}
        while True:
            self._counter += 1
            name = f"{base}__gopt{self._counter}"
            if name not in taken:
                return name

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
        """Inferred shapes: a list of int / SymbolicDim / None per dimension, by tensor name."""
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
                    dims.append(SymbolicDim(d.dim_param))
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


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default



def is_depthwise(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """A Conv with one input channel per group and as many groups as output channels."""
    group = attr(node, "group", 1)
    return group > 1 and group == weight.shape[0] and weight.shape[1] == 1


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))




def constants_to_initializers(g: Graph, report: Report) -> None:
    kept = []
    for node in g.nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            const = node.attribute[0]
            if const.name == "value":
                value = numpy_helper.to_array(const.t)
            elif const.name in ("value_float", "value_int"):
                value = np.array(helper.get_attribute_value(const),
                                 dtype=np.float32 if const.name == "value_float" else np.int64)
            elif const.name in ("value_floats", "value_ints"):
                value = np.array(helper.get_attribute_value(const),
                                 dtype=np.float32 if const.name == "value_floats" else np.int64)
            else:
                kept.append(node)
                continue
            g.set_init(node.output[0], value)
            report.add("constant_to_initializer")
            continue
        kept.append(node)
    g.nodes = kept


def constant_nodes_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Constant nodes are initializers (for code that cuts a graph into pieces)."""
    g = Graph(model)
    constants_to_initializers(g, Report())
    return g.to_model()


def remove_identities(g: Graph, report: Report) -> None:
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



def remove_dead(g: Graph) -> None:
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


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (which then holds it)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
