"""Calibration benchmark: this project's streaming calibration against ONNX Runtime's stock ``quantize_static``.

    python -m quantize.bench.calibration --onnx model.onnx --root /data/val --sizes 250,500,1000 [--out bench_calib.json]

For every number of images N and every method, one run in a fresh child process (so its peak resident memory is
its own) on the same class-balanced N images, decoded the same way:

- ``project``: ``quantize.stages.calibrate.calibrate`` (``--methods``, default minmax and percentile), batches of 8;
- ``stock``: ``onnxruntime.quantization.quantize_static`` with a data reader over all N images and the same
  method (``--stock-methods``, default percentile), as ONNX Runtime's image-classification example uses it.

A watchdog in this process reads each child's resident memory every 0.1 s and kills it above ``--rss-cap-gb``, and
after ``--timeout`` seconds: such a run is reported as killed (with the memory it had reached), not suffered.
``--with-torch`` (default on) imports torch in the child first, as the pipeline process has it (the CUDA build of
torch alone is ~0.6 GiB resident), so the figures compare with the pipeline's report. Results: JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantize.core.memory import peak_rss_mb, watch_child

SCHEMA = "quantize-bench-calib/1"


# --- child side -------------------------------------------------------------------------------------------------

def _child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("with_torch"):
        import torch  # noqa: F401  (the pipeline process has it loaded)
    import numpy as np

    from quantize.data.samples import balanced_subset, iter_batches, list_samples
    from quantize.data.preprocess import Preprocess

    samples = balanced_subset(list_samples(spec["root"]), spec["images"], seed=0)
    p = Preprocess.from_config(spec.get("preprocess"))
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if spec["path"] == "project":
        from quantize.stages.calibrate import calibrate
        batches = (b for b, _ in iter_batches(samples, 8, p, workers=2))
        calibration = calibrate(Path(spec["onnx"]), batches, method=spec["method"], threads=spec["threads"])
        result.update(num_images=calibration.num_images, calibration_seconds=calibration.seconds,
                      calibration_peak_rss_mb=calibration.peak_rss_mb, measured_tensors=calibration.measured,
                      tensors=len(calibration.ranges))
    else:
        import tempfile

        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter_batches(samples, 1, p, workers=2)

            def get_next(self):
                item = next(self.batches, None)
                return None if item is None else {"input": np.ascontiguousarray(item[0])}

        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        with tempfile.TemporaryDirectory(prefix="bench-calib.") as scratch:
            quantize_static(spec["onnx"], str(Path(scratch) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[spec["method"]])
        result.update(num_images=len(samples))
    result.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return result


# --- parent side ------------------------------------------------------------------------------------------------

def run_one(spec: dict[str, Any], rss_cap_gb: float, timeout: float, poll: float = 0.1) -> dict[str, Any]:
    """One measurement in a child process under a resident-memory cap and a time limit."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "quantize.bench.calibration", "--child", json.dumps(spec)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    peak, killed = watch_child(process, rss_cap_gb, timeout, poll)
    stdout, stderr = process.communicate()
    elapsed = time.perf_counter() - started
    record = {**{k: spec[k] for k in ("path", "method", "images")}, "wall_seconds": elapsed}
    if killed:
        return {**record, "status": "killed", "reason": killed, "peak_rss_mb_seen": peak / 1024.0}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {**record, "status": "failed", "reason": f"exit code {process.returncode}: {tail}",
                "peak_rss_mb_seen": peak / 1024.0}
    return {**record, "status": "ok", **json.loads(lines[-1]), "peak_rss_mb_seen": peak / 1024.0}


