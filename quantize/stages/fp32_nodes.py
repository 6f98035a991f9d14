"""Nodes an int8 QDQ model keeps in fp32 (``quant.nodes_to_exclude``, the accuracy budget's trials, bench-islands),
written so that ONNX Runtime really runs them in fp32.

Three things stand in the way:

- shared initializers: the exporter shares equal tensors (a random-init network's zero biases), and a node kept in
  fp32 that shares one with a quantized node reads the quantized copy through a DequantizeLinear; with no constant
  weight, ONNX Runtime runs it without its blocked fp32 kernels (bench-islands measured ShuffleNetV2 x0.25's fp32
  stem at 0.46 instead of 0.22 ms). ``own_initializers`` gives those nodes copies of their own before quantizing.
- ONNX Runtime's ``WeightBiasQuantization`` graph optimizer (on by default at the basic level and above, ORT 1.32
  here): a Conv, ConvTranspose or Gemm with float weights whose input comes from a per-tensor DequantizeLinear and
  whose output goes (through Relu or Clip at most) to a QuantizeLinear gets its weights quantized per tensor and
  its bias to int32, and then runs as an int8 kernel. That is every fp32 layer inside the int8 network, silently
  run in int8 with coarser weights than the quantized ones. ``read_through_cast`` feeds such a layer through
  ``Cast`` (and ``Sub`` of the zero point when it is not 0) instead of the DequantizeLinear, with the input scale
  folded into its weights: ``conv(s * (q - z), w) = conv(q - z, s * w)``, the same in fp32 up to rounding, and no
  DequantizeLinear for the optimizer to match.
- ONNX Runtime's ``QDQPropagationTransformer`` moves a QuantizeLinear up above a MaxPool, Reshape, Transpose,
  Squeeze, Unsqueeze or Slice (and a DequantizeLinear down below one): a MaxPool kept in fp32 after an fp32 stem
  then runs as a channels-first uint8 MaxPool, 15 times slower than either layout's own (ShuffleNetV2 x1.0: 1.5 ms
  instead of 0.1). ``hold_quantization`` puts a ``Clip`` to the float range between such a node and the quantizer
  (no value changes; ONNX Runtime drops the Clip later, when it fuses the QuantizeLinear), and ``with_pools`` keeps a
  MaxPool after a layer kept in fp32 in fp32 too: quantized after that layer, the pool would run as that slow kernel
  (ShuffleNetV2 x1.0 with its stem in fp32, batch 1: 1.2x fp32's speed with the pool in uint8, 2.2x with it in fp32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.graph.onnx_graph import fresh_name

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")
MOVES_QUANTIZATION = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")  # ORT propagates Q/DQ
FLOAT_MAX = float(np.finfo(np.float32).max)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes reading it, each once."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def _names_taken(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {t for n in graph.node for t in (*n.input, *n.output)}


def with_pools(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """``names`` and every MaxPool reading one of them, directly or through a Relu or Clip (kept with it): in fp32
    too. That changes no value (a max pool commutes with quantization), but left to the quantizer a MaxPool after an
    fp32 layer becomes a channels-first uint8 kernel (after an fp32 ShuffleNetV2 stem: 1.5 ms instead of 0.1 at
    batch 1)."""
    readers = _readers(model.graph)
    kept, seen = list(names), set(names)

    def walk(node: onnx.NodeProto, path: list[str]) -> None:
        for reader in (r for out in node.output for r in readers.get(out, [])):
            if not reader.name or reader.name in seen:
                continue
            if reader.op_type == "MaxPool":
                for name in (*path, reader.name):
                    if name not in seen:
                        kept.append(name)
                        seen.add(name)
            elif reader.op_type in ("Relu", "Clip"):
                walk(reader, [*path, reader.name])

    for node in [n for n in model.graph.node if n.name in set(names)]:
        walk(node, [])
    return kept


def own_initializers(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the nodes ``names`` read initializers of their own: an initializer they share with
    other nodes is copied under a new name, which the quantizer then leaves in float."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    keep = set(names)
    users = {name: len(nodes) for name, nodes in _readers(out.graph).items()}
    taken = _names_taken(out.graph)
    for node in out.graph.node:
        if node.name not in keep:
            continue
        for k, name in enumerate(node.input):
            if name in inits and users[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = fresh_name(f"{name}__fp32", taken)
                out.graph.initializer.append(copy)
                node.input[k] = copy.name
    return out


def read_through_cast(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Rewrite ``model`` in place so that each weighted layer of ``names`` reading a per-tensor DequantizeLinear of an
    activation reads ``Cast(q) [- z]`` instead, with the scale folded into its float weights. Layers whose weight is
    not a float initializer of their own (quantized, or shared: see ``own_initializers``) are left alone. Returns the
    layers rewritten, in graph order."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    taken = _names_taken(graph)
    wanted, done, inserted = set(names), [], []
    for node in graph.node:
        if node.name not in wanted or node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        weight = inits.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None or len(readers[weight.name]) != 1 \
                or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else \
            np.zeros((), np.uint8)
        if scale is None or scale.size != 1 or zero.size != 1:
            continue  # per-axis or computed parameters: not what the optimizer matches
        value = fresh_name(f"{node.name}_input_as_float", taken)
        steps = [helper.make_node("Cast", [dq.input[0]], [value], name=fresh_name(f"{node.name}_cast", taken),
                                  to=onnx.TensorProto.FLOAT)]
        if int(zero.reshape(())) != 0:
            offset = fresh_name(f"{node.name}_input_zero_point", taken)
            graph.initializer.append(numpy_helper.from_array(np.array(zero.reshape(()), np.float32), offset))
            shifted = fresh_name(f"{node.name}_input_centred", taken)
            steps.append(helper.make_node("Sub", [value, offset], [shifted],
                                          name=fresh_name(f"{node.name}_sub_zero_point", taken)))
            value = shifted
        folded = numpy_helper.to_array(weight) * np.float32(scale.reshape(()))
        weight.CopyFrom(numpy_helper.from_array(folded.astype(np.float32), weight.name))
        inserted.append((node, steps))
        node.input[0] = value
        done.append(node.name)
    if inserted:
        _insert_before(graph, inserted)
        drop_unread(graph)
    return done


def hold_quantization(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Rewrite ``model`` in place so that ONNX Runtime cannot move a QuantizeLinear or DequantizeLinear across the
    nodes ``names`` of the kinds it moves quantization across: a full-range Clip goes between such a node and a
    QuantizeLinear reading its output, and between a DequantizeLinear and the node. Returns the nodes held."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    taken = _names_taken(graph)
    low, high = fresh_name("float_lowest", taken), fresh_name("float_highest", taken)
    wanted, held, before, after = set(names), [], [], []
    for node in graph.node:
        if node.name not in wanted or node.op_type not in MOVES_QUANTIZATION:
            continue
        source = producer.get(node.input[0])
        quantizers = [r for r in readers.get(node.output[0], []) if r.op_type == "QuantizeLinear"]
        if source is not None and source.op_type == "DequantizeLinear":
            clipped = fresh_name(f"{node.name}_input_held", taken)
            before.append((node, [helper.make_node("Clip", [node.input[0], low, high], [clipped],
                                                   name=fresh_name(f"{node.name}_hold_input", taken))]))
            node.input[0] = clipped
        if quantizers:
            clipped = fresh_name(f"{node.name}_output_held", taken)
            after.append((node, helper.make_node("Clip", [node.output[0], low, high], [clipped],
                                                 name=fresh_name(f"{node.name}_hold_output", taken))))
            for q in quantizers:
                q.input[0] = clipped
        if quantizers or (source is not None and source.op_type == "DequantizeLinear"):
            held.append(node.name)
    if held:
        graph.initializer.extend([numpy_helper.from_array(np.array(-FLOAT_MAX, np.float32), low),
                                  numpy_helper.from_array(np.array(FLOAT_MAX, np.float32), high)])
        _insert_before(graph, before)
        _insert_after(graph, after)
    return held


def held_tensors(graph: onnx.GraphProto) -> dict[str, str]:
    """The output of each full-range Clip (``hold_quantization``'s) -> the tensor it passes on."""
    full = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 0
            and abs(float(numpy_helper.to_array(i))) == FLOAT_MAX}
    return {n.output[0]: n.input[0] for n in graph.node
            if n.op_type == "Clip" and len(n.input) == 3 and n.input[1] in full and n.input[2] in full}


