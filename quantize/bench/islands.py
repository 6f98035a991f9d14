"""Would leaving a zoo entry's slow int8 layers in fp32 make its int8 model faster? (``make bench-islands``; issue
#17, item 2: "where no rewrite helps a layer, consider leaving it in fp32 when that is faster and costs no accuracy".)

    python -m quantize.bench.islands [--models a,b] [--islands stem,swish] [--runs 3] [--iterations 100]
                                     [--batch 32] [--batch-iterations 10] [--threads 2] [--out DIR]

Each entry is built as ``make bench-zoo`` builds it (``quantize.bench.zoo``: random init, the current graph rewrites,
percentile ranges on 50 photos, the default recipe's int8 layout), then quantized once more per candidate island
with the island's nodes in ``nodes_to_exclude`` (what ``quant.nodes_to_exclude`` does in the pipeline). fp32, the
plain int8 model and every island model are timed in alternating blocks (``stages.speed.time_blocks``, one session
alive at a time) at batch 1 and ``--batch``; ratio = fp32 ms / model ms, the median of ``--runs`` whole timings
(every run's ratios are in the JSON). Results are merged into ``islands.json`` entry by entry, so each entry can be
timed in its own short quiet window.

The candidate islands (``ISLANDS``), found by structure in the rewritten graph:

- ``stem``: the first convolution and its activation (ReLU, ReLU6 or swish), 112x112;
- ``stem_pool``: the stem and the max pool after it (the ShuffleNets; the pipeline now keeps that pool in fp32 with
  an fp32 stem, ``stages.fp32_nodes.with_pools``, so ``stem`` is the same island there and is timed once);
- ``stem_block``: the stem (and its pool) and the convolutions reading its output with their activations: the first
  ShuffleNet unit's two 56x56 input convolutions, Lite0's first 112x112 depthwise convolution;
- ``swish``: every ``x * sigmoid(x)`` (int8: a QLinearSigmoid and a QLinearMul, together as slow as fp32's fused
  QuickGelu);
- ``global_pool``: the global average pool (ONNX Runtime's QLinearGlobalAveragePool is no faster than fp32 at batch 1).

An island holding the stem convolution is built on the graph without the ``stem_channels`` rewrite, whose 4th input
channel only helps the int8 kernel. The island's nodes get their own copies of initializers they share with
quantized nodes, as every excluded node does (``stages.fp32_nodes``). The ``int8`` model here has every layer in int8
(``quant.float_stem`` off, unlike bench-zoo's), so a ShuffleNetV2's ``stem`` island, padded through its pool as the
pipeline pads it, is the default recipe's layout.

Measured (2026-11-30, ``benchmarks/results/zoo_islands/``, 3 runs, load 1.7-2.0 with the benchmark's own two
threads; every block warmed up past ONNX Runtime's memory-plan allocation, ``stages.speed.MIN_WARMUP``). fp32 / int8
ratios at batch 1 · 32, all-int8 first, then the islands:

- efficientnet_lite0: 1.80 · 2.05; stem 1.66 · 2.01, stem_block 1.73 · 2.10, global_pool 1.76 · 2.04;
- mmcls_shufflenet_v1_x1_0_g3: 1.85 · 2.09; stem (with its pool, 24 channels) 1.86 · 1.97, global_pool 1.73 · 2.04;
- megvii_shufflenet_v2_x0_5: 1.37 · 1.44; stem (with its pool, padded to 32) 1.47 · 1.56, stem_block 1.41 · 1.51;
- ppcls_shufflenet_v2_x0_25: 1.36 · 1.11; stem 1.56 · 1.33, stem_block 1.53 · 1.25;
- ppcls_shufflenet_v2_x0_33: 1.47 · 1.20; stem 1.49 · 1.39, stem_block 1.48 · 1.44;
- ppcls_shufflenet_v2_swish: 1.44 · 1.69; stem (swish, 24 channels) 1.49 · 1.53, swish 1.00 · 0.82;
- shufflenet_v2_x1_0: 2.43 · 2.27; stem 2.51 · 2.47, stem_block 2.37 · 2.21.

A ShuffleNetV2 stem with its pool in fp32, padded to 32 channels through the pool (``stem_channels.pad_float_stem``),
is faster than all-int8 at both batches on every ShuffleNetV2 measured: that is the default recipe's
``quant.float_stem``. Where the stem cannot be padded (ShuffleNetV1's pool also feeds a Concat; PaddleClas's swish
stem) it costs batch 32, so ``float_stem`` leaves it in int8; no other island is faster at both batches.

What an island costs more than it saves:

- the boundary: at 112x112 (no pool after the stem) the fp32 convolution's output leaves the blocked layout
  (ReorderOutput), is quantized and transposed to the int8 kernels' channels-last layout, three passes over the
  largest tensor of the network (Lite0's ``stem``, batch 32: 20.5 ms for the fp32 stem and its boundary against 10.9 ms for the int8 stem with the
  input's quantization); at batch 32 those fp32 tensors no longer stay in cache;
- before ``stages.fp32_nodes`` kept the pool after an fp32 stem in fp32 too, it ran as a channels-first uint8 MaxPool,
  far slower than the channels-last one of the plain int8 model (x0.25, batch 1: 1.7 against 0.1 ms), even when the
  island held it (ONNX Runtime moved the QuantizeLinear after the pool up through it);
- swish in fp32 runs as DequantizeLinear, Sigmoid, Mul and QuantizeLinear, not fused (batch 32: 91 ms against 21 ms
  for QLinearSigmoid and QLinearMul).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from quantize.bench.latency import package_version
from quantize.bench.zoo import DEFAULT_CALIB_ROOT, build, calibrated, entry_and_images, interleaved_ms, merged_entries
from quantize.core.artifacts import write_text
from quantize.stages.fp32_nodes import with_pools
from quantize.core.errors import QuantizeError
from quantize.core.runtime import cpu_name
from quantize.graph.optimize import VERSION as GRAPH_VERSION

SCHEMA = "quantize-bench-islands/1"
# The entries short of issue #17's speed goal in benchmarks/results/zoo/zoo.json (rewrite version 5).
SHORT_ENTRIES = ("efficientnet_lite0", "mmcls_shufflenet_v1_x1_0_g3", "megvii_shufflenet_v2_x0_5",
                 "ppcls_shufflenet_v2_x0_25", "ppcls_shufflenet_v2_x0_33", "ppcls_shufflenet_v2_swish")
ACTIVATION_OPS = ("Relu", "Clip", "Sigmoid", "Mul")


class _Nodes:
    """Who reads each tensor, and which tensors are constants, of one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.constants = {i.name for i in model.graph.initializer}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def activation(self, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str]:
        """The element-wise activation after ``node`` (ReLU, ReLU6 as Clip, or swish: Sigmoid and the Mul of x by
        it) and the tensor it ends in; ``([], node's output)`` when there is none."""
        reached, chain, end = {node.output[0]}, [], node.output[0]
        progress = True
        while progress:
            progress = False
            for tensor in list(reached):
                for reader in self.readers.get(tensor, []):
                    if reader.op_type not in ACTIVATION_OPS or any(reader is c for c in chain):
                        continue
                    if all(i in reached or i in self.constants for i in reader.input if i):
                        chain.append(reader)
                        reached.add(reader.output[0])
                        progress = True
        ends = [c.output[0] for c in chain if not any(r in chain for r in self.readers.get(c.output[0], []))]
        if len(ends) == 1:
            end = ends[0]
        return chain, end

    def stem(self) -> tuple[list[onnx.NodeProto], str] | None:
        """The first convolution (reading the network input, or the ``stem_channels`` Gather of it) with its
        activation, and the tensor they end in."""
        inputs = {i.name for i in self.graph.input} - self.constants
        widened = {n.output[0] for n in self.graph.node if n.op_type == "Gather" and n.input[0] in inputs}
        for node in self.graph.node:
            if node.op_type == "Conv" and (node.input[0] in inputs or node.input[0] in widened):
                chain, end = self.activation(node)
                return [node, *chain], end
        return None

    def max_pool_after(self, tensor: str) -> onnx.NodeProto | None:
        pools = [r for r in self.readers.get(tensor, []) if r.op_type == "MaxPool"]
        return pools[0] if len(pools) == 1 else None


