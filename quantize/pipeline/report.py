"""Report stage: one JSON for machines and one Markdown table for people, in the run directory."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantize.config import Config

from quantize.core.artifacts import write_json, write_text
from quantize.data.preprocess import Preprocess
from quantize.pipeline.records import EvaluateRecord, StageRecord

log = logging.getLogger(__name__)


def build_report(cfg: Config, records: dict[str, StageRecord], versions: dict[str, str]) -> dict[str, Any]:
    export, calib, quant, ev = (records[s] for s in ("export", "calibrate", "quantize", "evaluate"))
    final = records.get("budget") or records.get("refine") or quant  # the int8 model that was evaluated
    ref = asdict(cfg.model.reference)
    if ref["top1"] is None and cfg.model.arch.startswith("torchvision/"):
        from quantize.models.torchvision_models import published_reference

        ref.update(published_reference(cfg.model.arch.split("/", 1)[1]) or {}, source="torchvision weights metadata")
    return {
        "model": cfg.model.name,
        "source": cfg.model.source,
        "calib": {"method": calib.method, "num_images": calib.num_images,
                  "num_images_requested": calib.num_images_requested, "skipped": calib.skipped,
                  "seconds": calib.seconds,
                  "peak_rss_mb": calib.peak_rss_mb, "percentile": cfg.calib.percentile
                  if calib.method == "percentile" else None, "root": calib.root, "list": calib.list,
                  "list_sha256": calib.list_sha256, "cached": calib.cached},
        "fp32": ev.fp32,
        "int8": ev.int8,
        "drop_top1": ev.fp32["top1"] - ev.int8["top1"],
        "agreement_top1": ev.agreement_top1,
        # the runtime fp32 and int8 ran in (records from before the choice existed were ONNX Runtime's)
        "runtime": ev.runtime or {"name": "onnxruntime", "version": versions.get("onnxruntime")},
        "eval": {"num_images": ev.num_images, "root": ev.root, "seconds": ev.seconds,
                 "limit": ev.limit, "skipped": ev.skipped,
                 "images_per_second": ev.images_per_second,
                 "stage_images_per_second": ev.stage_images_per_second,
                 "minutes_for_50000": ev.minutes_for_50000, "fp32_reused": ev.fp32_reused},
        "reference": {"top1": ref["top1"], "top5": ref["top5"], "source": ref["source"]},
        "preprocess": preprocess_block(cfg, export.path),
        "export": {"max_abs_diff": export.max_abs_diff, "seconds": export.seconds},
        "complexity": {"params_m": export.params_m, "ops_m": export.ops_m,
                       "ops_kind": export.ops_kind, "reference_params_m": ref.get("params_m"),
                       "reference_ops_m": ref.get("flops_m")},
        "quant": {"format": cfg.quant.format, "activation_type": cfg.quant.activation_type,
                  "weight_type": cfg.quant.weight_type, "per_channel": cfg.quant.per_channel,
                  "seconds": quant.seconds},
        "onnx": {"fp32_path": export.path, "fp32_opset": export.opset, "fp32_sha256": export.sha256,
                 "int8_path": final.path, "int8_opset": quant.opset, "int8_sha256": final.sha256,
                 "int8_quantizer_path": quant.path},
        "stages": {name: {"dir": r.dir, "cached": r.cached, "seconds": r.stage_seconds}
                   for name, r in records.items()},
        **accuracy_sections(cfg, records, ev),
        "config": asdict(cfg),
        "versions": versions,
    }


def preprocess_block(cfg: Config, onnx_path: str | None) -> dict[str, Any]:
    """How to feed the models, readable without this project: the settings, the rules behind them and the steps in
    words (``Preprocess.describe``), plus the ONNX input's name."""
    block = Preprocess.from_config(cfg.model.preprocess).describe()
    block["input"] = {"name": _input_name(onnx_path), **block["input"]}
    return block