def run(onnx: Path, root: Path, sizes: list[int], methods: list[str], stock_methods: list[str],
        rss_cap_gb: float = 12.0, timeout: float = 1800.0, threads: int = 0, with_torch: bool = True,
        progress=None, preprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """``preprocess``: ``Preprocess.key()`` settings the calibration images are fed with (default: the standard)."""
    runs = []
    for images in sizes:
        for path, path_methods in (("project", methods), ("stock", stock_methods)):
            for method in path_methods:
                spec = {"path": path, "method": method, "images": images, "onnx": str(onnx), "root": str(root),
                        "threads": threads, "with_torch": with_torch, "preprocess": preprocess}
                record = run_one(spec, rss_cap_gb, timeout)
                runs.append(record)
                if progress:
                    progress(record)
    summary = _summary(runs)
    return {"schema": SCHEMA, "onnx": str(onnx), "root": str(root), "preprocess": preprocess,
            "rss_cap_gb": rss_cap_gb, "timeout": timeout,
            "threads": threads, "with_torch": with_torch, "runs": runs, "summary": summary}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per image count: percentile / minmax time of the project path, and memory growth across image counts."""
    ok = {(r["path"], r["method"], r["images"]): r for r in runs if r["status"] == "ok"}
    summary: dict[str, Any] = {"percentile_over_minmax": {}, "rss_growth": {}}
    for (path, method, images), r in ok.items():
        if path == "project" and method == "percentile" and ("project", "minmax", images) in ok:
            summary["percentile_over_minmax"][str(images)] = \
                r["calibration_seconds"] / ok[("project", "minmax", images)]["calibration_seconds"]
    for method in {m for (p, m, _) in ok if p == "project"}:
        sizes = sorted(i for (p, m, i) in ok if p == "project" and m == method)
        if len(sizes) > 1:
            first, last = ok[("project", method, sizes[0])], ok[("project", method, sizes[-1])]
            summary["rss_growth"][method] = {"from": sizes[0], "to": sizes[-1],
                                             "ratio": last["peak_rss_mb"] / first["peak_rss_mb"]}
    return summary


def table(result: dict[str, Any]) -> str:
    lines = ["| path | method | images | status | seconds | peak RSS MiB | note |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r["status"] == "ok":
            seconds = r.get("calibration_seconds", r["seconds"])
            lines.append(f"| {r['path']} | {r['method']} | {r['images']} | ok | {seconds:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | |")
        else:
            lines.append(f"| {r['path']} | {r['method']} | {r['images']} | {r['status']} | "
                         f"{r['wall_seconds']:.1f} | {r['peak_rss_mb_seen']:.0f} (seen) | {r['reason']} |")
    ratios = result["summary"]["percentile_over_minmax"]
    if ratios:
        lines.append("")
        lines.append("percentile / minmax time (project): " + ", ".join(f"{k} images {v:.2f}x" for k, v in ratios.items()))
    for method, growth in result["summary"]["rss_growth"].items():
        lines.append(f"peak RSS {method}: {growth['from']} -> {growth['to']} images x{growth['ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="the fp32 model (the export stage's model.onnx)")
    parser.add_argument("--model", help="instead of --onnx: the newest export of this zoo entry in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--root", type=Path, required=True, help="image folder (synset folders or flat + labels)")
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--methods", default="minmax,percentile", help="methods of this project's calibration")
    parser.add_argument("--stock-methods", default="percentile", help="methods of the stock path ('' for none)")
    parser.add_argument("--rss-cap-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--without-torch", action="store_true", help="do not import torch in the children first")
    parser.add_argument("--out", type=Path)
    from quantize.bench.latency import add_preprocess_argument, chosen_preprocess, emit
    from quantize.core.errors import QuantizeError

    add_preprocess_argument(parser)
    args = parser.parse_args(argv)
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    if args.onnx is None:
        if not args.model:
            parser.error("give --onnx or --model")
        exports = sorted((args.work_dir / args.model).glob("export-*/model.onnx"), key=lambda p: p.stat().st_mtime)
        exports = [p for p in exports if (p.parent / "record.json").is_file()]
        if not exports:
            print(f"error: no export of {args.model} under {args.work_dir / args.model}/; run "
                  f"`python -m quantize +model={args.model} data.root=... stages=[export]` first", file=sys.stderr)
            return 1
        args.onnx = exports[-1]
    try:
        preprocess = chosen_preprocess(args).key()
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = run(args.onnx, args.root, [int(s) for s in split(args.sizes)], split(args.methods),
                 split(args.stock_methods), args.rss_cap_gb, args.timeout, args.threads, not args.without_torch,
                 progress=lambda r: print(f"  {r['path']} {r['method']} {r['images']}: {r['status']}", file=sys.stderr),
                 preprocess=preprocess)
    return emit(result, args.model, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
