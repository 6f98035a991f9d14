"""Inference benchmark of an fp32 and an int8 model (the vendor ``vamp`` equivalent), in one or more runtimes.

    python -m quantize.bench.latency --fp32 A.onnx --int8 B.onnx [--batch 32] [--iterations 50] [--threads 2] [--out b.json]
    python -m quantize.bench.latency --model shufflenet_v2_x1_0      # the models of the newest run in outputs/<model>/
    python -m quantize.bench.latency --model shufflenet_v2_x1_0 --runtimes onnxruntime,openvino

Two measurements, each timed by ``quantize.stages.speed.time_blocks``: per model, alternating blocks of runs (fp32, int8,
fp32, int8, ...) so that a change of load on a shared machine slows both alike, with only the timed model's session
alive (ONNX Runtime's idle threads of another session would spin on the cores and slow it):

- latency at batch 1: ``--iterations`` single-image runs per model; p50/p90/p99/mean milliseconds;
- throughput at ``--batch``: ``--iterations`` batches per model (5 to 20); images per second from the median batch.

The speedup of each is the ratio of the medians: fp32 time / int8 time (>1: int8 is faster).
Sessions are made as the evaluate stage makes them (all graph optimizations, ``--threads`` intra-op threads).

``--runtimes`` (``quantize.core.inference``) times the same two files in each runtime named, all in one process
and in the same alternation, so every figure is a ratio to ONNX Runtime's fp32 time (always timed, the reference):
ONNX Runtime's models keep their names (``fp32``, ``int8``), another runtime's are ``openvino fp32`` and
``openvino int8``. The 1-minute load average before and after is recorded beside the figures.
The result is written as JSON (``--out``) and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from quantize.core.artifacts import write_text
from quantize.core.errors import QuantizeError
from quantize.core.inference import DEFAULT, RUNTIMES, get_runtime
from quantize.core.runtime import cpu_name
from quantize.data.preprocess import Preprocess
from quantize.stages.speed import time_blocks

SCHEMA = "quantize-bench/1"
REWRITTEN = "fp32_rewritten"  # the fp32 model after the layout-only rewrites (graph.optimize.exact_fp32)


def write_rewritten_fp32(fp32: Path, out: Path) -> Path:
    """``fp32`` after ``graph.optimize.exact_fp32``, written to ``out``: the second fp32 baseline of the timings."""
    import onnx

    from quantize.graph.optimize import exact_fp32
    onnx.save(exact_fp32(onnx.load(str(fp32))), str(out))
    return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _speedup(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    return {name: statistics.median(times[reference]) / statistics.median(own)
            for name, own in times.items() if name != reference}


def in_runtimes(models: dict[str, Path], runtimes: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """The models to time and the runtime of each: ONNX Runtime's fp32 always (the reference) and its other models
    when ``runtimes`` names it; the fp32 and int8 models in every other runtime named, as ``<runtime> fp32`` and
    ``<runtime> int8``. A runtime that is unknown or not installed is a ConfigError (one line)."""
    unknown = [name for name in runtimes if name not in RUNTIMES]
    if unknown or not runtimes:
        raise QuantizeError(f"--runtimes {','.join(runtimes)}: choose from {', '.join(RUNTIMES)}")
    for name in runtimes:
        get_runtime(name)  # fails now, with the install command, rather than after the first runtime's timings
    timed = {name: path for name, path in models.items() if name == "fp32" or DEFAULT in runtimes}
    runtime_of = dict.fromkeys(timed, DEFAULT)
    for runtime in (r for r in dict.fromkeys(runtimes) if r != DEFAULT):
        for name in ("fp32", "int8"):
            timed[f"{runtime} {name}"] = models[name]
            runtime_of[f"{runtime} {name}"] = runtime
    return timed, runtime_of


def run(models: dict[str, Path], batch: int = 32, iterations: int = 50, threads: int = 0, warmup: int = 3,
        image_size: int = 224, reference: str = "fp32", seed: int = 0, blocks: int = 4,
        runtimes: dict[str, str] | None = None) -> dict[str, Any]:
    """Latency percentiles at batch 1 and throughput at ``batch`` for each model, as a JSON-able dict. ``runtimes``
    maps a model's name to the runtime it runs in (``in_runtimes``; default ONNX Runtime)."""
    if iterations < 1 or batch < 1:
        raise QuantizeError("--iterations and --batch must be at least 1")
    runtime_of = {name: (runtimes or {}).get(name, DEFAULT) for name in models}
    load_before = os.getloadavg()
    rng = np.random.default_rng(seed)
    single = rng.normal(size=(1, 3, image_size, image_size)).astype(np.float32)
    latency = time_blocks(models, single, iterations, threads=threads, warmup=warmup, blocks=blocks,
                          runtimes=runtime_of)
    batched = rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32)
    rounds = max(5, min(iterations, 20)) if batch > 1 else iterations
    throughput = time_blocks(models, batched, rounds, threads=threads, warmup=warmup, blocks=blocks,
                             runtimes=runtime_of)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": package_version("onnxruntime")},
        "runtimes": {name: get_runtime(name).version for name in dict.fromkeys(runtime_of.values())},
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "threads": threads, "reference": reference, "blocks": blocks,
        "models": {name: {"path": str(path), "bytes": Path(path).stat().st_size, "runtime": runtime_of[name]}
                   for name, path in models.items()},
        "latency": {"batch": 1, "iterations": iterations, "models": {}},
        "throughput": {"batch": batch, "iterations": rounds, "models": {}},
    }
    for name, values in latency.items():
        ms = [v * 1e3 for v in values]
        result["latency"]["models"][name] = {"p50_ms": _percentile(ms, 50), "p90_ms": _percentile(ms, 90),
                                             "p99_ms": _percentile(ms, 99), "mean_ms": float(np.mean(ms)),
                                             "min_ms": float(np.min(ms))}
    for name, values in throughput.items():
        median = statistics.median(values)
        result["throughput"]["models"][name] = {"images_per_second": batch / median,
                                                "batch_ms_p50": median * 1e3, "batch_ms_min": min(values) * 1e3}
    if reference in models and len(models) > 1:
        result["latency"]["speedup_p50"] = _speedup(latency, reference)
        result["throughput"]["speedup"] = _speedup(throughput, reference)
    if {reference, REWRITTEN, "int8"} <= set(models):  # int8 against the faster of the two fp32 graphs
        for part, times in (("latency", latency), ("throughput", throughput)):
            faster = min(statistics.median(times[reference]), statistics.median(times[REWRITTEN]))
            result[part]["speedup_vs_faster_fp32"] = {"int8": faster / statistics.median(times["int8"])}
    return result


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose int8 batch-1 speedup is the median, with every run's speedups and load under ``runs``."""
    if len(results) == 1 or "speedup_p50" not in results[0]["latency"]:
        return results[0]
    ordered = sorted(results, key=lambda r: r["latency"]["speedup_p50"].get("int8", 0.0))
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["runs"] = [{"b1": r["latency"]["speedup_p50"], "batch": r["throughput"]["speedup"],
                       **({"b1_vs_faster_fp32": r["latency"]["speedup_vs_faster_fp32"],
                           "batch_vs_faster_fp32": r["throughput"]["speedup_vs_faster_fp32"]}
                          if "speedup_vs_faster_fp32" in r["latency"] else {}),
                       "load_average_1min": r["load_average_1min"]} for r in results]
    return median


