"""An explicit zero ``Pad`` before a ``Conv`` (TensorFlow \"same\" padding) folded into the convolution's ``pads``:
ONNX Runtime has no int8 kernel that fuses the Pad with the convolution."""

from __future__ import annotations

import onnx

from quantize.graph.onnx_graph import Graph, Report, attr, set_attr


def fold_pads_into_convs(g: Graph, report: Report) -> None:
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
        if conv.input[0] != node.output[0] or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(p < 0 for p in pads) or begin[0] or begin[1] or end[0] or end[1]:
            continue
        spatial = rank - 2
        conv_pads = list(attr(conv, "pads", [0] * (2 * spatial)))
        new_pads = [conv_pads[i] + begin[2 + i] for i in range(spatial)] + \
                   [conv_pads[spatial + i] + end[2 + i] for i in range(spatial)]
        set_attr(conv, "pads", new_pads)
        conv.input[0] = node.input[0]
        removed.add(id(node))
        report.add("pad_folded_into_conv")
    g.nodes = [n for n in g.nodes if id(n) not in removed]


def _pad_mode(node: onnx.NodeProto) -> str:
    mode = attr(node, "mode", b"constant")
    return mode.decode() if isinstance(mode, bytes) else mode


def _pad_amounts(node: onnx.NodeProto, g: Graph) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = g.inits.get(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    pads = attr(node, "pads")
    return list(pads) if pads is not None else None


def _pad_value(node: onnx.NodeProto, g: Graph) -> float | None:
    if len(node.input) > 2 and node.input[2]:
        value = g.inits.get(node.input[2])
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])
    if len(node.input) > 3 and node.input[3]:
        return None  # opset 18 axes: leave alone
    return float(attr(node, "value", 0.0))

