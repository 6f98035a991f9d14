"""A spatial mean (``ReduceMean`` over H and W of a 4-D tensor) as ``GlobalAveragePool``.

torchvision's ShuffleNetV2 ends with ``x.mean([2, 3])``, which exports as ``ReduceMean``. ONNX Runtime's quantizer
has no int8 ``ReduceMean``, so the int8 model dequantizes the last feature map (1024 channels at 7x7), averages it
in float in the channels-first layout (a transpose back from the channels-last int8 convolutions first) and
quantizes the result again: 48% of ShuffleNetV2 x0.5's int8 kernel time at batch 32. ``GlobalAveragePool`` has an
int8 kernel (``QLinearGlobalAveragePool``) that runs channels-last. mmcls and PaddleClas export their pool this way.

``keepdims=0`` (torchvision's case) is followed by ``Flatten(axis=1)``, which gives the same [N, C] output; the
quantizer passes int8 through a Flatten. Exact: the same mean, summed in another order at most.
"""

from __future__ import annotations

from onnx import helper

from quantize.graph.onnx_graph import Graph, Report, attr


def spatial_means_to_global_pools(g: Graph, report: Report) -> None:
    shapes = g.shapes()
    rewritten = []
    for node in g.nodes:
        rewritten.append(node)
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
            continue  # from opset 18 the axes are an input; the exporter here writes opset 11 (an attribute)
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) != 4:
            continue
        axes = sorted(a % 4 for a in (attr(node, "axes", []) or []))
        if axes != [2, 3]:
            continue
        name = node.name or node.output[0]
        keep = attr(node, "keepdims", 1)
        pooled = list(node.output) if keep else [g.fresh(f"{node.output[0]}_pooled")]
        rewritten[-1] = helper.make_node("GlobalAveragePool", [node.input[0]], pooled, name=name + "_as_global_pool")
        if not keep:
            rewritten.append(helper.make_node("Flatten", pooled, list(node.output), name=name + "_flatten", axis=1))
        report.add("mean_as_global_pool")
    g.nodes[:] = rewritten
