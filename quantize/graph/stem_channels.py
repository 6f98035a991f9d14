"""The stem convolution reads 4 input channels instead of 3: the RGB image plus a copy of its first channel, which
gets zero weights.

ONNX Runtime's int8 convolution lays out (im2col) each output pixel's 3x3 window of a 3-channel image as 27 bytes
from 3-byte pieces; with 4 channels it copies 4-byte pieces and the int8 stem convolution takes about half as long
(ShuffleNetV2 x0.25, batch 32: 89 -> 43 ms; 8 or 6 channels were slower than 4). The stem is a quarter to a third
of the int8 time of the narrow ShuffleNets, so this is worth 10-20% there (x0.25: 1.0x -> 1.2x at batch 32).

The extra channel comes from a ``Gather`` of the network input on channels (0, 1, 2, 0). In the int8 model the
quantizer places the input's QuantizeLinear after that Gather, so the copy would run on float pixels;
``move_input_quantization`` (applied to the int8 model) quantizes first and gathers bytes, which is the same.

A stem kept in fp32 (``quant.float_stem``: ``pooled_stem``, ``fills_blocks``, ``pad_float_stem``; or named in
``quant.nodes_to_exclude``) reads the 3 channels again (``narrow_float_stems``) and, before a MaxPool, is padded to a
multiple of 16 channels through the pool.

Exact: the added channel is multiplied by zeros. In int8 too: per-channel weight scales are unchanged by zero
weights and the copied channel has the input's range, so the quantized model computes the same integers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.graph.channel_padding import ALIGN, pad_depthwise_channels
from quantize.graph.onnx_graph import Graph, Report, attr, fresh_name

WIDTH = 4


def widen_stem_convs(g: Graph, report: Report, width: int = WIDTH) -> None:
    inputs = {i.name for i in g.inputs}
    widened: dict[str, str] = {}
    for conv in list(g.nodes):
        if conv.op_type != "Conv" or conv.input[0] not in inputs or attr(conv, "group", 1) != 1:
            continue
        weight = g.inits.get(conv.input[1])
        if weight is None or weight.ndim != 4 or weight.shape[1] >= width or weight.shape[2] * weight.shape[3] == 1:
            continue  # a pointwise convolution has no window to lay out
        channels = weight.shape[1]
        source = conv.input[0]
        if source not in widened:
            indices = g.fresh(f"{source}_widen_indices")
            g.set_init(indices, np.array([c % channels for c in range(width)], dtype=np.int64))
            widened[source] = g.fresh(f"{source}_widened")
            gather = helper.make_node("Gather", [source, indices], [widened[source]], axis=1,
                                      name=f"{widened[source]}_Gather")
            g.nodes.insert(next(i for i, n in enumerate(g.nodes) if n is conv), gather)
        padded = np.zeros((weight.shape[0], width, *weight.shape[2:]), dtype=weight.dtype)
        padded[:, :channels] = weight
        name = g.fresh(conv.input[1])
        g.set_init(name, padded)
        conv.input[0] = widened[source]
        conv.input[1] = name
        report.add("stem_conv_widened")


def narrow_float_stems(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Undo the widening for the convolutions ``names`` that stay in fp32 (``quant.nodes_to_exclude``): the copy only
    helps the int8 kernel, and in fp32 it is one more pass over the input and a quarter more work for the stem. Each
    such convolution reads the Gather's input again, its weights summed back over the copied channels (a zero added:
    the same in fp32); a Gather nobody reads any more is dropped. Edits ``model`` in place; returns the convolutions
    narrowed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    taken = set(inits) | {t for n in graph.node for t in (*n.input, *n.output)}
    narrowed, replaced, gathers = [], set(), set()
    for conv in graph.node:
        gather = producer.get(conv.input[0]) if conv.op_type == "Conv" and conv.name in set(names) else None
        if gather is None or gather.op_type != "Gather" or attr(gather, "axis", 0) != 1 \
                or gather.input[1] not in inits or conv.input[1] not in inits:
            continue
        indices = numpy_helper.to_array(inits[gather.input[1]])
        weight = numpy_helper.to_array(inits[conv.input[1]])
        if indices.ndim != 1 or weight.ndim != 4 or weight.shape[1] != len(indices):
            continue
        folded = np.zeros((weight.shape[0], int(indices.max()) + 1, *weight.shape[2:]), dtype=weight.dtype)
        for position, channel in enumerate(indices):
            folded[:, channel] += weight[:, position]
        name = fresh_name(f"{conv.input[1]}_narrowed", taken)
        graph.initializer.append(numpy_helper.from_array(folded, name))
        replaced.update((conv.input[1], gather.input[1]))
        gathers.add(gather.output[0])
        conv.input[0], conv.input[1] = gather.input[0], name
        narrowed.append(conv.name)
    read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    for gather in [n for n in graph.node if n.output[0] in gathers and n.output[0] not in read]:
        graph.node.remove(gather)
    read = {x for n in graph.node for x in n.input}
    kept = [i for i in graph.initializer if i.name in read or i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return narrowed


def move_input_quantization(model: onnx.ModelProto) -> int:
    """In a QDQ int8 model: ``input -> Gather(channels) -> QuantizeLinear`` becomes ``input -> QuantizeLinear ->
    Gather``, so the Gather copies bytes instead of floats (ONNX Runtime runs it before the conversion otherwise).
    ``input``: the network input, or any float tensor outside the quantized graph (``pixel_input``'s pixels).
    Quantizing with one scale commutes with copying values, so the model computes the same. Edits ``model`` in place
    and returns how many Gathers moved."""
    graph = model.graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    scalars = {i.name for i in graph.initializer if len(i.dims) == 0 or list(i.dims) == [1]}
    nodes = list(graph.node)
    moved = 0
    for gather in list(nodes):
        if gather.op_type != "Gather" or gather.input[0] in dequantized or gather.output[0] in outputs:
            continue
        after = readers.get(gather.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or after[0].input[1] not in scalars:
            continue
        if len(after[0].input) > 2 and after[0].input[2] and after[0].input[2] not in scalars:
            continue
        quant = after[0]
        quantized = quant.output[0]
        quant.input[0] = gather.input[0]
        quant.output[0] = f"{quantized}_before_gather"
        gather.input[0] = quant.output[0]
        gather.output[0] = quantized
        nodes.remove(quant)
        nodes.insert(nodes.index(gather), quant)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(nodes)
    return moved


def pooled_stem(model: onnx.ModelProto) -> str | None:
    """The stem convolution ``quant.float_stem`` may keep in fp32 (when it ``fills_blocks``): the one reading the
    network input (or its widening Gather), when its only reader is a MaxPool, directly or through one Relu or Clip."""
    graph = model.graph
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    sources = inputs | {n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inputs}
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.input[0] not in sources:
            continue
        after = readers.get(conv.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            after = readers.get(after[0].output[0], [])
        return conv.name if len(after) == 1 and after[0].op_type == "MaxPool" else None
    return None


def fills_blocks(model: onnx.ModelProto, stem: str) -> bool:
    """Whether the fp32 stem ``stem`` has, or can be padded to, a multiple of 16 output channels: an fp32 stem of 24
    that cannot (ShuffleNetV1's pool also feeds a Concat, through its shortcut) runs slower than the int8 one at
    batch 32."""
    weights = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == stem)
    if conv.input[1] not in weights:
        return False
    return weights[conv.input[1]].dims[0] % ALIGN == 0 or pad_float_stem(model, stem)[1] > 0


def pad_float_stem(model: onnx.ModelProto, stem: str) -> tuple[onnx.ModelProto, int]:
    """``model`` with the fp32 stem ``stem`` given zero filters up to a multiple of 16, through its MaxPool, and the
    readers zero weights (``channel_padding``), where every reader allows it; and the channels added. With 24 channels
    ONNX Runtime's fp32 kernels leave their blocked layout for plain NCHW before the pool, which at batch 32 made the
    fp32 stem slower than the int8 one (``make bench-islands``)."""
    g, report = Graph(model), Report()
    pad_depthwise_channels(g, report, through_pools_from=frozenset([stem]))
    return g.to_model(), report.as_dict().get("zero_channels_added", 0)