def _input_name(onnx_path: str | None) -> str | None:
    if not onnx_path or not Path(onnx_path).is_file():
        return None
    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # the name is a convenience; an unreadable file is reported by the stages that use it
        return None
    weights = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in weights]
    return names[0] if len(names) == 1 else None


def accuracy_sections(cfg: Config, records: dict[str, StageRecord], ev: EvaluateRecord) -> dict[str, Any]:
    """Report fields of the accuracy stages (quantize.pipeline.accuracy_stages); each is null when its stage did not run."""
    q = cfg.quant
    kept_stem = _kept_stem(records)
    methods: dict[str, Any] = {"equalize": bool(q.equalize), "balance": bool(q.balance),
                               "shared_concat_ranges": bool(q.shared_concat_ranges),
                               "weight_scales": q.weight_scales, "weight_rounding": q.weight_rounding,
                               "bias_correction": bool(q.bias_correction), "float_stem": bool(q.float_stem),
                               "label": method_label(cfg, float_stem=kept_stem is not None)}
    if kept_stem is not None:
        methods["float_stem_details"] = {"stem": kept_stem}
    if "balance" in records:
        r = records["balance"]
        methods["balance_details"] = {"chains": r.num_chains, "channels": r.channels, "num_images": r.num_images,
                                      "seconds": r.seconds}
    shared = records["quantize"].shared_ranges if "quantize" in records else None
    if shared is not None:
        methods["shared_ranges_details"] = shared
    if "equalize" in records:
        e = records["equalize"]
        methods["equalize_details"] = {"pairs": e.num_pairs, "channels_scaled": e.channels_scaled,
                                       "seconds": e.seconds}
    refine = records.get("refine")
    if refine is not None and refine.weight_scales is not None:
        w = refine.weight_scales
        methods["weight_scales_details"] = {
            "layers": w["layers"], "channels_changed": w["channels_changed"],
            "error_max_scale": w["error_max_scale"], "error_searched": w["error_searched"], "seconds": w["seconds"]}
    if refine is not None and refine.weight_rounding is not None:
        w = refine.weight_rounding
        methods["weight_rounding_details"] = {
            "layers": w["layers"], "layer_sqnr_nearest_db": w["output_error_nearest_db"],
            "layer_sqnr_gptq_db": w["output_error_gptq_db"], "changed_fraction": w["changed_fraction"],
            "seconds": w["seconds"], "skipped": w["skipped"]}
    if refine is not None and refine.bias_correction is not None:
        b = refine.bias_correction
        methods["bias_correction_details"] = {
            "nodes": len(b["nodes"]), "relative_error_before": b["relative_error_before"],
            "relative_error_after": b["relative_error_after"], "mean_abs_error_before": b["mean_abs_error_before"],
            "mean_abs_error_after": b["mean_abs_error_after"], "saturated_channels": b["saturated_channels"],
            "seconds": b["seconds"], "peak_rss_mb": b["peak_rss_mb"]}
    budget = None
    if "budget" in records:
        r = records["budget"]
        budget = {"max_drop": r.max_drop, "max_trials": r.max_trials, "met": r.met, "fp32_nodes": r.excluded,
                  "tune_images": r.tune_images, "tune_fp32_top1": r.tune_fp32_top1,
                  "trials": [{"number": t["number"], "candidate": t["candidate"], "kept": t["kept"], **t["score"],
                              "fp32_nodes": len(t["excluded"])} for t in r.trials],
                  "ranking": r.ranking}
    sensitivity = None
    if "sensitivity" in records:
        r = records["sensitivity"]
        sensitivity = {"output_sqnr_db": r.output_sqnr_db, "num_images": r.num_images, "num_tensors": r.num_tensors,
                       "reference": r.reference, "worst": r.worst, "most_added": r.most_added, "table": r.table,
                       "json": r.json, "png": r.png}
    speed = None
    if "speed" in records:
        r = records["speed"]
        speed = {"batch_size": r.batch_size, "threads": r.threads, "runs": r.runs, "ms": r.ms, "ms_min": r.ms_min,
                 "speedup": r.speedup, "speedup_fastest": r.speedup_fastest, "int8_speedup": r.int8_speedup,
                 "cpu": r.cpu}
        if budget is not None and "int8_all_quantized" in r.speedup:
            budget["speedup_before"] = r.speedup["int8_all_quantized"]
            budget["speedup_after"] = r.speedup["int8"]
    return {"methods": methods, "budget": budget, "sensitivity": sensitivity, "speed": speed,
            "sampling": sampling_error(ev.num_images, ev.agreement_top1)}


