"""``make release``: every zoo entry quantized into ``release/<model>/`` plus ``release/SUMMARY.md``.

Per model: ``model.onnx``, ``model.int8.onnx``, ``report.json``, ``preprocess.json`` (how to feed both models, readable
without this project) and ``manifest.json`` (resolved config, package versions, sha256 of every input and output,
the calibration list's hash, stage timings, the preprocessing). Stages come from the pipeline's cache, and a file
is only rewritten when its bytes change, so a rerun with nothing changed does no stage work and leaves every byte
(and timestamp) as it was. A model that fails is listed as failed in the summary; the command then exits 1 after
the others are done.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from quantize.core.artifacts import atomic_path, file_sha256, write_text
from quantize.config import compose
from quantize.core.errors import QuantizeError
from quantize.pipeline.records import StageRecord
from quantize.pipeline.runner import Pipeline
from quantize.models.zoo import CONF_MODELS, GENERIC

log = logging.getLogger(__name__)


def zoo_names() -> list[str]:
    return sorted(p.stem for p in CONF_MODELS.glob("*.yaml") if p.stem not in GENERIC)


def compose_model(name: str, overrides: list[str]):
    # the int8 speedup column needs the (cached) speed stage; a user override still wins
    return compose([f"+model={name}", "analysis.speed=true", *overrides])


def write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def copy_if_changed(source: Path, target: Path, sha256: str) -> bool:
    if target.exists() and file_sha256(target) == sha256:
        return False
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return True


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what differs between a computing run and a cached one (cache flags, run folders)."""
    stable = json.loads(json.dumps(report))
    stable["calib"].pop("cached", None)
    stable["stages"] = {name: {"seconds": s["seconds"]} for name, s in stable["stages"].items()}
    stable["onnx"].update(fp32_path="model.onnx", int8_path="model.int8.onnx")
    return stable


def manifest(report: dict[str, Any], records: dict[str, StageRecord], outputs: dict[str, str]) -> dict[str, Any]:
    calib = records["calibrate"]
    return {
        "model": report["model"],
        "config": report["config"],
        "versions": report["versions"],
        "inputs": {
            "model": records["export"].inputs,
            "calibration_images_digest": calib.inputs["images"],
            "calibration_list": calib.list,
            "calibration_list_sha256": calib.list_sha256,
            "evaluation_images_digest": records["evaluate"].inputs["images"],
            "preprocess": calib.inputs["preprocess"],
        },
        # How to feed model.onnx and model.int8.onnx, self-contained (also written alone as preprocess.json)
        "preprocess": report.get("preprocess"),
        "outputs": outputs,
        "stage_seconds": {name: r.stage_seconds for name, r in records.items()},
    }


def release_model(name: str, overrides: list[str], out_root: Path) -> dict[str, Any]:
    cfg = compose_model(name, overrides)
    with tempfile.TemporaryDirectory(prefix="release-run.") as run_dir:
        pipeline = Pipeline(cfg, Path(run_dir))
        report = pipeline.run()
    target = out_root / name
    onnx = report["onnx"]
    changed = copy_if_changed(Path(onnx["fp32_path"]), target / "model.onnx", onnx["fp32_sha256"])
    changed |= copy_if_changed(Path(onnx["int8_path"]), target / "model.int8.onnx", onnx["int8_sha256"])
    report_text = json.dumps(_stable(report), indent=2, sort_keys=True) + "\n"
    changed |= write_if_changed(target / "report.json", report_text)
    # The deploy side's input description beside the models (the vendor flow's vdsp_params file, in JSON).
    preprocess_text = json.dumps({"model": name, **report["preprocess"]}, indent=2, sort_keys=True) + "\n"
    changed |= write_if_changed(target / "preprocess.json", preprocess_text)
    outputs = {"model.onnx": onnx["fp32_sha256"], "model.int8.onnx": onnx["int8_sha256"],
               "report.json": file_sha256(target / "report.json"),
               "preprocess.json": file_sha256(target / "preprocess.json")}
    manifest_text = json.dumps(manifest(report, pipeline.records, outputs), indent=2, sort_keys=True,
                               default=str) + "\n"
    changed |= write_if_changed(target / "manifest.json", manifest_text)
    log.info("release %s: %s", name, "updated" if changed else "unchanged")
    return report


def _num(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summary(results: dict[str, dict[str, Any] | str]) -> str:
    lines = ["# Release summary", "",
             "| model | source | fp32 top-1 | fp32 top-5 | int8 top-1 | int8 top-5 | drop | reference top-1 / top-5 "
             "| params (M) | compute (M) | int8 / fp32 speed (ONNX Runtime) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | failed: {r} | | | | | | | | | |")
            continue
        ref, cx = r["reference"], r["complexity"]
        speed = r.get("speed") or {}
        speedup = speed.get("int8_speedup")
        if speedup:  # the batch it was timed at, as make bench-zoo's columns say it
            speedup_note = f" (b{speed.get('batch_size', '?')})"
        lines.append(
            f"| {name} | {r['source']} | {_num(r['fp32']['top1'])} | {_num(r['fp32']['top5'])} | "
            f"{_num(r['int8']['top1'])} | {_num(r['int8']['top5'])} | {_num(r['drop_top1'])} | "
            f"{_num(ref['top1'], 3)} / {_num(ref['top5'], 3)} | {_num(cx['params_m'], 3)} | "
            f"{_num(cx['ops_m'], 1)} {cx['ops_kind'] or ''} | {_num(speedup)}{'×' + speedup_note if speedup else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.jobs.release", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated zoo entries (default: every entry)")
    parser.add_argument("--out", type=Path, default=Path("release"), help="release folder (default: release)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every model, e.g. data.root=/data/val")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    names = [n for n in args.models.replace(" ", ",").split(",") if n] or zoo_names()
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        print(f"error: unknown models {', '.join(unknown)}; available: {', '.join(zoo_names())}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any] | str] = {}
    for name in names:
        try:
            results[name] = release_model(name, args.overrides, args.out)
        except QuantizeError as exc:
            log.error("release %s failed: %s", name, exc)
            results[name] = str(exc).replace("|", "/")
    write_if_changed(args.out / "SUMMARY.md", summary(results))
    failed = [n for n, r in results.items() if isinstance(r, str)]
    if failed:
        print(f"error: {len(failed)} of {len(names)} models failed: {', '.join(failed)} (see release/SUMMARY.md)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
