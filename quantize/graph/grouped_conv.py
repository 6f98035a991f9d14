"""Grouped pointwise convolutions (ShuffleNetV1: 1x1, groups = 3) as one dense convolution with a block-diagonal
weight.

ONNX Runtime's int8 convolution runs a grouped convolution as one small GEMM per group (K = C_in / groups), which on
this CPU is no faster than fp32 (measured on ShuffleNetV1 x1.0 g3). As one dense convolution the zeros outside the
diagonal blocks triple the multiply-accumulates of the layer but the int8 GEMM runs at full width, and, above all, a
dense convolution absorbs any order of its input channels in its weights: the ShuffleNetV1 channel shuffle in front
of the grouped expansion convolution folds into the weights (``channel_shuffle``) instead of becoming a Split and a
Concat of single channels. Measured on ShuffleNetV1 x1.0 g3 (int8 / fp32, 2 threads): 0.55x -> 1.1x at batch 1,
1.0x -> 1.7x at batch 32 (as separate per-group convolutions: 0.88x, 1.21x).

Exact: every output sums the same products plus products with zero weights. Per-channel int8 weights are the
same too (the zeros change no output channel's largest magnitude).
"""

from __future__ import annotations

import numpy as np

from quantize.graph.onnx_graph import Graph, Report, attr, set_attr

# The dense layer costs ``groups`` times the multiply-accumulates of the grouped one: only small group counts
# (ShuffleNetV1 uses 1, 2, 3, 4 or 8) are worth it. Depthwise convolutions are never touched.
MAX_GROUPS = 8


def densify_grouped_convs(g: Graph, report: Report, max_groups: int = MAX_GROUPS) -> None:
    for node in g.nodes:
        if node.op_type != "Conv":
            continue
        groups = int(attr(node, "group", 1))
        weight = g.inits.get(node.input[1]) if len(node.input) > 1 else None
        if groups <= 1 or groups > max_groups or weight is None or weight.ndim != 4:
            continue
        out_channels, group_in = weight.shape[:2]
        if group_in == 1 or out_channels % groups or weight.shape[2:] != (1, 1):
            continue  # depthwise (or a channel multiplier), or not pointwise
        group_out = out_channels // groups
        dense = np.zeros((out_channels, group_in * groups, 1, 1), dtype=weight.dtype)
        for k in range(groups):
            rows = slice(k * group_out, (k + 1) * group_out)
            dense[rows, k * group_in:(k + 1) * group_in] = weight[rows]
        name = g.fresh(node.input[1])
        g.set_init(name, dense)
        node.input[1] = name
        set_attr(node, "group", 1)
        report.add("grouped_conv_densified")