def sampling_error(num_images: int, agreement: float) -> dict[str, Any]:
    """How much the top-1 drop can move by chance. The drop is a paired difference: only images where exactly one
    of fp32 and int8 is right move it, so its standard error is sqrt(discordant) / n, and discordant images are
    among those whose predictions differ, which gives a bound from the agreement alone."""
    if not num_images:
        return {"points_per_image": None, "differing_images": None, "drop_standard_error_max": None}
    differing = round(num_images * (100.0 - agreement) / 100.0)
    return {"points_per_image": 100.0 / num_images, "differing_images": differing,
            "drop_standard_error_max": 100.0 * differing ** 0.5 / num_images}


def _kept_stem(records: dict[str, Any]) -> str | None:
    quantized = records.get("quantize")
    return getattr(quantized, "float_stem", None)


def method_label(cfg: Config, float_stem: bool = False) -> str:
    """A short name of the post-training methods used: ``ort``, ``eq+gptq+bc``, ..., ``+budget0.3``; ``fp32stem``
    when ``quant.float_stem`` kept a stem in fp32 (a network without a stem before a MaxPool has none to keep)."""
    q = cfg.quant
    parts = [name for on, name in ((q.pixel_input, "pixels"), (q.equalize, "eq"), (q.balance, "balance"),
                                   (q.shared_concat_ranges, "concat"),
                                   (q.weight_scales == "search", "wscale"), (q.weight_rounding == "gptq", "gptq"),
                                   (q.bias_correction, "bc"),
                                   (float_stem, "fp32stem")) if on]
    label = "+".join(parts) or "ort"
    if q.max_drop is not None:
        label += f"+budget{q.max_drop:g}"
    return label


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _skipped_note(report: dict[str, Any]) -> str:
    """A sentence naming files of the data folders that were not read (report.json lists them), or nothing."""
    notes = []
    for section, what in (("eval", "evaluation"), ("calib", "calibration")):
        skipped = report[section].get("skipped") or {}
        if skipped.get("count"):
            reasons = ", ".join(f"{n} {reason}" for reason, n in skipped["reasons"].items())
            notes.append(f"{skipped['count']} files of the {what} folder skipped ({reasons})")
    return (" " + "; ".join(notes) + "; listed in report.json.") if notes else ""


