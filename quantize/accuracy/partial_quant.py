"""Half-quantized copies of an int8 QDQ model: only its weights quantized, or only its activations.

Comparing each with fp32 splits the int8 model's disagreement into what its weights and what its activations cause
(AIMET's QuantAnalyzer reports the same split). Both are built from the fp32 graph the quantizer read
(the pipeline's ``optimize`` stage) and the int8 model, matched node by node by name (ONNX Runtime's quantizer
keeps node names):

- ``weights_only``: the fp32 graph, each quantized layer's weight and bias replaced by the int8 model's dequantized
  values. Nothing else is rounded.
- ``activations_only``: the int8 model, each layer reading the fp32 graph's weight and bias instead of its
  DequantizeLinear. Every activation keeps its QuantizeLinear/DequantizeLinear pair (and so its clipping: the
  quantizer folds ReLU and Clip into the ranges); the layers read them through Cast
  (``stages.fp32_nodes.read_through_cast``), or ONNX Runtime would quantize their float weights itself.

One step further, ``activation_groups`` sorts the int8 model's activation quantizers by where they sit (the input,
then the first component of the tensor's name: a stem, a stage, the Concats of the channel-shuffle rewrite, the
head), and ``with_activations`` builds the fp32 graph with only the quantizers of chosen tensors, each a
QuantizeLinear/DequantizeLinear pair with the int8 model's scale and zero point after the tensor: what one group of
activation quantizers costs on its own. Its layers read the quantizers through Cast too. The other way round,
``left_out_one_at_a_time`` lists, for each quantizer (those on one range joined by ops that only move values count as
one), all the others: what leaving that one out of the activations-only model gains. And with ``bits`` above 8,
``with_activations`` emulates every quantizer on its range with finer steps: how far wider activations would go.

None of them is meant to run fast: ONNX Runtime runs their layers in fp32 kernels.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.core.errors import ModelError
from quantize.graph.onnx_graph import fresh_name
from quantize.stages.fp32_nodes import drop_unread, held_tensors, read_through_cast

LAYERS = ("Conv", "Gemm", "MatMul")
ACTIVATION_BITS = range(8, 25)  # what ``with_activations`` emulates: float32 holds every level of 24 bits exactly
WEIGHT_AND_BIAS = (1, 2)  # the inputs of a layer that the quantizer stores as integers


def _dequantized(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float value of a DequantizeLinear of initializers, per-tensor or along its axis."""
    q = arrays[node.input[0]].astype(np.float64)
    scale = arrays[node.input[1]].astype(np.float64)
    zero = arrays[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _quantized_inputs(int8: onnx.ModelProto) -> dict[tuple[str, int], np.ndarray]:
    """(layer name, input index) -> dequantized value, for every weight and bias the int8 model stores as integers."""
    arrays = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    dq = {n.output[0]: n for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in arrays}
    found = {}
    for node in int8.graph.node:
        if node.op_type not in LAYERS:
            continue
        for index in WEIGHT_AND_BIAS:
            if index < len(node.input) and node.input[index] in dq:
                if not node.name:
                    raise ModelError(f"int8 model: a {node.op_type} reading quantized weights has no name to match")
                found[(node.name, index)] = _dequantized(dq[node.input[index]], arrays)
    if not found:
        raise ModelError("int8 model: no layer reads quantized weights (not a QDQ model?)")
    return found


def _layers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type in LAYERS and n.name}


def _replace(model: onnx.ModelProto, values: dict[tuple[str, int], np.ndarray], suffix: str) -> None:
    """Point each (layer, input) of ``model`` at a new initializer holding its value (a new one, so a tensor another
    node shares stays as it was); what nobody reads any more is dropped (``fp32_nodes.drop_unread``)."""
    layers = _layers(model)
    missing = sorted({name for name, _ in values if name not in layers})
    if missing:
        raise ModelError(f"{len(missing)} quantized layer(s) not in the fp32 graph, e.g. {missing[0]}: "
                         "not the graph this int8 model was quantized from")
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for (name, index), value in values.items():
        node = layers[name]
        old = node.input[index]
        if old in shapes and shapes[old] != value.shape:
            raise ModelError(f"{name} input {index}: {old} has shape {shapes[old]}, the int8 model's {value.shape}")
        node.input[index] = f"{name}_input{index}_{suffix}"
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.input[index]))
    drop_unread(model.graph)


def weights_only(fp32_graph: onnx.ModelProto, int8: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fp32_graph)
    _replace(model, _quantized_inputs(int8), "int8")
    return model