def _insert_after(graph: onnx.GraphProto, inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]]) -> None:
    step_of = {node.output[0]: step for node, step in inserted}
    ordered = []
    for node in graph.node:
        ordered.append(node)
        if node.output and node.output[0] in step_of:
            ordered.append(step_of[node.output[0]])
    del graph.node[:]
    graph.node.extend(ordered)


def _insert_before(graph: onnx.GraphProto, inserted: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]) -> None:
    steps_of = {node.output[0]: steps for node, steps in inserted}
    ordered = []
    for node in graph.node:
        ordered.extend(steps_of.get(node.output[0], []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def drop_unread(graph: onnx.GraphProto) -> None:
    """Drop the DequantizeLinear and QuantizeLinear nodes whose output nobody reads any more (a QuantizeLinear that
    only fed such a DequantizeLinear too), then the initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    for op_type in ("DequantizeLinear", "QuantizeLinear"):
        read = {x for n in graph.node for x in n.input} | outputs
        kept = [n for n in graph.node if n.op_type != op_type or n.output[0] in read]
        if len(kept) != len(graph.node):
            del graph.node[:]
            graph.node.extend(kept)
    read = {x for n in graph.node for x in n.input} | outputs
    kept_inits = [i for i in graph.initializer if i.name in read]
    if len(kept_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