def _stem(nodes: _Nodes) -> list[onnx.NodeProto]:
    found = nodes.stem()
    return found[0] if found else []


def _stem_pool(nodes: _Nodes) -> list[onnx.NodeProto]:
    found = nodes.stem()
    pool = found and nodes.max_pool_after(found[1])
    return [*found[0], pool] if pool else []


def _stem_block(nodes: _Nodes) -> list[onnx.NodeProto]:
    found = nodes.stem()
    if not found:
        return []
    island, end = found
    pool = nodes.max_pool_after(end)
    if pool is not None:
        island, end = [*island, pool], pool.output[0]
    convs = [r for r in nodes.readers.get(end, []) if r.op_type == "Conv"]
    if not convs:
        return []
    for conv in convs:
        island += [conv, *nodes.activation(conv)[0]]
    return island


def _swish(nodes: _Nodes) -> list[onnx.NodeProto]:
    island = []
    for node in nodes.graph.node:
        if node.op_type != "Sigmoid":
            continue
        muls = [r for r in nodes.readers.get(node.output[0], [])
                if r.op_type == "Mul" and set(r.input) == {node.input[0], node.output[0]}]
        if muls:
            island += [node, *muls]
    return island


def _global_pool(nodes: _Nodes) -> list[onnx.NodeProto]:
    return [n for n in nodes.graph.node if n.op_type == "GlobalAveragePool"]


