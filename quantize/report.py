"""Report stage: one JSON for machines and one Markdown table for people, in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .artifacts import write_json, write_text

log = logging.getLogger(__name__)


def build_report(cfg: DictConfig, records: dict[str, dict[str, Any]], versions: dict[str, str]) -> dict[str, Any]:
    export, calib, quant, ev = (records[s] for s in ("export", "calibrate", "quantize", "evaluate"))
    ref = dict(OmegaConf.to_container(cfg.model.reference))
    if ref["top1"] is None and cfg.model.arch.startswith("torchvision/"):
        from .models.torchvision_models import published_reference

        ref.update(published_reference(cfg.model.arch.split("/", 1)[1]) or {}, source="torchvision weights metadata")
    return {
        "model": cfg.model.name,
        "source": cfg.model.source,
        "calib": {"method": calib["method"], "num_images": calib["num_images"], "seconds": calib["seconds"],
                  "peak_rss_mb": calib["peak_rss_mb"], "percentile": cfg.calib.percentile
                  if calib["method"] == "percentile" else None, "root": calib["root"], "list": calib.get("list"),
                  "list_sha256": calib.get("list_sha256"), "cached": calib["cached"]},
        "fp32": ev["fp32"],
        "int8": ev["int8"],
        "drop_top1": ev["fp32"]["top1"] - ev["int8"]["top1"],
        "agreement_top1": ev["agreement_top1"],
        "eval": {"num_images": ev["num_images"], "root": ev["root"], "seconds": ev["seconds"],
                 "images_per_second": ev["images_per_second"]},
        "reference": {"top1": ref["top1"], "top5": ref["top5"], "source": ref["source"]},
        "export": {"max_abs_diff": export["max_abs_diff"], "seconds": export["seconds"]},
        "complexity": {"params_m": export.get("params_m"), "ops_m": export.get("ops_m"),
                       "ops_kind": export.get("ops_kind"), "reference_params_m": ref.get("params_m"),
                       "reference_ops_m": ref.get("flops_m")},
        "quant": {"format": cfg.quant.format, "activation_type": cfg.quant.activation_type,
                  "weight_type": cfg.quant.weight_type, "per_channel": cfg.quant.per_channel,
                  "seconds": quant["seconds"]},
        "onnx": {"fp32_path": export["path"], "fp32_opset": export["opset"], "fp32_sha256": export["sha256"],
                 "int8_path": quant["path"], "int8_opset": quant["opset"], "int8_sha256": quant["sha256"]},
        "stages": {name: {"dir": r["dir"], "cached": r["cached"], "seconds": r.get("stage_seconds")}
                   for name, r in records.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    fp32, int8, ref = report["fp32"], report["int8"], report["reference"]
    calib = report["calib"]
    lines = [
        f"# {report['model']}: fp32 vs int8",
        "",
        f"{report['eval']['num_images']} images from `{report['eval']['root']}`; calibration: {calib['method']} "
        f"on {calib['num_images']} images"
        + (f" of `{calib['list']}`" if calib["list"] else " selected class-balanced")
        + f" ({_fmt(calib['seconds'], 1)} s, peak RSS {_fmt(calib['peak_rss_mb'], 0)} MiB).",
        "",
        "| | top-1 | top-5 |",
        "|---|---|---|",
        f"| reference fp32 ({ref['source'] or 'unknown'}) | {_fmt(ref['top1'], 3)} | {_fmt(ref['top5'], 3)} |",
        f"| fp32 (ours) | {_fmt(fp32['top1'])} | {_fmt(fp32['top5'])} |",
        f"| int8 (ours) | {_fmt(int8['top1'])} | {_fmt(int8['top5'])} |",
        "",
        f"- top-1 drop: {_fmt(report['drop_top1'])} points; int8 agrees with fp32 on "
        f"{_fmt(report['agreement_top1'])}% of images",
        f"- fp32 model: opset {report['onnx']['fp32_opset']}, "
        + ("imported ONNX (no export)" if report["export"]["max_abs_diff"] is None else
           f"ORT vs PyTorch max abs logit diff {report['export']['max_abs_diff']:.2e}"),
        f"- int8 model: {report['quant']['format'].upper()}, {report['quant']['activation_type']} activations, "
        f"{report['quant']['weight_type']} {'per-channel' if report['quant']['per_channel'] else 'per-tensor'} "
        f"weights, opset {report['onnx']['int8_opset']}: `{report['onnx']['int8_path']}`",
        "",
        "| stage | seconds | cached |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(s['seconds'], 1)} | {'yes' if s['cached'] else 'no'} |"
              for name, s in report["stages"].items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, cfg: DictConfig, records: dict[str, dict[str, Any]],
                 versions: dict[str, str]) -> dict[str, Any]:
    report = build_report(cfg, records, versions)
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", render_markdown(report))
    log.info("report: %s (fp32 top-1 %.2f, int8 top-1 %.2f, agreement %.2f%%)", run_dir / "report.md",
             report["fp32"]["top1"], report["int8"]["top1"], report["agreement_top1"])
    return report
