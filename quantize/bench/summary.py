"""The README's figures, rendered from the committed benchmark artifacts (``make readme-figures``).

    python -m quantize.bench.summary [--results benchmarks/results] [--readme README.md] [--check]

Every figure block of the README sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``. Each block
is rendered here from JSON files the ``make bench*`` commands wrote, and ends by naming them. Without ``--check`` the
blocks are rewritten in place; with it, the command exits 1 naming every block that differs from its artifacts (the
test suite runs the check, so a README figure cannot drift from the file it came from).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from quantize.bench.accuracy import bits_name, bits_of, left_out_name, paired_agreement
from quantize.core.artifacts import write_text

SHOWN_AS = "benchmarks/results"  # how the README names the results folder, wherever it was read from
NETWORKS = {"shufflenet_v2_x1_0": "ShuffleNetV2 x1.0", "efficientnet_lite0": "EfficientNet-Lite0"}
BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _artifacts_of(results: Path, *patterns: str) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(network title, path, content) of every artifact matching ``patterns`` in each network's folder, in order."""
    for model, title in NETWORKS.items():
        for pattern in patterns:
            for path in sorted((results / model).glob(pattern)):
                yield title, path, json.loads(path.read_text())


def _pm(value: float | None, se: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "—"
    value = round(value, digits) + 0.0  # no "-0.00"
    return f"{value:.{digits}f}{unit}" + ("" if se is None else f" ± {se:.{digits}f}{unit}")


def _spread(values: list[float]) -> str:
    return f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""


def _load_range(loads: list[float] | None) -> str:
    if not loads:
        return "not recorded"
    return f"{min(loads):.1f}–{max(loads):.1f}"


def _artifacts(paths: list[Path], results: Path) -> str:
    if not paths:
        return "Artifacts: none yet (run the command above)."
    return "Artifacts: " + ", ".join(f"`{SHOWN_AS}/{p.relative_to(results)}`" for p in paths) + "."


def _bench_load(bench: dict[str, Any]) -> list[float]:
    load = bench.get("load_average_1min") or {}
    return [load[k] for k in ("before", "after") if k in load]


def _speed_cell(bench: dict[str, Any], part: str, key: str, run_key: str | None = None) -> str:
    """The int8 speedup of ``bench`` (the median run when it has several), with the range over its runs
    (``run_key`` of each run, by default its plain speedup at that batch)."""
    value = f"{bench[part][key]['int8']:.2f}×"
    runs = bench.get("runs") or []
    run_key = run_key or ("b1" if part == "latency" else "batch")
    spread = _spread([r[run_key]["int8"] for r in runs if run_key in r])
    return value + (f"{spread[:-1]}, {len(runs)} runs)" if spread else "")


def networks(results: Path) -> str:
    """Both real-weights networks: fp32, int8 with the default recipe, drop, agreement, speed (issue 13)."""
    rows, used, loads, timed = [], [], [], []
    for model, title in NETWORKS.items():
        default, plain = results / model / "accuracy.json", results / model / "accuracy-plain.json"
        bench_path = results / model / "bench.json"
        acc, base, bench = _load(default), _load(plain), _load(bench_path)
        used += [p for p in (default, plain, bench_path) if p.is_file()]
        a = (acc or {}).get("all", {})
        speed = faster = "—"
        if bench:
            speed = " · ".join(_speed_cell(bench, part, key) for part, key in
                               (("latency", "speedup_p50"), ("throughput", "speedup")))
            if "speedup_vs_faster_fp32" in bench["latency"]:
                faster = " · ".join(_speed_cell(bench, part, "speedup_vs_faster_fp32", run_key) for part, run_key in
                                    (("latency", "b1_vs_faster_fp32"), ("throughput", "batch_vs_faster_fp32")))
            loads += _bench_load(bench)
            run = bench.get("run") or {}
            timed.append(f"{title} {run.get('methods') or 'unrecorded recipe'}"
                         + (f" ({run['calib']} ranges)" if run.get("calib") else ""))
        rows.append(f"| {title} | {_pm(a.get('fp32_top1'), None, 1)} | {_pm(a.get('int8_top1'), None, 1)} | "
                    f"{_pm(a.get('drop'), a.get('drop_se'))} | {_pm(a.get('agreement'), a.get('agreement_se'), unit='%')} "
                    f"| {_pm((base or {}).get('all', {}).get('agreement'), (base or {}).get('all', {}).get('agreement_se'), unit='%')} "
                    f"| {speed} | {faster} |")
    acc_any = _load(results / next(iter(NETWORKS)) / "accuracy.json") or {}
    head = ("| network | fp32 top-1 | int8 top-1 | drop (points) | agreement with fp32 (views) | plain recipe's "
            "agreement | int8 / fp32 speed, batch 1 · 32 | int8 / faster fp32 graph, 1 · 32 |\n"
            "|---|---|---|---|---|---|---|---|")
    note = (f"Top-1 on the {acc_any.get('all', {}).get('photos', '?')} sample photos, each calibrated on the other "
            f"fold ({len(acc_any.get('folds', []))}-fold); agreement on {acc_any.get('views_per_photo', '?')} views "
            f"per held-out photo; ± standard errors clustered by photo. Speed: ONNX Runtime, the default recipe's int8 "
            f"model against the exported fp32 model, ratio of medians; the last column against the faster of that "
            f"model and the same after the exact rewrites that only remove work or change the layout "
            f"(`graph.optimize.exact_fp32`: shape arithmetic folded, the channel shuffle as Split and Concat), timed "
            f"in the same alternation (load {_load_range(loads)} while timed; int8 models timed: "
            f"{', '.join(timed) or 'none'}).")
    return "\n".join([head, *rows, "", note, _artifacts(used, results)]) + "\n"


def ablations(results: Path) -> str:
    """Every ``accuracy-<tag>.json`` beside the default's: what each variant of the recipe measured."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "accuracy.json", "accuracy-*.json"):
        used.append(path)
        a = data["all"]
        tag = path.stem.partition("-")[2] or "default"
        overrides = " ".join(o for o in data.get("overrides", []) if not o.startswith("model.checkpoint="))
        default = _load(path.parent / "accuracy.json")
        paired = paired_agreement(data, default) if tag != "default" and default else None
        rows.append(f"| {title} | {tag} | `{overrides or '(none)'}` | "
                    f"{_pm(a['agreement'], a['agreement_se'], unit='%')} | "
                    f"{_pm(*paired) if paired else '—'} | {_pm(a['drop'], a['drop_se'])} | "
                    f"{_load_range(data.get('load_average'))} |")
    head = ("| network | variant | overrides | agreement (views) | minus the default's, paired (points) | "
            "drop (photos) | load |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows, "", _artifacts(used, results)]) + "\n"


def decomposition(results: Path) -> str:
    """Where the default recipe's disagreement comes from: its int8 model against the same with only the weights, or
    only the activations, quantized (``make bench-accuracy DECOMPOSE=1``, on the same held-out views)."""
    rows, used = [], []
    for model, title in NETWORKS.items():
        path = results / model / "accuracy.json"
        data = _load(path)
        if not data or "half_quantized" not in data:
            continue
        used.append(path)
        halves, a = data["half_quantized"], data["all"]
        cells = [_pm(a["agreement"], a["agreement_se"], unit="%")]
        for name in ("weights_only", "activations_only"):
            cells.append(_with_paired(halves[name], data))
        rows.append(f"| {title} | {' | '.join(cells)} | {_load_range(data.get('load_average'))} |")
    head = ("| network | int8 (default recipe) | only the weights quantized (minus int8's, paired) | only the activations "
            "quantized (minus int8's, paired) | load |\n|---|---|---|---|---|")
    note = ("Agreement with fp32 on the held-out views of the default cross-validation; the half-quantized models are "
            "the int8 model's own weights in the fp32 graph, and the int8 model with the fp32 weights back "
            "(`quantize/accuracy/partial_quant.py`).")
    group_rows = []
    for model, title in NETWORKS.items():
        data = _load(results / model / "accuracy.json") or {}
        for name, group in data.get("activation_groups", {}).items():
            group_rows.append(f"| {title} | {name} | {_pm(group['agreement'], group['agreement_se'], unit='%')} |")
    groups = []
    if group_rows:
        groups = ["", "Each group of the int8 model's activation quantizers alone on the fp32 graph (groups by where the "
                  "tensor sits: the input, the first part of its name, `channels` for the Concats of the channel-shuffle "
                  "rewrite, `output` for the logits):", "",
                  "| network | activation quantizers | agreement with fp32 (views), only these quantized |",
                  "|---|---|---|", *group_rows]
    return "\n".join([head, *rows, "", note, *groups, *_wider_activations(results), *_left_out(results), "",
                      _artifacts(used, results)]) + "\n"


def _paired(measured: dict[str, Any], baseline_views: dict[str, int],
            data: dict[str, Any]) -> tuple[float, float] | None:
    """``measured`` (a decomposing model's figures in the accuracy result ``data``) minus the model whose agreeing
    views per photo are ``baseline_views``, paired over photos."""
    views = data["views_per_photo"]
    return paired_agreement({"agreeing_views": measured["agreeing_views"], "views_per_photo": views},
                            {"agreeing_views": baseline_views, "views_per_photo": views})


def _with_paired(measured: dict[str, Any], data: dict[str, Any]) -> str:
    """``measured``'s agreement, and in brackets minus the int8 model's of the same accuracy result, paired."""
    paired = _paired(measured, data["agreeing_views"], data)
    return f"{_pm(measured['agreement'], measured['agreement_se'], unit='%')} ({_pm(*paired) if paired else '—'})"


ONLY_CLIPPING = 16  # activation bits from which the emulated rounding is too fine to matter


def _wider_activations(results: Path) -> list[str]:
    """Lines on the int8 model with every activation quantizer emulated with more bits on its range
    (``ACT_BITS``), with its int8 weights and with the fp32 ones, each paired against the int8 model."""
    rows = []
    for model, title in NETWORKS.items():
        data = _load(results / model / "accuracy.json") or {}
        wider = data.get("activation_bits")
        if not wider:
            continue
        rows.append(f"| {title} | 8 (the int8 model; only its activations quantized) | "
                    f"{_pm(data['all']['agreement'], data['all']['agreement_se'], unit='%')} | "
                    f"{_with_paired(data['half_quantized']['activations_only'], data)} |")
        for bits in sorted({bits_of(name)[1] for name in wider} - {8}):
            cells = [_with_paired(wider[bits_name(w, bits)], data) for w in (8, 32)]
            label = f"{bits} (rounding negligible: the ranges' clipping is left)" if bits >= ONLY_CLIPPING else bits
            rows.append(f"| {title} | {label} | {' | '.join(cells)} |")
    if not rows:
        return []
    return ["", "The int8 model with every activation quantizer emulated with more bits (`ACT_BITS`: the same ranges, "
            "with 2^(bits - 8) times as many levels, emulated in float: ONNX Runtime's int8 CPU kernels take 8-bit "
            "activations), with the int8 weights and with the fp32 ones:", "", "| network | activation bits | with the int8 weights (minus the int8 model's, paired) "
            "| with the fp32 weights (minus the int8 model's, paired) |", "|---|---|---|---|", *rows]


SHOWN_LEFT_OUT = 5  # the quantizers whose removal raised the activations-only model's agreement most


def _left_out(results: Path) -> list[str]:
    """Lines on the activations-only model with each activation quantizer left out in turn (``DECOMPOSE=quantizers``),
    each paired against that model: the ones whose removal helped most, and how many there were."""
    rows, counts = [], []
    for model, title in NETWORKS.items():
        data = _load(results / model / "accuracy.json") or {}
        left_out = data.get("left_out_quantizers")
        if not left_out:
            continue
        baseline = data["half_quantized"]["activations_only"]["agreeing_views"]
        paired = {name: _paired(m, baseline, data) for name, m in left_out.items()}
        ranked = sorted(left_out, key=lambda name: -(paired[name] or (0.0, 0.0))[0])
        counts.append(f"{title}: {len(left_out)} quantizers")
        for name in ranked[:SHOWN_LEFT_OUT]:
            m = left_out[name]
            rows.append(f"| {title} | {left_out_name(name, m, code=True)} | "
                        f"{_pm(m['agreement'], m['agreement_se'], unit='%')} | "
                        f"{_pm(*paired[name]) if paired[name] else '—'} |")
    if not rows:
        return []
    return ["", f"The activations-only model with each activation quantizer left out in turn (quantizers on one range "
            f"joined by ops that only move values, such as a stage's Splits and Concats, count as one, named by the "
            f"first with how many more it holds; {', '.join(counts)}), the {SHOWN_LEFT_OUT} whose removal raised its "
            "agreement most:",
            "", "| network | quantizer left out | agreement with fp32 (views) | minus the activations-only model's, "
            "paired (points) |", "|---|---|---|---|", *rows]


def stability(results: Path) -> str:
    """The default int8 model's agreement beside the fp32 model's agreement with itself under input changes nobody
    would see (``make bench-stability``, on the same views as ``make bench-accuracy``)."""
    rows, used, changes = [], [], []
    for model, title in NETWORKS.items():
        path, accuracy_path = results / model / "stability.json", results / model / "accuracy.json"
        data, accuracy = _load(path), _load(accuracy_path)
        if not data:
            continue
        used += [accuracy_path, path] if accuracy else [path]
        changes = changes or list(data["perturbations"])
        if list(data["perturbations"]) != changes:
            raise ValueError(f"{path}: perturbations {list(data['perturbations'])}, another network's {changes}")
        int8 = _pm(accuracy["all"]["agreement"], accuracy["all"]["agreement_se"], unit="%") if accuracy else "—"
        cells = [_pm(m["agreement"], m["agreement_se"], unit="%") for m in data["perturbations"].values()]
        rows.append(f"| {title} | {int8} | {' | '.join(cells)} | {_load_range(data.get('load_average'))} |")
    head = ("| network | int8 (default recipe) against fp32 | "
            + " | ".join(f"fp32 with {c} against fp32" for c in changes) + " | load |\n|---|---|"
            + "---|" * len(changes) + "---|")
    note = ("Top-1 agreement on the same views of the same photos (the int8 figure is the default cross-validation's, "
            "each photo held out from calibration); pixel noise of standard deviation 0.25, 0.5 or 1 pixel level is "
            "added to the 8-bit crop and rounded back; the shift moves the crop's content one pixel right "
            "(`quantize/bench/stability.py`).")
    return "\n".join([head, *rows, "", note, "", _artifacts(used, results)]) + "\n"


def calibration(results: Path) -> str:
    """Seconds and peak RSS of this project's calibration against the stock path (``make bench-calib``)."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "bench_calib.json"):
        used.append(path)
        by_size: dict[int, dict[str, str]] = {}
        for run in data["runs"]:
            cell = (f"{run['seconds']:.1f} s, {run['peak_rss_mb']:.0f} MiB" if run["status"] == "ok"
                    else f"{run['status']} at {data['rss_cap_gb']:g} GiB" if run["status"] == "killed" else run["status"])
            by_size.setdefault(run["images"], {})[f"{run['path']} {run['method']}"] = cell
        for images, cells in sorted(by_size.items()):
            rows.append(f"| {title} | {images} | " + " | ".join(cells.get(c, "—") for c in CALIBRATION_COLUMNS) + " |")
    head = ("| network | images | " + " | ".join(CALIBRATION_COLUMNS) + " |\n|---|---|"
            + "---|" * len(CALIBRATION_COLUMNS))
    return "\n".join([head, *rows, "", _artifacts(used, results)]) + "\n"


CALIBRATION_COLUMNS = ("project minmax", "project percentile", "stock percentile")


def evaluation(results: Path) -> str:
    """The 50,000-image evaluation estimate per way of running it (``make bench-eval``)."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "bench_eval.json"):
        used.append(path)
        for run in data["runs"]:
            rows.append(f"| {title} | {run['run']} | {run['images_per_second']:.0f} | "
                        f"{run['minutes_for_50000']:.1f} min |")
    head = "| network | run | images/s | 50,000 images |\n|---|---|---|---|"
    return "\n".join([head, *rows, "", _artifacts(used, results)]) + "\n"


def zoo(results: Path) -> str:
    """int8 / fp32 speed of every zoo entry (``make bench-zoo``)."""
    path = results / "zoo" / "zoo.json"
    data = _load(path)
    if data is None:
        return "(no zoo.json yet: run make bench-zoo)\n"
    batch = data["settings"]["batch"]
    rows = []
    for row in data["entries"]:
        spread = {k: _spread([r[k] for r in row.get("ratios", [])]) for k in row["ratio"]}
        best = row.get("ratio_best_fp32")
        rows.append(f"| {row['entry']} | {row['ratio']['b1']:.2f}×{spread['b1']} | "
                    f"{row['ratio'][f'b{batch}']:.2f}×{spread[f'b{batch}']} | "
                    + (f"{best['b1']:.2f}× · {best[f'b{batch}']:.2f}× | " if best else "— | ")
                    + f"{_load_range(row.get('load'))} | "
                    + ", ".join(f"{op} {share:.0f}%" for op, _, share in row["where"]["int8"][f"b{batch}"][:3]) + " |")
    head = (f"| entry | int8 / fp32 batch 1 | batch {batch} | int8 / faster fp32 graph, 1 · {batch} | load | int8 time "
            f"goes to (batch {batch}) |\n|---|---|---|---|---|---|")
    return "\n".join([head, *rows, "", _artifacts([path], results)]) + "\n"


def cost(results: Path) -> str:
    """The default recipe's time and memory against the plain one's (``make bench-cost``)."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "cost.json"):
        used.append(path)
        plain, default = data["recipes"]["plain"], data["recipes"]["default"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in default["stages"].items())
        rows.append(f"| {title} | {data['images']} | {plain['wall_seconds']:.0f} s ({plain['cpu_seconds']:.0f} s), "
                    f"{plain['peak_rss_mb']:.0f} MiB | {default['wall_seconds']:.0f} s ({default['cpu_seconds']:.0f} s), "
                    f"{default['peak_rss_mb']:.0f} MiB | {data['ratio']['wall']:.2f}× ({data['ratio']['cpu']:.2f}× CPU) "
                    f"| {stages} | {data['load_average'][0]:.1f} |")
    head = ("| network | calibration images | plain: wall (CPU), peak RSS | default: wall (CPU), peak RSS | "
            "default / plain | default's stages | load |\n|---|---|---|---|---|---|---|")
    note = "Wall time includes waiting for the two shared cores (load column); CPU seconds are the comparable figure."
    return "\n".join([head, *rows, "", note, _artifacts(used, results)]) + "\n"


def runtimes_accuracy(results: Path) -> str:
    """fp32 and int8 in each deployment runtime on the same images (``make bench-runtimes``)."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "runtimes*.json"):
        used.append(path)
        config = path.stem.partition("_")[2] or "plain recipe (then the default)"
        for name, version in data["runtimes"].items():
            r = data["per_runtime"][name]
            rows.append(f"| {title}, {config} | {name} {version} | {r['fp32']['top1']:.1f} · {r['fp32']['top5']:.1f} "
                        f"| {r['int8']['top1']:.1f} · {r['int8']['top5']:.1f} | {r['agreement_top1']:.1f} | "
                        f"{r['views_agreement_top1']:.2f} | {r['qdq_reference_agreement_top1']['views']:.2f} |")
        for name, pair in data.get("paired", {}).items():
            img, views = pair["images"], pair["views"]
            rows.append(f"| | difference, {pair['against']} − {name} (SE) | | | {img['difference']:+.1f} "
                        f"({img['standard_error']:.2f}) | {views['difference']:+.2f} ({views['standard_error']:.2f}) | |")
    head = ("| network, int8 config | runtime | fp32 top-1 · top-5 | int8 top-1 · top-5 | agreement, photos | "
            "agreement, views | int8 = float QDQ, views |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *rows, "", _artifacts(used, results)]) + "\n"


def runtimes_speed(results: Path) -> str:
    """Both models in both runtimes, as ratios to ONNX Runtime's fp32 (``make bench RUNTIME=onnxruntime,openvino``)."""
    rows, used = [], []
    for title, path, data in _artifacts_of(results, "bench_onnxruntime_openvino.json"):
        used.append(path)
        b1, bn = data["latency"]["speedup_p50"], data["throughput"]["speedup"]
        cells = " | ".join(f"{b1[m]:.2f}× · {bn[m]:.2f}×" for m in ("int8", "openvino fp32", "openvino int8"))
        rows.append(f"| {title} | {cells} | {data['latency']['models']['fp32']['p50_ms']:.1f} ms · "
                    f"{data['throughput']['models']['fp32']['batch_ms_p50']:.0f} ms | {_load_range(_bench_load(data))} |")
    head = ("| network | ONNX Runtime int8, b1 · b32 | OpenVINO fp32, b1 · b32 | OpenVINO int8, b1 · b32 | ONNX Runtime "
            "fp32 time, b1 · b32 | load |\n|---|---|---|---|---|---|")
    return "\n".join([head, *rows, "", _artifacts(used, results)]) + "\n"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "networks": networks, "ablations": ablations, "decomposition": decomposition, "stability": stability,
    "calibration": calibration, "evaluation": evaluation, "zoo": zoo, "cost": cost, "runtimes_accuracy": runtimes_accuracy, "runtimes_speed": runtimes_speed}


def refresh(text: str, results: Path) -> tuple[str, list[str]]:
    """``text`` with every figure block rendered anew, and the names of the blocks that changed."""
    changed: list[str] = []

    def render(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"error: README block figures:{name} has no renderer ({', '.join(RENDERERS)})")
        body = RENDERERS[name](results)
        if body != match.group("body"):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(render, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs from its artifacts")
    args = parser.parse_args(argv)
    if not args.readme.is_file():
        print(f"error: --readme {args.readme} does not exist", file=sys.stderr)
        return 1
    try:
        text, changed = refresh(args.readme.read_text(), args.results)
    except (ValueError, KeyError, TypeError) as exc:  # an artifact that is not what its command writes
        print(f"error: a file in {args.results} could not be read as a benchmark artifact: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if changed:
            print(f"error: README figure blocks differ from {args.results}: {', '.join(changed)} "
                  f"(run make readme-figures)", file=sys.stderr)
            return 1
        return 0
    if changed:
        write_text(args.readme, text)
    print(f"{args.readme}: {', '.join(changed) or 'nothing'} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