def package_version(package: str) -> str:
    try:
        from importlib import metadata
        return metadata.version(package)
    except Exception:  # not installed
        return "unknown"


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lat, thr = result["latency"], result["throughput"]
    ref = result["reference"]
    runtimes = result.get("runtimes") or {"onnxruntime": result["machine"]["onnxruntime"]}
    load = result.get("load_average_1min")
    lines = [f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
             + ", ".join(f"{name} {version}" for name, version in runtimes.items())
             + f", {result['threads'] or 'all'} threads"
             + (f"; load average {load['before']:.2f} before, {load['after']:.2f} after" if load else ""),
             "",
             f"| model | b1 p50 ms | b1 p90 ms | b1 p99 ms | b{thr['batch']} images/s | speedup b1 | speedup b{thr['batch']} |",
             "|---|---|---|---|---|---|---|"]
    for name, stats in lat["models"].items():
        rate = thr["models"][name]["images_per_second"]
        s1 = lat.get("speedup_p50", {}).get(name)
        sb = thr.get("speedup", {}).get(name)
        lines.append(f"| {name} | {stats['p50_ms']:.2f} | {stats['p90_ms']:.2f} | {stats['p99_ms']:.2f} | {rate:.1f} | "
                     f"{'—' if name == ref or s1 is None else f'{s1:.2f}x'} | "
                     f"{'—' if name == ref or sb is None else f'{sb:.2f}x'} |")
    return "\n".join(lines)


