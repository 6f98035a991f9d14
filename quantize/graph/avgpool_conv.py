"""An ``AveragePool`` that counts padding (or has none) as a depthwise convolution with weights 1 / window.

ONNX Runtime runs an int8 average pool as ``QLinearAveragePool``, which on this CPU is slower than the fp32 pool
(ShuffleNetV1's three 3x3/2 shortcut pools, batch 32: 92 ms int8 against 31 ms fp32), while an int8 depthwise
convolution runs channels-last with the rest of the network. The weight 1 / (kh * kw) is a single value per channel,
so per-channel symmetric int8 weights hold it exactly (127 times its scale).

Exact up to float rounding (the sum of x / n instead of the sum divided by n). Pools that leave padding out of the
count (``count_include_pad=0`` with pads) or use ``ceil_mode`` average over a varying window and are left alone.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from quantize.graph.onnx_graph import Graph, Report, attr


def avgpools_to_depthwise_convs(g: Graph, report: Report) -> None:
    shapes = g.shapes()
    for index, node in enumerate(g.nodes):
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            continue
        kernel = list(attr(node, "kernel_shape", []))
        pads = list(attr(node, "pads", []) or [0] * (2 * len(kernel)))
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        if len(kernel) != 2 or auto_pad not in (b"NOTSET", "NOTSET") or attr(node, "ceil_mode", 0):
            continue
        if any(pads) and not attr(node, "count_include_pad", 0):
            continue
        if any(d != 1 for d in attr(node, "dilations", [1, 1]) or [1, 1]):
            continue
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
            continue
        channels = shape[1]
        weight = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), dtype=np.float32)
        weight_name = g.fresh(f"{node.name or node.output[0]}_weight")
        g.set_init(weight_name, weight)
        g.nodes[index] = helper.make_node(
            "Conv", [node.input[0], weight_name], list(node.output), name=(node.name or node.output[0]) + "_as_conv",
            kernel_shape=kernel, group=channels, pads=pads, strides=list(attr(node, "strides", [1, 1]) or [1, 1]))
        report.add("avgpool_as_depthwise_conv")