ISLANDS: dict[str, Callable[[_Nodes], list[onnx.NodeProto]]] = {
    "stem": _stem, "stem_pool": _stem_pool, "stem_block": _stem_block, "swish": _swish, "global_pool": _global_pool,
}


def island_nodes(model: onnx.ModelProto, island: str) -> list[str]:
    """Names of the nodes of ``island`` (a key of ``ISLANDS``) in ``model``, with the max pool after them that the
    quantizer keeps in fp32 with them (``fp32_nodes.with_pools``: so ``stem`` is ``stem_pool`` on the ShuffleNets);
    empty when the model has no such part."""
    names = [n.name for n in ISLANDS[island](_Nodes(model))]
    return with_pools(model, names) if names else []


def holds_stem(model: onnx.ModelProto, names: list[str]) -> bool:
    stem = _Nodes(model).stem()
    return bool(stem) and stem[0][0].name in names


def quantize_with_island(graph: Path, ranges: Path, names: list[str], out: Path) -> Path:
    """The int8 model of ``graph`` (bench-zoo's layout and ranges) with the nodes ``names`` left in fp32."""
    from quantize.stages.static_quant import quantize_model

    quantize_model(graph, ranges, out, method="percentile", optimize_graph=False, nodes_to_exclude=names)
    return out


def measure(name: str, args: argparse.Namespace, image_cache: dict) -> dict[str, Any]:
    from quantize.stages.static_quant import quantize_model

    entry, images = entry_and_images(name, args, image_cache)
    with tempfile.TemporaryDirectory(prefix="bench-islands.") as scratch:
        work = Path(scratch)
        fp32 = build(entry, work, images[:2])
        graph, ranges, _ = calibrated(fp32, images, work)
        quantize_model(graph, ranges, work / "int8.onnx", method="percentile", optimize_graph=False)
        models = {"fp32": fp32, "int8": work / "int8.onnx"}
        rewritten = onnx.load(str(graph))
        islands: dict[str, list[str]] = {}
        plain_stem: tuple[Path, Path] | None = None
        for island in args.islands:
            names = island_nodes(rewritten, island)
            if not names or any(names == other for other in islands.values()):
                continue  # the entry has no such part, or it is the same island as one already built
            source, source_ranges = graph, ranges
            if holds_stem(rewritten, names):
                if plain_stem is None:
                    plain_stem = calibrated(fp32, images, work, skip=("stem_channels",), tag="plain_stem")[:2]
                source, source_ranges = plain_stem
            islands[island] = names
            models[island] = quantize_with_island(source, source_ranges, names, work / f"island-{island}.onnx")
        per_run, _, _, load = interleaved_ms(models, args)
    batches = list(per_run[0]["fp32"])
    ratios = [{tag: {b: run["fp32"][b] / run[tag][b] for b in batches} for tag in models} for run in per_run]
    ratio = {tag: {b: statistics.median(r[tag][b] for r in ratios) for b in batches} for tag in models}
    return {
        "entry": name,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "islands": islands,
        "ms": {tag: {b: statistics.median(run[tag][b] for run in per_run) for b in batches} for tag in models},
        "ratio": ratio,
        "ratios": ratios,
        "faster_than_int8": [i for i in islands if all(ratio[i][b] > ratio["int8"][b] for b in batches)],
        "load": load,
    }


