"""int8 against fp32 speed of every zoo entry, and where each one's time goes (``make bench-zoo``).

    python -m quantize.bench.zoo [--models a,b] [--calib-root DIR] [--calib-images 50] [--iterations 100]
                                 [--batch 32] [--batch-iterations 10] [--threads 2] [--before] [--out DIR]

For each entry: random-init weights (int8 kernels do not depend on the values), exported as the export stage does,
calibrated on ``--calib-images`` class-balanced images in the entry's own preprocessing (``model.preprocess``)
(percentile) and quantized in the default recipe's int8 layout (U8S8 per-channel QDQ, shared Concat ranges, a
stem before a MaxPool in fp32), all with the current graph rewrites. ``--before`` also builds the int8 model without the rewrites of issue #17
(``graph.optimize.ZOO_REWRITES``), to show what they changed.

Timing is ``stages.speed.time_blocks``: fp32 and int8 (and the before model) in alternating blocks, one session
alive at a time, ``--threads`` intra-op threads, median ms at batch 1 and at ``--batch``; ratio = fp32 / int8
(>1: int8 faster); ``--runs N`` repeats the whole timing and keeps the median ratio (every run's ratios are in
the JSON: this machine's speed drifts by 10-30% between runs). The exported fp32 model carries the exporter's shape
arithmetic and ShuffleNet's channel shuffle as Reshape/Transpose; the rewrites that only remove that work
(``graph.optimize.exact_fp32``) speed fp32 up too, so the rewritten fp32 graph is timed in the same alternation and
``ratio_best_fp32`` is int8 against the faster of the two fp32 graphs: how much of the lead is int8's own. The 1-minute load average is recorded before and after each entry's timing: on a shared 2-core
machine ratios measured under load (above ~2) are lower than in a quiet hour, batch 1 most of all. Then ONNX
Runtime's profiler gives each model's kernel time per operator type (``--profile-runs`` runs at each batch), the
"where the time goes" columns.

Writes ``zoo.json`` (schema ``quantize-bench-zoo/1``) and ``zoo.md`` (one table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantize.core.artifacts import read_json, write_text
from quantize.core.errors import QuantizeError
from quantize.core.runtime import cpu_name, input_name, make_session
from quantize.bench.latency import REWRITTEN, package_version, write_rewritten_fp32
from quantize.graph.optimize import VERSION as GRAPH_VERSION, ZOO_REWRITES, optimize
from quantize.stages.speed import time_blocks

SCHEMA = "quantize-bench-zoo/1"
DEFAULT_CALIB_ROOT = Path("../shared/data/imagenet/sample")  # the 200 sample photos, beside the project


def zoo_names() -> list[str]:
    from quantize.models.zoo import entries
    return [e.name for e in entries()]


def build(entry: Any, work: Path, check_batch: np.ndarray) -> Path:
    """The entry's random-init fp32 ONNX model, exported as the export stage does."""
    from quantize.models.registry import build_model
    from quantize.stages.export import export_onnx

    model = build_model(entry.arch, pretrained=False, num_classes=entry.num_classes)
    path = work / "model.onnx"
    export_onnx(model, path, check_batch, opset=11, tolerance=1e-2)
    return path


def calibrated(fp32: Path, images: np.ndarray, work: Path, skip: tuple[str, ...] = (), tag: str = "int8"
               ) -> tuple[Path, Path, dict]:
    """The rewritten graph (``skip`` leaves rewrites out), its ranges (percentile, each Concat's inputs and output on
    one range) and the rewrite counts, written to ``work`` under ``tag``."""
    from quantize.accuracy.shared_ranges import share_concat_ranges
    from quantize.stages.calibrate import calibrate, save_ranges

    rewritten, report = optimize(onnx.load(str(fp32)), skip=skip)
    graph = work / f"{tag}.rewritten.onnx"
    onnx.save(rewritten, str(graph))
    ranges = work / f"{tag}.ranges.json"
    batches = (images[i:i + 10] for i in range(0, len(images), 10))
    save_ranges(calibrate(graph, batches, method="percentile", optimize_graph=False), ranges)
    shared = work / f"{tag}.ranges.shared.json"
    share_concat_ranges(rewritten, ranges, shared)
    return graph, shared, report.as_dict()


