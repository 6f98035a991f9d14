"""Depthwise convolutions whose channel count is not a multiple of 16 get zero channels up to the next multiple.

ONNX Runtime's int8 convolutions on this CPU (channels-last) work on 16 channels at a time: pointwise -> 3x3
depthwise -> pointwise at 28x28, batch 32, took 3.3 ms with 12 middle channels and 1.7 ms with 16 (24 channels
2.5 ms, 32 channels 1.9 ms), while fp32 pads channels to its own block size anyway. The narrow ShuffleNets are made
of such layers (branches of 12, 24, 58 channels).

For a depthwise convolution D whose input comes from a dense convolution P through channel-wise ops that keep
zero at zero (Relu, Clip around 0): P gets zero filters (weights and bias), D zero channels, and every dense
convolution reading P's chain or D's output (also through such ops) zero weights for the new channels. Not
through a MaxPool: in the ShuffleNets that chain is the stem, and widening the stem convolution and its pool at
112x112 cost more at batch 1 than the padded depthwise convolution after them gained (int8 / fp32 at batch 1,
one process, interleaved: Megvii x1.0 1.77 -> 1.87, torchvision x1.0 2.13 -> 2.21 without it; at batch 32
2.57 -> 2.52 and 2.35 -> 2.29). The
new channels hold 0 everywhere, in int8 too (zero is exact in every scale), so the function is unchanged. A chain
with any other reader (another depthwise convolution, a Concat, a graph output) is left alone.

A stem kept in fp32 with its pool (``quant.float_stem``) is padded through the MaxPool
(``through_pools_from``): there the padding lets ONNX Runtime's fp32 kernels keep the stem and the pool in their
16-channel blocked layout, which a 24-channel output leaves for plain NCHW before the pool.
"""

from __future__ import annotations

import numpy as np

from quantize.graph.onnx_graph import Graph, Report, attr, is_depthwise, set_attr

ALIGN = 16
ZERO_KEEPING = {"Relu", "Clip"}


def _keeps_zero(g: Graph, node, pools: bool = False) -> bool:
    if pools and node.op_type == "MaxPool":  # its padding is never a candidate value
        return True
    if node.op_type != "Clip":
        return node.op_type in ZERO_KEEPING
    bounds = []
    for index, name in ((1, "min"), (2, "max")):
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in g.inits:
                return False  # a bound computed at run time
            bounds.append(float(g.inits[node.input[index]]))
        else:
            bounds.append(float(attr(node, name, -np.inf if name == "min" else np.inf)))
    return bounds[0] <= 0.0 <= bounds[1]


def _dense_conv(g: Graph, node) -> bool:
    return node.op_type == "Conv" and node.input[1] in g.inits and attr(node, "group", 1) == 1


def _padded(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, size - value.shape[axis])
    return np.pad(value, widths)


def pad_depthwise_channels(g: Graph, report: Report, align: int = ALIGN,
                           through_pools_from: frozenset[str] = frozenset()) -> None:
    """``through_pools_from``: names of dense convolutions whose chain may pass a MaxPool."""
    producers, readers = g.producers(), g.consumers()
    outputs = g.output_names
    pools = bool(through_pools_from)

    def tensors_through(start: str, forward: bool) -> list[str]:
        """``start`` and the tensors joined to it through zero-keeping ops (backwards: up to the first other op)."""
        chain, name = [start], start
        if not forward:
            while (node := producers.get(name)) is not None and _keeps_zero(g, node, pools):
                name = node.input[0]
                chain.append(name)
            return chain
        for name in chain:
            for node in readers.get(name, []):
                if _keeps_zero(g, node, pools) and node.input[0] == name:
                    chain.append(node.output[0])
        return chain

    for dw in list(g.nodes):
        weight = g.inits.get(dw.input[1]) if dw.op_type == "Conv" and len(dw.input) > 1 else None
        if weight is None or not is_depthwise(dw, weight) or weight.shape[0] % align == 0:
            continue
        channels, target = weight.shape[0], -(-weight.shape[0] // align) * align
        back = tensors_through(dw.input[0], forward=False)
        source = producers.get(back[-1])
        if source is None or not _dense_conv(g, source):
            continue
        if any(producers[t].op_type == "MaxPool" for t in back[:-1]) and source.name not in through_pools_from:
            continue
        ahead = tensors_through(dw.output[0], forward=True)
        chain = set(back) | set(ahead)
        if chain & outputs:
            continue
        dense_readers, ok = [], True
        for name in chain:
            for node in readers.get(name, []):
                if node is dw or (node.output[0] in chain and _keeps_zero(g, node, pools)):
                    continue
                if _dense_conv(g, node) and node.input[0] == name:
                    dense_readers.append(node)
                else:
                    ok = False
        if not ok or g.inits[source.input[1]].shape[0] != channels:
            continue
        for conv, axis in [(source, 0), (dw, 0), *((r, 1) for r in dense_readers)]:
            name = g.fresh(conv.input[1])
            g.set_init(name, _padded(g.inits[conv.input[1]], axis, target))
            conv.input[1] = name
            if axis == 0 and len(conv.input) > 2 and conv.input[2]:
                bias = g.fresh(conv.input[2])
                g.set_init(bias, _padded(g.inits[conv.input[2]], 0, target))
                conv.input[2] = bias
        set_attr(dw, "group", target)
        report.add("depthwise_channels_padded")
        report.add("zero_channels_added", target - channels)