def render_markdown(report: dict[str, Any]) -> str:
    fp32, int8, ref = report["fp32"], report["int8"], report["reference"]
    calib = report["calib"]
    runtime = " ".join(str(v) for v in (report.get("runtime") or {"name": "onnxruntime"}).values())
    lines = [
        f"# {report['model']}: fp32 vs int8",
        "",
        f"{report['eval']['num_images']} images from `{report['eval']['root']}`; calibration: {calib['method']} "
        f"on {calib['num_images']} images"
        + (f" of `{calib['list']}`" if calib["list"] else " selected class-balanced")
        + f" ({_fmt(calib['seconds'], 1)} s, peak RSS {_fmt(calib['peak_rss_mb'], 0)} MiB)."
        + _skipped_note(report),
        "",
        "| | top-1 | top-5 |",
        "|---|---|---|",
        f"| reference fp32 ({ref['source'] or 'unknown'}) | {_fmt(ref['top1'], 3)} | {_fmt(ref['top5'], 3)} |",
        f"| fp32 (ours, {runtime}) | {_fmt(fp32['top1'])} | {_fmt(fp32['top5'])} |",
        f"| int8 (ours, {runtime}) | {_fmt(int8['top1'])} | {_fmt(int8['top5'])} |",
        "",
        f"- top-1 drop: {_fmt(report['drop_top1'])} points; int8 agrees with fp32 on "
        f"{_fmt(report['agreement_top1'])}% of images",
        f"- runtime: both models evaluated in {runtime} (`eval.runtime`)",
        f"- fp32 model: opset {report['onnx']['fp32_opset']}, "
        + ("imported ONNX (no export)" if report["export"]["max_abs_diff"] is None else
           f"ORT vs PyTorch max abs logit diff {report['export']['max_abs_diff']:.2e}"),
        f"- int8 model: {report['quant']['format'].upper()}, {report['quant']['activation_type']} activations, "
        f"{report['quant']['weight_type']} {'per-channel' if report['quant']['per_channel'] else 'per-tensor'} "
        f"weights, opset {report['onnx']['int8_opset']}: `{report['onnx']['int8_path']}`",
        *_evaluation_speed(report["eval"]),
        "",
        "| stage | seconds | cached |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(s['seconds'], 1)} | {'yes' if s['cached'] else 'no'} |"
              for name, s in report["stages"].items()]
    lines += render_preprocess(report.get("preprocess"))
    lines += render_accuracy(report)
    return "\n".join(lines) + "\n"


def render_preprocess(block: dict[str, Any] | None) -> list[str]:
    """The input the fp32 and int8 models were measured with: what a deployment must feed them."""
    if not block:
        return []
    shape = block["input"]
    name = f"`{shape['name']}`, " if shape.get("name") else ""
    return ["", "## Preprocessing (feed the models exactly this)", "",
            f"Input {name}float32 NCHW [N, 3, {shape['height']}, {shape['width']}], {shape['channels']} channels:", "",
            *[f"{i}. {step}" for i, step in enumerate(block["steps"], 1)]]


def _evaluation_speed(ev: dict[str, Any]) -> list[str]:
    if not ev.get("images_per_second"):
        return []
    stages = ", ".join(f"{name} {rate:.0f}" for name, rate in (ev.get("stage_images_per_second") or {}).items())
    return [f"- evaluation: {ev['images_per_second']:.1f} images/s"
            + (f" (each stage alone, images/s: {stages})" if stages else "")
            + (f"; 50,000 images at this rate: {ev['minutes_for_50000']:.1f} min" if ev.get("minutes_for_50000")
               else "")
            + ("; fp32 predictions reused from an earlier evaluation of the same model and images"
               if ev.get("fp32_reused") else "")]