def run_reports(model: str, outputs: Path = Path("outputs"), run: Path | None = None
                ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The readable ``report.json`` files of ``model``'s runs under ``outputs/<model>/``, newest first; with ``run``
    (a run directory), that run's alone."""
    found = [run / "report.json"] if run is not None else (outputs / model).glob("*/report.json")
    for report in sorted(found, key=lambda p: p.stat().st_mtime if p.is_file() else 0, reverse=True):
        try:
            content = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            yield report, content


def models_of_run(model: str, outputs: Path = Path("outputs"), run: Path | None = None) -> dict[str, Path]:
    """fp32 and int8 ONNX paths recorded in the newest report of ``model`` under ``outputs/<model>/`` (or in the
    report of ``run``)."""
    for _, report in run_reports(model, outputs, run):
        try:
            fp32, int8 = Path(report["onnx"]["fp32_path"]), Path(report["onnx"]["int8_path"])
        except (KeyError, TypeError):
            continue
        if fp32.is_file() and int8.is_file():
            return {"fp32": fp32, "int8": int8}
    if run is not None:
        raise QuantizeError(f"--run {run}: no report.json naming both ONNX models on disk there")
    raise QuantizeError(f"no run of {model} with both ONNX models on disk under {outputs / model}/; run the pipeline "
                        f"first (make quantize MODEL={model} DATA=...) or pass --fp32 and --int8")


def recipe_of_run(model: str, int8: Path, outputs: Path = Path("outputs"), run: Path | None = None
                  ) -> dict[str, Any] | None:
    """How the run that wrote ``int8`` quantized it (methods label, calibration method, quant preset block), so a
    timing names the recipe it timed."""
    for path, report in run_reports(model, outputs, run):
        if report.get("onnx", {}).get("int8_path") == str(int8):
            config = report.get("config", {})
            return {"report": str(path), "methods": report.get("methods", {}).get("label"),
                    "calib": config.get("calib", {}).get("method"), "quant": config.get("quant")}
    return None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--fp32/--int8, or --model (+ --outputs): how the benchmark commands name the two models; --preprocess: how
    they are fed."""
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--model", help="take --fp32/--int8 from the newest run of this zoo entry in --outputs")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--run", type=Path, help="with --model: that run's models (a run directory, e.g. "
                        "outputs/<model>/<time>) rather than the newest run's")
    add_preprocess_argument(parser)


def add_preprocess_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preprocess", metavar="ENTRY",
                        help="feed the models as zoo entry ENTRY is fed (its model.preprocess); default: as the "
                        "newest run of --model was fed, else that entry's, else the standard ImageNet transform")


def chosen_preprocess(args: argparse.Namespace) -> Preprocess:
    """The preprocessing ``add_preprocess_argument`` asked for (see its help)."""
    from quantize.config import CONF_DIR, model_entry

    def entry(name: str) -> Preprocess:
        return Preprocess.from_config(model_entry(name).preprocess)

    if getattr(args, "preprocess", None):
        return entry(args.preprocess)
    model = getattr(args, "model", None)
    if model:
        for _, report in run_reports(model, getattr(args, "outputs", Path("outputs")), getattr(args, "run", None)):
            settings = (report.get("preprocess") or {}).get("settings")
            if isinstance(settings, dict):
                return Preprocess.from_config(settings)
        if (CONF_DIR / "model" / f"{model}.yaml").is_file():
            return entry(model)
    return Preprocess()


def chosen_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Path]:
    """The fp32 and int8 paths ``add_model_arguments`` asked for; QuantizeError when one is missing."""
    if args.fp32 and args.int8:
        models = {"fp32": args.fp32, "int8": args.int8}
    elif args.model:
        models = models_of_run(args.model, args.outputs, args.run)
    else:
        parser.error("give --fp32 and --int8, or --model")
    for name, path in models.items():
        if not Path(path).is_file():
            raise QuantizeError(f"--{name} {path} does not exist")
    return models


def emit(result: dict[str, Any], model: str | None, out: Path | None, as_table, markdown: bool = False) -> int:
    """Name the model in ``result``, write it as JSON to ``out`` (atomically; with ``markdown`` its table beside it
    as ``.md``) and print its table."""
    if model:
        result["model"] = model
    table = as_table(result)
    if out:
        write_text(out, json.dumps(result, indent=2) + "\n")
        if markdown:
            write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def measure_and_emit(measure: Callable[[], dict[str, Any]], out: Path | None, as_table) -> int:
    """Run ``measure`` and ``emit`` its result with its Markdown table; a ``QuantizeError`` is one line and exit 1."""
    try:
        result = measure()
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return emit(result, None, out, as_table, markdown=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.latency", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="batch of the throughput measurement")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs at the start of each block")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks the runs of each model are split in")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every core)")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole measurements in a row; the figures are the median run's, every run's speedups "
                             "are kept (this machine's speed drifts by 10-30%% from one run to the next)")
    parser.add_argument("--with-rewritten-fp32", action="store_true",
                        help="also time the fp32 model after the exact rewrites that only remove work or change the "
                             "layout (graph.optimize.exact_fp32), and int8 against the faster fp32 graph: how much of "
                             "the int8 speedup the rewrites alone give")
    parser.add_argument("--runtimes", default=DEFAULT,
                        help=f"comma-separated runtimes to time both models in ({', '.join(RUNTIMES)}); ONNX "
                             f"Runtime's fp32 is always timed, as the reference")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        models = chosen_models(args, parser)
        runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
        in_runtimes(models, runtimes)  # refuse a runtime that is missing before anything is timed
        with tempfile.TemporaryDirectory(prefix="bench.") as scratch:
            if args.with_rewritten_fp32:
                models[REWRITTEN] = write_rewritten_fp32(models["fp32"], Path(scratch) / "fp32.rewritten.onnx")
            timed, runtime_of = in_runtimes(models, runtimes)
            if args.runs < 1:
                raise QuantizeError(f"--runs {args.runs}: at least 1")
            results = [run(timed, batch=args.batch, iterations=args.iterations, threads=args.threads,
                           warmup=args.warmup, blocks=args.blocks, image_size=chosen_preprocess(args).crop,
                           runtimes=runtime_of) for _ in range(args.runs)]
            result = median_run(results)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.model and not (args.fp32 and args.int8):
        result["run"] = recipe_of_run(args.model, models["int8"], args.outputs, args.run)
    return emit(result, args.model, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
