"""One range for the tensors a Concat joins.

In a QDQ graph each input of a Concat is quantized with its producer's scale and the Concat's output with its own:
ONNX Runtime's fused concat then requantizes every input whose scale differs, a second rounding on top of the first.
Giving the Concat's inputs and output one range (the union of theirs) makes the concat a copy of int8 values.
Split outputs already take their input's parameters, so a tensor split into parts that feed several Concats ties
those Concats together (ShuffleNetV2 after the channel-shuffle rewrite: one range per stage for the units' outputs).
The cost is a coarser step for a tensor whose own range was narrower than the union. Measured on ShuffleNetV2 x1.0
(2-fold cross-validation on the 200 sample photos): agreement with fp32 95.5% -> 95.6% on top of MSE ranges.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from quantize.core.artifacts import atomic_path

log = logging.getLogger(__name__)


def concat_groups(model: onnx.ModelProto, tensors: set[str]) -> list[list[str]]:
    """Groups of ``tensors`` tied by Concat (inputs with output) and Split (input with outputs), in graph order,
    only groups of two or more."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in model.graph.node:
        if node.op_type == "Concat" and node.output[0] in tensors:
            for name in node.input:
                if name in tensors:
                    union(name, node.output[0])
        elif node.op_type == "Split" and node.input and node.input[0] in tensors:
            for name in node.output:
                if name in tensors:
                    union(name, node.input[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def share_concat_ranges(model: onnx.ModelProto, ranges_path: Path, out_path: Path) -> dict[str, int]:
    """Write ``ranges_path`` (ONNX Runtime's calibration cache, as ``calibrate.save_ranges`` writes it) to
    ``out_path`` with every Concat group on the union of its ranges; returns how many groups and tensors."""
    data = json.loads(Path(ranges_path).read_text())
    ranges = data["data"]
    groups = concat_groups(model, set(ranges))
    for group in groups:
        low = min(float(ranges[t]["lowest"]) for t in group)
        high = max(float(ranges[t]["highest"]) for t in group)
        for t in group:
            ranges[t]["lowest"], ranges[t]["highest"] = low, high
    with atomic_path(Path(out_path)) as tmp:
        Path(tmp).write_text(json.dumps(data))
    summary = {"groups": len(groups), "tensors": sum(len(g) for g in groups)}
    log.info("shared ranges: %d Concat groups (%d tensors) on one range each", summary["groups"], summary["tensors"])
    return summary