def render_accuracy(report: dict[str, Any]) -> list[str]:
    """Markdown for the accuracy sections (methods, budget, speed, sensitivity), when present."""
    lines: list[str] = []
    sampling = report.get("sampling") or {}
    per_image = sampling.get("points_per_image")
    methods = report.get("methods") or {}
    if methods.get("label", "ort") != "ort" or per_image:
        lines += ["", "## Methods", "",
                  f"- post-training methods: `{methods.get('label', 'ort')}`"
                  + (f"; sampling error of the drop: one image is {per_image:.2f} top-1 points, and with "
                     f"{sampling['differing_images']} images predicted differently its standard error is at most "
                     f"{sampling['drop_standard_error_max']:.2f} points" if per_image else "")]
    if "equalize_details" in methods:
        e = methods["equalize_details"]
        lines.append(f"- equalization: {e['pairs']} conv pairs, {e['channels_scaled']} channels rescaled")
    if "balance_details" in methods:
        r = methods["balance_details"]
        lines.append(f"- range balancing: {r['chains']} conv chains, {r['channels']} channels rescaled "
                     f"({r['num_images']} images, {r['seconds']:.1f} s)")
    if "shared_ranges_details" in methods:
        r = methods["shared_ranges_details"]
        lines.append(f"- shared Concat ranges: {r['groups']} groups, {r['tensors']} tensors")
    if "weight_scales_details" in methods:
        w = methods["weight_scales_details"]
        lines.append(f"- weight-scale search: {w['layers']} layers, {w['channels_changed']} channels rescaled, "
                     f"weight error {w['error_max_scale']:.3g} -> {w['error_searched']:.3g}")
    if "weight_rounding_details" in methods:
        w = methods["weight_rounding_details"]
        lines.append(f"- GPTQ weight rounding: {w['layers']} layers, mean layer-output SQNR "
                     f"{w['layer_sqnr_nearest_db']:.1f} -> {w['layer_sqnr_gptq_db']:.1f} dB, "
                     f"{100 * w['changed_fraction']:.1f}% of weights off nearest")
    if "bias_correction_details" in methods:
        b = methods["bias_correction_details"]
        lines.append(f"- bias correction: {b['nodes']} nodes, mean per-channel output error "
                     f"{b['mean_abs_error_before']:.4g} -> {b['mean_abs_error_after']:.4g} (relative "
                     f"{100 * b['relative_error_before']:.2f}% -> {100 * b['relative_error_after']:.2f}%)")
    speed = report.get("speed")
    if speed:
        lines += ["", "## Speed", "",
                  f"Batch {speed['batch_size']}, {speed['runs']} runs per model in alternating blocks on "
                  f"{speed['cpu']}, median (fastest in brackets): "
                  + ", ".join(f"{name} {speed['ms'][name]:.2f} ms ({speed['ms_min'][name]:.2f}), "
                              f"{speed['speedup'][name]:.2f}x fp32 ({speed['speedup_fastest'][name]:.2f}x)"
                              for name in speed["ms"])]
    budget = report.get("budget")
    if budget:
        lines += ["", "## Accuracy budget", "",
                  f"max_drop {budget['max_drop']:g} points on {budget['tune_images']} tuning images (fp32 top-1 "
                  f"{budget['tune_fp32_top1']:.2f}; not in the evaluation): "
                  + ("met" if budget["met"] else "NOT met") + f" after {len(budget['trials']) - 1} trials "
                  f"(max {budget['max_trials']}).",
                  "", "Nodes kept in fp32: " + (", ".join(f"`{n}`" for n in budget["fp32_nodes"]) or "none") + "."]
        if "speedup_before" in budget:
            lines.append(f"Speed cost: int8 {budget['speedup_before']:.2f}x fp32 with every node quantized, "
                         f"{budget['speedup_after']:.2f}x with these in fp32.")
        lines += ["", "| trial | node tried in fp32 | kept | tune top-1 | drop | agreement | logits SQNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for t in budget["trials"]:
            lines.append(f"| {t['number']} | {('`' + t['candidate'] + '`') if t['candidate'] else '(as configured)'}"
                         f" | {'yes' if t['kept'] else 'no'} | {t['top1']:.2f} | {t['drop']:.2f} | "
                         f"{t['agreement']:.1f} | {_fmt(t['sqnr_db'], 1)} |")
    sensitivity = report.get("sensitivity")
    if sensitivity:
        lines += ["", "## Sensitivity: where int8 loses", "",
                  f"SQNR of every quantized activation of the int8 model against the {sensitivity['reference']} "
                  f"on {sensitivity['num_images']} calibration images (graph optimizations off, so each "
                  f"DequantizeLinear output is read). Plot: `sensitivity.png`; every tensor: `report.json`.", ""]
        lines += sensitivity["table"]
    return lines


def write_report(run_dir: Path, cfg: Config, records: dict[str, StageRecord],
                 versions: dict[str, str]) -> dict[str, Any]:
    report = build_report(cfg, records, versions)
    if report.get("sensitivity") and Path(report["sensitivity"]["png"]).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report["sensitivity"]["png"], run_dir / "sensitivity.png")
        report["sensitivity"]["png"] = str(run_dir / "sensitivity.png")
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", render_markdown(report))
    log.info("report: %s (fp32 top-1 %.2f, int8 top-1 %.2f, agreement %.2f%%)", run_dir / "report.md",
             report["fp32"]["top1"], report["int8"]["top1"], report["agreement_top1"])
    return report
