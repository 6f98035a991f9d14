"""One table from many runs: every ``report.json`` under a folder (a Hydra multirun, a release).

Hydra calls :class:`AggregateReports` when a multirun ends (see conf/config.yaml), whichever launcher ran the
jobs (local joblib workers or a SLURM cluster through submitit); ``python -m quantize.sweep DIR`` does the same
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

from .artifacts import write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = ["model", "calib", "quant", "fp32 top-1", "fp32 top-5", "int8 top-1", "int8 top-5", "drop",
           "agreement", "images", "calib s", "calib MiB"]

_SHORT = {"uint8": "U8", "int8": "S8"}


def collect(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob("report.json"))]


def row(report: dict[str, Any]) -> list[str]:
    calib, quant = report["calib"], report["quant"]
    method = calib["method"] + (f" {calib['percentile']}" if calib.get("percentile") is not None else "")
    scheme = (f"{quant['format'].upper()} {_SHORT[quant['activation_type']]}{_SHORT[quant['weight_type']]} "
              f"{'per-channel' if quant['per_channel'] else 'per-tensor'}")
    return [report["model"], method, scheme, f"{report['fp32']['top1']:.2f}", f"{report['fp32']['top5']:.2f}",
            f"{report['int8']['top1']:.2f}", f"{report['int8']['top5']:.2f}", f"{report['drop_top1']:.2f}",
            f"{report['agreement_top1']:.2f}", str(report["eval"]["num_images"]), f"{calib['seconds']:.1f}",
            f"{calib['peak_rss_mb']:.0f}"]


def render(reports: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in sorted(reports, key=lambda r: (r["model"], row(r)[1:3]))]
    return "\n".join(lines) + "\n"


def write_summary(root: Path) -> Path | None:
    reports = collect(root)
    if not reports:
        log.warning("no report.json under %s: nothing to aggregate", root)
        return None
    write_text(root / "summary.md", render(reports))
    write_json(root / "summary.json", [dict(zip(COLUMNS, row(r))) for r in reports])
    log.info("aggregated %d runs into %s", len(reports), root / "summary.md")
    return root / "summary.md"


class AggregateReports(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.sweep", description=__doc__.split("\n")[0])
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