def activations_only(fp32_graph: onnx.ModelProto, int8: onnx.ModelProto) -> onnx.ModelProto:
    arrays = {i.name: i for i in fp32_graph.graph.initializer}
    layers = _layers(fp32_graph)
    values = {}
    for (name, index), quantized in _quantized_inputs(int8).items():
        node = layers.get(name)
        if node is None or index >= len(node.input) or node.input[index] not in arrays:
            raise ModelError(f"{name} input {index}: no fp32 initializer in the graph it was quantized from")
        values[(name, index)] = numpy_helper.to_array(arrays[node.input[index]])
        if values[(name, index)].shape != quantized.shape:
            raise ModelError(f"{name} input {index}: fp32 shape {values[(name, index)].shape}, the int8 model's "
                             f"{quantized.shape}")
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    _replace(model, values, "fp32")
    read_through_cast(model, sorted({name for name, _ in values}))
    return model


def _quantizers(int8: onnx.ModelProto, graph: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """fp32 tensor name -> the int8 model's QuantizeLinear of that activation (a quantized graph output is named
    ``<output>_QuantizeLinear_Input`` there; the output of a node kept in fp32 is read through the full-range Clip of
    ``fp32_nodes.hold_quantization``)."""
    constants = {i.name for i in int8.graph.initializer}
    outputs = {o.name for o in graph.graph.output}
    held = held_tensors(int8.graph)
    found = {}
    for node in int8.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        tensor = held.get(node.input[0], node.input[0])
        if tensor.endswith("_QuantizeLinear_Input") and tensor[:-len("_QuantizeLinear_Input")] in outputs:
            tensor = tensor[:-len("_QuantizeLinear_Input")]
        found[tensor] = node
    return found


def _group_of(tensor: str, inputs: set[str], outputs: set[str]) -> str:
    if tensor in inputs:
        return "input"
    if tensor in outputs:
        return "output"
    first = tensor.split("/")[1] if tensor.startswith("/") else tensor
    return re.split(r"__|_output", first)[0] or tensor


def activation_groups(graph: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, list[str]]:
    """Group name -> the fp32 tensors whose quantizers it holds, in graph order of the first one."""
    inputs = {i.name for i in graph.graph.input}
    outputs = {o.name for o in graph.graph.output}
    produced = inputs | {o for n in graph.graph.node for o in n.output}
    groups: dict[str, list[str]] = {}
    for tensor in _quantizers(int8, graph):
        if tensor not in produced:
            raise ModelError(f"the int8 model quantizes {tensor}, which the fp32 graph does not have: not the graph "
                             "this int8 model was quantized from")
        groups.setdefault(_group_of(tensor, inputs, outputs), []).append(tensor)
    return groups


def with_activations(graph: onnx.ModelProto, int8: onnx.ModelProto, tensors: list[str],
                     bits: int = 8) -> onnx.ModelProto:
    """The fp32 graph with the int8 model's quantizers of ``tensors`` only: a QuantizeLinear and DequantizeLinear
    with its scale and zero point after each tensor, read by all its readers (a graph output keeps its name and
    becomes the dequantized value). With ``bits`` > 8 each quantizer is emulated in float on the same range with
    ``2 ** (bits - 8)`` times as many levels (``finer_quantizer``): what the int8 model's ranges would give with
    wider activations. ``graph`` may be ``weights_only``'s model: then the int8 weights are in too."""
    if bits not in ACTIVATION_BITS:
        raise ModelError(f"activation bits {bits}: emulate {ACTIVATION_BITS[0]} to {ACTIVATION_BITS[-1]}")
    quantizers = _quantizers(int8, graph)
    constants = {i.name: i for i in int8.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    taken = {i.name for i in model.graph.initializer} | {t for n in model.graph.node for t in (*n.input, *n.output)}
    outputs = {o.name for o in model.graph.output}
    for tensor in tensors:
        q = quantizers[tensor]
        scale, zero_point = constants[q.input[1]], constants[q.input[2]]
        if tensor in outputs:  # its producer writes a new name; the dequantized value takes the output's
            source, restored = fresh_name(f"{tensor}_fp32", taken), tensor
            for node in model.graph.node:
                node.output[:] = [source if x == tensor else x for x in node.output]
        else:
            source, restored = tensor, fresh_name(f"{tensor}_fake_dequantized", taken)
            for node in model.graph.node:
                node.input[:] = [restored if x == tensor else x for x in node.input]
        if bits == 8:
            steps = uint8_quantizer(model, source, restored, scale, zero_point, taken)
        else:
            steps = finer_quantizer(model, source, restored, scale, zero_point, bits, taken)
        after = next((k + 1 for k, n in enumerate(model.graph.node) if source in n.output), 0)
        for offset, step in enumerate(steps):
            model.graph.node.insert(after + offset, step)
    read_through_cast(model, list(_layers(model)))  # or ONNX Runtime quantizes the layers between the quantizers
    return model


def uint8_quantizer(model: onnx.ModelProto, source: str, restored: str, scale: onnx.TensorProto,
                    zero_point: onnx.TensorProto, taken: set[str]) -> list[onnx.NodeProto]:
    """A QuantizeLinear and DequantizeLinear computing ``restored`` from ``source`` with copies of the int8 model's
    ``scale`` and ``zero_point`` (added to ``model``)."""
    params = []
    for part, value in (("scale", scale), ("zero_point", zero_point)):
        copy = onnx.TensorProto()
        copy.CopyFrom(value)
        copy.name = fresh_name(f"{source}_fake_{part}", taken)
        model.graph.initializer.append(copy)
        params.append(copy.name)
    quantized = fresh_name(f"{source}_fake_quantized", taken)
    return [helper.make_node("QuantizeLinear", [source, *params], [quantized], name=quantized),
            helper.make_node("DequantizeLinear", [quantized, *params], [restored], name=restored)]


def finer_quantizer(model: onnx.ModelProto, source: str, restored: str, scale: onnx.TensorProto,
                    zero_point: onnx.TensorProto, bits: int, taken: set[str]) -> list[onnx.NodeProto]:
    """Float nodes computing ``restored`` from ``source`` as a uint``bits`` quantizer would: the uint8 quantizer's
    range, its step divided by ``2 ** (bits - 8)`` (``clip(round(x / step), lo, hi) * step``, round half to even
    like QuantizeLinear). Their constants are added to ``model``."""
    levels = 2 ** (bits - 8)
    if zero_point.data_type != onnx.TensorProto.UINT8:
        raise ModelError(f"{source}: emulating wider activations needs a uint8 quantizer")
    step = numpy_helper.to_array(scale).astype(np.float64) / levels
    zero = numpy_helper.to_array(zero_point).astype(np.float64) * levels
    values = {"step": step, "low": -zero, "high": 2 ** bits - 1 - zero}
    names = {}
    for part, value in values.items():
        names[part] = fresh_name(f"{source}_a{bits}_{part}", taken)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), names[part]))
    scaled, rounded, clipped = (fresh_name(f"{source}_a{bits}_{part}", taken) for part in ("scaled", "rounded",
                                                                                          "clipped"))
    return [helper.make_node("Div", [source, names["step"]], [scaled], name=scaled),
            helper.make_node("Round", [scaled], [rounded], name=rounded),
            helper.make_node("Clip", [rounded, names["low"], names["high"]], [clipped], name=clipped),
            helper.make_node("Mul", [clipped, names["step"]], [restored], name=restored)]