def table(result: dict[str, Any]) -> str:
    batch = f"b{result['settings']['batch']}"
    lines = [f"{result['machine']['cpu']}, {result['machine']['cores']} cores, onnxruntime "
             f"{result['machine']['onnxruntime']}, {result['settings']['threads']} threads, graph rewrites "
             f"v{result['graph_version']}; bench-zoo's models (random init); ratio = fp32 ms / model ms (>1: faster "
             f"than fp32), median of {result['settings']['runs']} interleaved runs; load = 1-min load average "
             f"before/after timing",
             "",
             f"| entry | kept in fp32 | nodes | ratio b1 | ratio {batch} | int8 ratio b1 · {batch} | load |",
             "|---|---|---|---|---|---|---|"]
    for row in result["entries"]:
        plain = row["ratio"]["int8"]
        for island, names in row["islands"].items():
            r = row["ratio"][island]
            lines.append(f"| {row['entry']} | {island} | {len(names)} | {r['b1']:.2f} | {r[batch]:.2f} | "
                         f"{plain['b1']:.2f} · {plain[batch]:.2f} | {row['load'][0]:.1f}–{row['load'][1]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.islands", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated entries (default: {','.join(SHORT_ENTRIES)})")
    parser.add_argument("--islands", default=",".join(ISLANDS), help="comma-separated candidate islands")
    parser.add_argument("--calib-root", type=Path, default=DEFAULT_CALIB_ROOT)
    parser.add_argument("--calib-images", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=100, help="batch-1 runs per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-iterations", type=int, default=10, help="runs per model at --batch")
    parser.add_argument("--blocks", type=int, default=8, help="alternating blocks the runs are split in")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="whole timings per entry; ratios are their median")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_islands"))
    args = parser.parse_args(argv)
    try:
        names = args.models.split(",") if args.models else list(SHORT_ENTRIES)
        args.islands = args.islands.split(",")
        unknown = sorted(set(args.islands) - set(ISLANDS))
        if unknown:
            raise QuantizeError(f"unknown islands {', '.join(unknown)}; known: {', '.join(ISLANDS)}")
        if not args.calib_root.is_dir():
            raise QuantizeError(f"--calib-root {args.calib_root} is not a folder of images")
        image_cache: dict = {}
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": package_version("onnxruntime")},
            "graph_version": GRAPH_VERSION,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "models"},
            "entries": [],
        }
        rows = []
        for name in names:
            row = measure(name, args, image_cache)
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{tag} {r['b1']:.2f}/{r[f'b{args.batch}']:.2f}"
                                          for tag, r in row["ratio"].items() if tag != "fp32")
                  + f" (b1/b{args.batch}; load {row['load'][0]:.1f}-{row['load'][1]:.1f})", file=sys.stderr,
                  flush=True)
            result["entries"] = merged_entries(args.out / "islands.json", SCHEMA, rows, list(SHORT_ENTRIES))
            write_text(args.out / "islands.json", json.dumps(result, indent=2) + "\n")
            write_text(args.out / "islands.md", "# int8 with fp32 islands vs fp32 (`make bench-islands`)\n\n"
                       + table(result) + "\n")
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
