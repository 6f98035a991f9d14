"""One table from many runs: every ``report.json`` under a folder (a Hydra multirun, a release).

Hydra calls :class:`AggregateReports` when a multirun ends (see conf/config.yaml), whichever launcher ran the
jobs (local joblib workers or a SLURM cluster through submitit); ``python -m quantize.jobs.sweep DIR`` does the same
by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from quantize.core.artifacts import write_json, write_text
from quantize.pipeline.plots import drop_vs_speed

log = logging.getLogger(__name__)

COLUMNS = ["model", "calib", "quant", "methods", "runtime", "fp32 top-1", "fp32 top-5", "int8 top-1", "int8 top-5", "drop",
           "±1 image", "drop SE ≤", "agreement", "fp32 nodes", "speedup", "images", "calib s", "calib MiB"]
# The plot marks this region: what the canary must reach (README): speedup >= 1.8x with a drop <= 0.3 points.
GOAL = (1.8, 0.3)

_SHORT = {"uint8": "U8", "int8": "S8"}


def collect(root: Path) -> list[dict[str, Any]]:
    """Every report under ``root``; runs that produced the same int8 model on the same images count once (a grid
    over calib.percentile repeats the minmax run, for example); the same model evaluated in two runtimes is two."""
    reports, seen = [], set()
    for path in sorted(Path(root).rglob("report.json")):
        report = json.loads(path.read_text())
        key = (report["model"], (report.get("onnx") or {}).get("int8_sha256"), report["eval"].get("num_images"),
               report["eval"].get("root"), (report.get("methods") or {}).get("label"), runtime(report))
        if key[1] is not None and key in seen:
            continue
        seen.add(key)
        reports.append(report)
    return reports


def row(report: dict[str, Any]) -> list[str]:
    calib, quant = report["calib"], report["quant"]
    method = calib["method"] + (f" {calib['percentile']}" if calib.get("percentile") is not None else "")
    scheme = (f"{quant['format'].upper()} {_SHORT[quant['activation_type']]}{_SHORT[quant['weight_type']]} "
              f"{'per-channel' if quant['per_channel'] else 'per-tensor'}")
    methods = (report.get("methods") or {}).get("label", "ort")
    budget = report.get("budget")
    fp32_nodes = str(len(budget["fp32_nodes"])) if budget else "0"
    speedup = _speedup(report)
    images = report["eval"]["num_images"]
    return [report["model"], method, scheme, methods, runtime(report), f"{report['fp32']['top1']:.2f}", f"{report['fp32']['top5']:.2f}",
            f"{report['int8']['top1']:.2f}", f"{report['int8']['top5']:.2f}", f"{report['drop_top1']:.2f}",
            f"{100.0 / images:.2f}" if images else "—", _drop_se(images, report["agreement_top1"]),
            f"{report['agreement_top1']:.2f}", fp32_nodes,
            f"{speedup:.2f}" if speedup is not None else "—", str(images), f"{calib['seconds']:.1f}",
            f"{calib['peak_rss_mb']:.0f}"]


def runtime(report: dict[str, Any]) -> str:
    """``openvino 2026.4.1``: the runtime the run evaluated in (reports without one: ONNX Runtime's)."""
    named = report.get("runtime") or {}
    return " ".join(filter(None, [named.get("name", "onnxruntime"),
                                  named.get("version") or (report.get("versions") or {}).get("onnxruntime")]))


def _drop_se(images: int, agreement: float) -> str:
    """Bound on the standard error of the drop (quantize.pipeline.report.sampling_error)."""
    if not images:
        return "—"
    differing = round(images * (100.0 - agreement) / 100.0)
    return f"{100.0 * differing ** 0.5 / images:.2f}"


def _speedup(report: dict[str, Any]) -> float | None:
    """int8 / fp32 speed (>1: int8 faster), when the run measured it (analysis.speed=true or a budget)."""
    speed = report.get("speed")
    return None if not speed else speed.get("int8_speedup")


def plot(reports: list[dict[str, Any]], path: Path) -> Path | None:
    """Top-1 drop against speedup, one point per run that measured its speed."""
    points = []
    for r in reports:
        values = row(r)
        speedup = _speedup(r)
        if speedup is not None:
            points.append((f"{values[1]} {values[3]}", speedup, r["drop_top1"]))
    if not points:
        return None
    models = sorted({r["model"] for r in reports})
    return drop_vs_speed(path, points, f"{', '.join(models)}: top-1 drop vs int8 speedup ({len(points)} runs)",
                         goal=GOAL)


def render(reports: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in sorted(reports, key=lambda r: (r["model"], row(r)[1:4]))]
    return "\n".join(lines) + "\n"


def write_summary(root: Path) -> Path | None:
    reports = collect(root)
    if not reports:
        log.warning("no report.json under %s: nothing to aggregate", root)
        return None
    chart = plot(reports, root / "summary.png")
    write_text(root / "summary.md", render(reports) + (f"\nPlot: `{chart.name}` (top-1 drop vs int8 speedup; "
                                                        f"runs without analysis.speed=true are not on it).\n"
                                                        if chart else ""))
    write_json(root / "summary.json", [dict(zip(COLUMNS, row(r))) for r in reports])
    log.info("aggregated %d runs into %s", len(reports), root / "summary.md")
    return root / "summary.md"


class AggregateReports(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.jobs.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder holding runs (e.g. multirun/<date>)")
    args = parser.parse_args(argv)
    summary = write_summary(args.root)
    if summary is None:
        print(f"error: no report.json under {args.root}", file=sys.stderr)
        return 1
    print(summary.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