# Ops that only move or select values: a quantized tensor passed through one is still on its grid, so a quantizer of
# the result on the same range rounds nothing new (MaxPool picks among values, on the grid too).
MOVES = ("Split", "Concat", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool")


def _in_graph_order(graph: onnx.ModelProto, tensors: list[str]) -> list[str]:
    produced = {i.name: -1 for i in graph.graph.input}
    produced.update({t: k for k, n in enumerate(graph.graph.node) for t in n.output})
    return sorted(tensors, key=produced.get)


def joined_quantizers(graph: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, list[str]]:
    """The int8 model's activation quantizers as they act: the first tensor of each -> all the tensors it rounds, in
    graph order. Quantizers on one range joined by ops that only move values (``MOVES``: a Split's parts, a Concat's
    inputs and output under ``quant.shared_concat_ranges``, a Flatten) are one: the later ones round nothing anew."""
    quantizers = _quantizers(int8, graph)
    tensors = _in_graph_order(graph, [t for group in activation_groups(graph, int8).values() for t in group])
    arrays = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}

    def grid(tensor: str) -> tuple:
        q = quantizers[tensor]
        return tuple(arrays[name].tobytes() for name in q.input[1:3])

    first = {t: t for t in tensors}  # union-find: each tensor's representative, the earliest in graph order

    def find(t: str) -> str:
        while first[t] != t:
            t = first[t]
        return t

    order = {t: k for k, t in enumerate(tensors)}
    for node in graph.graph.node:
        if node.op_type not in MOVES:
            continue
        data_inputs = node.input if node.op_type == "Concat" else node.input[:1]  # not shapes, axes or indices
        linked = [t for t in (*data_inputs, *node.output) if t in first]
        for a, b in zip(linked, linked[1:]):
            if grid(a) == grid(b):
                ra, rb = sorted((find(a), find(b)), key=order.get)
                first[rb] = ra
    whole = {t: find(t) for t in tensors}
    return {w: [t for t in tensors if whole[t] == w] for w in dict.fromkeys(whole.values())}


def left_out_one_at_a_time(graph: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, list[str]]:
    """Each activation quantizer of the int8 model (``joined_quantizers``, named by its first tensor) -> the tensors of
    all the others, in graph order: left in, a quantizer joined to the left-out one would round it again, and leaving
    it out would change nothing."""
    joined = joined_quantizers(graph, int8)
    tensors = _in_graph_order(graph, [t for members in joined.values() for t in members])
    return {first: [t for t in tensors if t not in members] for first, members in joined.items()}