def quantized(fp32: Path, images: np.ndarray, work: Path, skip: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """Calibrate (percentile) and quantize the rewritten graph in the default recipe's int8 layout (U8S8
    per-channel QDQ, each Concat's inputs and output on one range, which ONNX Runtime runs as a copy, and a stem
    before a MaxPool kept in fp32: ``quant.float_stem``); ``skip`` leaves rewrites out, and then the stem in int8
    too, as before issue #17. The default recipe's other parts change values only, not the kernels timed here.
    Returns the int8 path and the rewrite counts."""
    from quantize.stages.static_quant import quantize_model

    tag = "before" if skip else "int8"
    graph, ranges, report = calibrated(fp32, images, work, skip, tag)
    out = work / f"{tag}.onnx"
    quantize_model(graph, ranges, out, method="percentile", optimize_graph=False, float_stem=not skip)
    return out, report


def profile(path: Path, batch: np.ndarray, runs: int, threads: int, scratch: Path) -> dict[str, float]:
    """Mean kernel milliseconds per run, by operator type, from ONNX Runtime's profiler."""
    session = make_session(path, threads=threads, profile_prefix=str(scratch / "profile"))
    feed = {input_name(session): batch}
    for _ in range(2 + runs):  # the first two are warm-up, left out below
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    model_runs = [e["ts"] for e in events if e.get("name") == "model_run"]
    keep_from = model_runs[-runs] if len(model_runs) >= runs else 0
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= keep_from:
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def top(ops: dict[str, float], n: int = 4) -> list[list]:
    total = sum(ops.values()) or 1.0
    return [[op, round(ms, 3), round(100 * ms / total, 1)] for op, ms in list(ops.items())[:n]]


def entry_and_images(name: str, args: argparse.Namespace, image_cache: dict) -> tuple[Any, np.ndarray]:
    """The zoo entry ``name`` and its calibration images in its own preprocessing (``image_cache`` keeps them per
    preprocessing across entries)."""
    from quantize.data.preprocess import Preprocess
    from quantize.models.zoo import entries

    entry = entries([name])[0]
    preprocess = Preprocess.from_config(entry.preprocess)
    key = repr(preprocess.key())
    if key not in image_cache:
        image_cache[key] = calibration_images(args.calib_root, args.calib_images, preprocess)
    return entry, image_cache[key]


def interleaved_ms(models: dict[str, Path], args: argparse.Namespace
                   ) -> tuple[list[dict[str, dict[str, float]]], np.ndarray, np.ndarray, list[float]]:
    """``args.runs`` whole timings of every model, interleaved (``time_blocks``) at batch 1 and ``args.batch`` on
    random inputs: per run, the median ms by model and batch (``b1``, ``b<batch>``); the two inputs; and the load
    average before and after."""
    rng = np.random.default_rng(0)
    single = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    batched = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    load_before = os.getloadavg()[0]
    per_run = []
    for _ in range(args.runs):
        b1 = time_blocks(models, single, args.iterations, threads=args.threads, warmup=3, blocks=args.blocks)
        bn = time_blocks(models, batched, args.batch_iterations, threads=args.threads, warmup=3,
                         blocks=min(args.blocks, args.batch_iterations))
        per_run.append({tag: {"b1": 1000 * statistics.median(b1[tag]),
                              f"b{args.batch}": 1000 * statistics.median(bn[tag])} for tag in models})
    return per_run, single, batched, [round(load_before, 2), round(os.getloadavg()[0], 2)]


def measure(name: str, args: argparse.Namespace, image_cache: dict) -> dict[str, Any]:
    entry, images = entry_and_images(name, args, image_cache)
    with tempfile.TemporaryDirectory(prefix="bench-zoo.") as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        fp32 = build(entry, work, images[:2])
        int8, rewrites = quantized(fp32, images, work)
        models = {"fp32": fp32, REWRITTEN: write_rewritten_fp32(fp32, work / "fp32.rewritten.onnx"), "int8": int8}
        if args.before:
            models["before"], _ = quantized(fp32, images, work, skip=ZOO_REWRITES)
        build_seconds = time.perf_counter() - started
        per_run, single, batched, load = interleaved_ms(models, args)
        ms = {tag: {k: statistics.median(run[tag][k] for run in per_run) for k in per_run[0][tag]} for tag in models}
        ratios = [{k: run["fp32"][k] / run["int8"][k] for k in run["fp32"]} for run in per_run]
        best = [{k: min(run["fp32"][k], run[REWRITTEN][k]) / run["int8"][k] for k in run["fp32"]}
                for run in per_run]
        where = {tag: {"b1": top(profile(models[tag], single, args.profile_runs * 5, args.threads, work)),
                       f"b{args.batch}": top(profile(models[tag], batched, args.profile_runs, args.threads, work))}
                 for tag in ("fp32", "int8")}
    row: dict[str, Any] = {
        "entry": name, "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "ms": ms,
        "ratio": {k: statistics.median(r[k] for r in ratios) for k in ratios[0]},  # median over runs
        "ratios": ratios,
        # against the faster of the exported fp32 model and the same after the layout-only rewrites (exact_fp32)
        "ratio_best_fp32": {k: statistics.median(r[k] for r in best) for k in best[0]},
        "ratios_best_fp32": best,
        "where": where, "load": load,
        "rewrites": {k: v for k, v in rewrites.items() if not k.startswith("folded_")},
        "build_seconds": round(build_seconds, 1),
    }
    if args.before:
        row["ratio_before"] = {k: ms["fp32"][k] / ms["before"][k] for k in ms["fp32"]}
    return row


def merged_entries(path: Path, schema: str, rows: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """The rows of an earlier result at ``path`` (of ``schema``) for other entries, then ``rows``, in ``order``: a
    run over some entries updates those and keeps the rest, so each entry can be timed in its own quiet window."""
    earlier = []
    if path.is_file():
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and old.get("schema") == schema:
            earlier = [r for r in old.get("entries", []) if r.get("entry") not in {row["entry"] for row in rows}]
    rank = {name: k for k, name in enumerate(order)}
    return sorted(earlier + rows, key=lambda r: (rank.get(r["entry"], len(rank)), r["entry"]))


def calibration_images(root: Path, count: int, preprocess: Any) -> np.ndarray:
    from quantize.data.samples import balanced_subset, iter_batches, list_samples

    samples = balanced_subset(list_samples(root), count, seed=0)
    return np.concatenate([batch for batch, _ in iter_batches(samples, 25, preprocess)])


def table(result: dict[str, Any]) -> str:
    batch = f"b{result['settings']['batch']}"
    before = result["settings"]["before"]
    lines = [f"{result['machine']['cpu']}, {result['machine']['cores']} cores, onnxruntime "
             f"{result['machine']['onnxruntime']}, {result['settings']['threads']} threads, graph rewrites "
             f"v{result['graph_version']}; random-init weights, {result['settings']['calib_images']} calibration "
             f"images; ratio = fp32 ms / int8 ms (>1: int8 faster); load = 1-min load average before/after timing",
             "",
             f"| entry | fp32 ms b1 | rewritten fp32 ms b1 | int8 ms b1 | fp32 ms {batch} | rewritten fp32 ms {batch} | "
             f"int8 ms {batch} | ratio b1 | ratio {batch} | against the faster fp32, b1 · {batch} |"
             + (" before b1 · " + batch + " |" if before else "")
             + f" load | int8 time goes to ({batch}) | fp32 time goes to ({batch}) |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if before else "") + "---|---|---|"]
    for row in result["entries"]:
        ms, ratio = row["ms"], row["ratio"]
        where = {tag: ", ".join(f"{op} {share:.0f}%" for op, _, share in row["where"][tag][batch][:3])
                 for tag in ("int8", "fp32")}
        rewritten, best = ms.get(REWRITTEN), row.get("ratio_best_fp32")
        cells = [row["entry"], f"{ms['fp32']['b1']:.2f}", f"{rewritten['b1']:.2f}" if rewritten else "—",
                 f"{ms['int8']['b1']:.2f}", f"{ms['fp32'][batch]:.1f}",
                 f"{rewritten[batch]:.1f}" if rewritten else "—", f"{ms['int8'][batch]:.1f}", f"{ratio['b1']:.2f}",
                 f"{ratio[batch]:.2f}", f"{best['b1']:.2f} · {best[batch]:.2f}" if best else "—"]
        if before:
            cells.append(f"{row['ratio_before']['b1']:.2f} · {row['ratio_before'][batch]:.2f}")
        cells += [f"{row['load'][0]:.1f}–{row['load'][1]:.1f}", where["int8"], where["fp32"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated entries (default: the whole zoo)")
    parser.add_argument("--calib-root", type=Path, default=DEFAULT_CALIB_ROOT)
    parser.add_argument("--calib-images", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=100, help="batch-1 runs per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-iterations", type=int, default=10, help="runs per model at --batch")
    parser.add_argument("--blocks", type=int, default=8, help="alternating blocks the runs are split in")
    parser.add_argument("--profile-runs", type=int, default=3, help="profiled runs at --batch (5x at batch 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="whole timings per entry; ratios are their median")
    parser.add_argument("--before", action="store_true",
                        help="also time the int8 model built without the rewrites of issue #17")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo"))
    args = parser.parse_args(argv)
    try:
        names = args.models.split(",") if args.models else zoo_names()
        if not args.calib_root.is_dir():
            raise QuantizeError(f"--calib-root {args.calib_root} is not a folder of images (make bench-zoo CALIB=...)")
        image_cache: dict = {}
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": package_version("onnxruntime")},
            "graph_version": GRAPH_VERSION,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "entries": [],
        }
        rows = []
        for name in names:
            row = measure(name, args, image_cache)
            rows.append(row)
            result["entries"] = merged_entries(args.out / "zoo.json", SCHEMA, rows, zoo_names())
            print(f"{name}: int8/fp32 b1 {row['ratio']['b1']:.2f}x, b{args.batch} {row['ratio'][f'b{args.batch}']:.2f}x"
                  f" (load {row['load'][0]:.1f}-{row['load'][1]:.1f})", file=sys.stderr, flush=True)
            result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            write_text(args.out / "zoo.json", json.dumps(result, indent=2) + "\n")  # after each entry: partial runs
            write_text(args.out / "zoo.md", "# int8 vs fp32 across the zoo (`make bench-zoo`)\n\n" + table(result)
                       + "\n")
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
