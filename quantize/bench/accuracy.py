"""Cross-validated int8 fidelity of a zoo entry: calibrate on one part of a folder, measure on the rest.

    python -m quantize.bench.accuracy --model efficientnet_lite0 --root ../shared/data/imagenet/sample \
        [--folds 2] [--views 12] [--out benchmarks/results/efficientnet_lite0/accuracy.json] [key=value ...]

The images are split into ``--folds`` class-balanced parts. For each part the pipeline quantizes the model with its
config (the defaults plus the given overrides), calibrated on the *other* parts only, and the fp32 and int8 models
are compared on the held-out part:

- top-1 of each and the drop, on the photos themselves (labels needed), with the paired standard error;
- top-1 agreement of int8 with fp32 on ``--views`` views of each held-out photo (the photo, its mirror image, and
  corner and centre crops of both; agreement needs no labels, so every view counts), with a standard error taken
  over photos (views of one photo are not independent); the agreeing views of each photo are kept, so two results
  compare paired (``paired_agreement``).

Every image is fed through the model's own preprocessing. The result is written as JSON and a Markdown table, with
the machine's load average beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image, ImageOps

from quantize.bench.latency import measure_and_emit
from quantize.core.errors import QuantizeError
from quantize.core.runtime import input_name, make_session
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize_batch
from quantize.data.samples import Sample, list_samples

SCHEMA = "quantize-bench-accuracy/1"
CROP_SIDE = 0.85  # corner and centre crops keep this fraction of each side

log = logging.getLogger(__name__)


def folds_of(samples: list[Sample], folds: int) -> list[list[Sample]]:
    """Class-balanced parts: images sorted by class and name, dealt round-robin within each class."""
    if folds < 2:
        raise QuantizeError(f"--folds {folds}: need at least 2 to hold images out of calibration")
    parts: list[list[Sample]] = [[] for _ in range(folds)]
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.label, s.path.name)):
        by_class.setdefault(s.label, []).append(s)
    turn = 0
    for label in sorted(by_class):
        for s in by_class[label]:
            parts[turn % folds].append(s)
            turn += 1
    if any(not p for p in parts):
        raise QuantizeError(f"{len(samples)} images cannot fill {folds} folds")
    return parts


def views_of(image: Image.Image, count: int) -> list[Image.Image]:
    """The photo, its mirror, then corner and centre crops of each (``count`` of them, in that order)."""
    w, h = image.size
    cw, ch = round(w * CROP_SIDE), round(h * CROP_SIDE)
    boxes = [None, (0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h),
             ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)]
    out = []
    for box in boxes:
        view = image if box is None else image.crop(box)
        out += [view, ImageOps.mirror(view)]
    if not 1 <= count <= len(out):
        raise QuantizeError(f"--views {count}: choose 1 to {len(out)}")
    return out[:count]


def view_crops(sample: Sample, p: Preprocess, views: int) -> list[np.ndarray]:
    """The 8-bit model-input crops of the first ``views`` views of a photo (``views_of``), before normalization."""
    return [crop_uint8(view.convert("RGB"), p) for view in views_of(load_rgb(sample.path), views)]


def top1_of(path: Path, batches: list[np.ndarray], threads: int) -> np.ndarray:
    session = make_session(path, threads=threads)
    name = input_name(session)
    return np.concatenate([session.run(None, {name: b})[0].argmax(axis=1) for b in batches])


def held_out_predictions(models: dict[str, Path], samples: list[Sample], p: Preprocess, views: int,
                         threads: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Top-1 of each model on every view of every sample; arrays of shape (len(samples), views)."""
    crops = [crop for s in samples for crop in view_crops(s, p, views)]
    batches = [normalize_batch(np.stack(crops[i:i + batch_size]), p) for i in range(0, len(crops), batch_size)]
    return {name: top1_of(path, batches, threads).reshape(len(samples), views) for name, path in models.items()}


DECOMPOSITIONS = ("halves", "groups", "quantizers")  # each adds to the one before it


def bits_name(weights: int, activations: int) -> str:
    """How a model of ``--activation-bits`` is named in the result: ``w8a10``."""
    return f"w{weights}a{activations}"


def bits_of(name: str) -> tuple[int, int]:
    """``w8a10`` -> (8, 10): the weight and activation bits of a ``bits_name``."""
    weights, activations = name.removeprefix("w").split("a")
    return int(weights), int(activations)


def half_quantized(pipeline: Any, int8: Path, into: Path, decompose: str = "halves",
                   activation_bits: tuple[int, ...] = ()) -> dict[str, Path]:
    """The int8 model with only its weights, and with only its activations, quantized (``accuracy.partial_quant``),
    built from the graph the quantizer read; from ``groups`` on, also the fp32 graph with each group of activation
    quantizers alone (``group:<name>``); with ``quantizers``, also the activations-only model with each quantizer left
    out in turn (``without:<tensor>``, ``partial_quant.left_out_one_at_a_time``). For each of ``activation_bits``,
    every activation quantizer emulated with that many bits on its range, with the int8 weights (``bits:w8a<b>``)
    and with the fp32 ones (``bits:w32a<b>``)."""
    from quantize.accuracy.partial_quant import (activation_groups, activations_only, left_out_one_at_a_time,
                                                 weights_only, with_activations)

    graph, quantized = onnx.load(str(pipeline.accuracy.quantizer_input())), onnx.load(str(int8))
    builds = {"weights_only": lambda: weights_only(graph, quantized),
              "activations_only": lambda: activations_only(graph, quantized)}
    groups = activation_groups(graph, quantized) if activation_bits or DECOMPOSITIONS.index(decompose) >= 1 else {}
    every = [t for group in groups.values() for t in group]
    for bits in activation_bits:
        builds[f"bits:{bits_name(8, bits)}"] = lambda bits=bits: with_activations(weights_only(graph, quantized),
                                                                                 quantized, every, bits)
        builds[f"bits:{bits_name(32, bits)}"] = lambda bits=bits: with_activations(graph, quantized, every, bits)
    if DECOMPOSITIONS.index(decompose) >= 1:
        for group, tensors in groups.items():
            builds[f"group:{group}"] = lambda tensors=tensors: with_activations(graph, quantized, tensors)
    if DECOMPOSITIONS.index(decompose) >= 2:
        for tensor, others in left_out_one_at_a_time(graph, quantized).items():
            builds[f"without:{tensor}"] = lambda others=others: with_activations(graph, quantized, others)
    paths = {}
    for k, (name, build) in enumerate(builds.items()):
        paths[name] = into / f"half{k}.onnx"
        onnx.save(build(), str(paths[name]))
    return paths


def left_out_name(first: str, measured: dict[str, Any], code: bool = False) -> str:
    """A left-out quantizer as tables name it: its first tensor, and how many more tensors it rounds (``joined``)."""
    more = len(measured.get("joined", [first])) - 1
    name = f"`{first}`" if code else first
    return name + (f" and {more} more on its range" if more else "")


def joined_on_one_range(pipeline: Any, int8: Path) -> dict[str, list[str]]:
    """The int8 model's activation quantizers as ``DECOMPOSE=quantizers`` leaves them out: first tensor -> every tensor
    on its range (``partial_quant.joined_quantizers``)."""
    from quantize.accuracy.partial_quant import joined_quantizers

    return joined_quantizers(onnx.load(str(pipeline.accuracy.quantizer_input())), onnx.load(str(int8)))


def agreement_of(pred: np.ndarray, fp32: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of ``pred`` with ``fp32`` (both (photos, views)) on all views, its standard error clustered by
    photo (views of one photo are not independent)."""
    per_photo = (pred == fp32).mean(axis=1)
    return {"agreement": 100 * float(per_photo.mean()),
            "agreement_se": 100 * float(per_photo.std(ddof=1)) / math.sqrt(len(per_photo)) if len(per_photo) > 1
            else None}


def fold_metrics(pred: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Drop on the photos (paired), agreement on all views (clustered by photo), each with its standard error."""
    right = {k: (pred[k][:, 0] == labels).astype(float) for k in ("fp32", "int8")}
    diff = right["fp32"] - right["int8"]
    n = len(labels)
    return {"photos": n, "views": int(pred["fp32"].size),
            "fp32_top1": 100 * right["fp32"].mean(), "int8_top1": 100 * right["int8"].mean(),
            "drop": 100 * diff.mean(), "drop_se": 100 * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else None,
            **agreement_of(pred["int8"], pred["fp32"]),
            "photo_agreement": 100 * float((pred["fp32"][:, 0] == pred["int8"][:, 0]).mean())}


def combined(pred_by_fold: list[dict[str, np.ndarray]], labels_by_fold: list[np.ndarray]) -> dict[str, Any]:
    pred = {k: np.concatenate([p[k] for p in pred_by_fold]) for k in ("fp32", "int8")}
    return fold_metrics(pred, np.concatenate(labels_by_fold))


def copy_tree(samples: list[Sample], root: Path, into: Path) -> Path:
    """The calibration part as a folder of its own (synset folders as in ``root``)."""
    for s in samples:
        target = into / s.path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, target)
    return into


def run(model: str, root: Path, overrides: list[str], folds: int = 2, views: int = 12, work_dir: Path | None = None,
        threads: int = 0, decompose: str | None = None, activation_bits: tuple[int, ...] = ()) -> dict[str, Any]:
    """The cross-validated figures; with ``decompose`` (one of ``DECOMPOSITIONS``) also the agreement of the
    decomposing models ``half_quantized`` builds, on the same views (``activation_bits`` implies ``halves``)."""
    if activation_bits and not decompose:
        decompose = "halves"
    from quantize.jobs.release import compose_model
    from quantize.pipeline.runner import Pipeline

    root = root.expanduser().resolve()
    samples = list_samples(root)
    parts = folds_of(samples, folds)
    work_dir = (work_dir or Path("artifacts")).resolve()
    results, preds, labels, per_photo, joined = [], [], [], {}, []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy.") as scratch:
        for k, held_out in enumerate(parts):
            calib = [s for j, part in enumerate(parts) if j != k for s in part]
            calib_root = copy_tree(calib, root, Path(scratch) / f"calib{k}")
            cfg = compose_model(model, [f"data.root={calib_root}", "calib.list=null", f"calib.num_images={len(calib)}",
                                        f"work_dir={work_dir}", f"threads={threads}", "analysis.speed=false",
                                        *overrides])
            pipeline = Pipeline(cfg, Path(scratch) / f"run{k}")
            fp32 = Path(pipeline.get("export").path)
            int8 = Path(pipeline.accuracy.final_int8().path)
            models = {"fp32": fp32, "int8": int8}
            if decompose:
                halves = Path(scratch) / f"halves{k}"
                halves.mkdir()
                models.update(half_quantized(pipeline, int8, halves, decompose, activation_bits))
            if decompose == "quantizers":
                joined.append(joined_on_one_range(pipeline, int8))
            pred = held_out_predictions(models, held_out, pipeline.preprocess, views, threads)
            fold_labels = np.array([s.label for s in held_out])
            results.append({"fold": k, "calibration_images": len(calib), **fold_metrics(pred, fold_labels)})
            preds.append(pred)
            labels.append(fold_labels)
            for name in pred:
                if name == "fp32":
                    continue
                agreeing = (pred["fp32"] == pred[name]).sum(axis=1)
                per_photo.setdefault(name, {}).update(
                    {s.path.relative_to(root).as_posix(): int(n) for s, n in zip(held_out, agreeing)})
            log.info("fold %d: %s", k, json.dumps(results[-1]))
    result = {"schema": SCHEMA, "model": model, "root": str(root), "overrides": overrides, "folds": results,
              "all": combined(preds, labels), "views_per_photo": views, "agreeing_views": per_photo["int8"]}
    if decompose:
        fp32_all = np.concatenate([p["fp32"] for p in preds])

        def measured(name: str) -> dict[str, Any]:
            return {**agreement_of(np.concatenate([p[name] for p in preds]), fp32_all),
                    "agreeing_views": per_photo[name]}

        result["half_quantized"] = {name: measured(name) for name in ("weights_only", "activations_only")}
        for prefix, key in (("group:", "activation_groups"), ("without:", "left_out_quantizers"),
                            ("bits:", "activation_bits")):
            names = [name for name in preds[0] if name.startswith(prefix)]
            if any(set(names) != {n for n in p if n.startswith(prefix)} for p in preds):
                raise QuantizeError(f"the folds' int8 models hold different activation quantizers ({key})")
            if names:
                result[key] = {name.split(":", 1)[1]: measured(name) for name in names}
        if joined:
            if any(j != joined[0] for j in joined):
                raise QuantizeError("the folds' int8 models join other activation quantizers on one range")
            for first, measured_left_out in result["left_out_quantizers"].items():
                measured_left_out["joined"] = joined[0][first]
    return {**result, "seconds": time.perf_counter() - started,
            "load_average": list(os.getloadavg()), "cores": os.cpu_count()}


def paired_agreement(variant: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, float] | None:
    """Agreement of ``variant`` minus ``baseline`` (two results of ``run`` on the same photos and views), in points,
    with its standard error over photos: both were measured on the same views, so the difference is far less noisy
    than either figure. None when either lacks per-photo counts or they cover other photos."""
    a, b = variant.get("agreeing_views"), baseline.get("agreeing_views")
    if not a or not b or set(a) != set(b) or variant["views_per_photo"] != baseline["views_per_photo"] or len(a) < 2:
        return None
    photos = sorted(a)
    diff = 100 * (np.array([a[p] for p in photos]) - np.array([b[p] for p in photos])) / variant["views_per_photo"]
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def as_table(result: dict[str, Any]) -> str:
    def se(value: float | None) -> str:
        return f" ± {value:.2f}" if value is not None else ""

    lines = [f"{result['model']}: {len(result['folds'])}-fold, calibrated on the other folds, "
             f"{result['views_per_photo']} views per held-out photo "
             f"(overrides: {' '.join(result['overrides']) or 'none'}; load {result['load_average'][0]:.1f} "
             f"on {result['cores']} cores)", "",
             "| fold | photos | fp32 top-1 | int8 top-1 | drop | agreement (views) | agreement (photos) |",
             "|---|---|---|---|---|---|---|"]
    for row in [*result["folds"], {**result["all"], "fold": "all"}]:
        lines.append(f"| {row['fold']} | {row['photos']} | {row['fp32_top1']:.1f} | {row['int8_top1']:.1f} | "
                     f"{row['drop']:.2f}{se(row['drop_se'])} | {row['agreement']:.2f}{se(row['agreement_se'])} "
                     f"({row['views']}) | {row['photo_agreement']:.1f} |")
    for name, half in result.get("half_quantized", {}).items():
        lines.append(f"\nOnly the {name.split('_')[0]} quantized: agreement {half['agreement']:.2f}"
                     f"{se(half['agreement_se'])} (views)")
    for name, group in result.get("activation_groups", {}).items():
        lines.append(f"\nOnly the activation quantizers of {name}: agreement {group['agreement']:.2f}"
                     f"{se(group['agreement_se'])} (views)")
    for name, m in result.get("activation_bits", {}).items():
        weights, activations = bits_of(name)
        lines.append(f"\nWeights {weights} bits, activations {activations} bits (the int8 model's activation "
                     f"ranges): agreement {m['agreement']:.2f}{se(m['agreement_se'])} (views)")
    left_out = result.get("left_out_quantizers", {})
    for name, m in sorted(left_out.items(), key=lambda item: -item[1]["agreement"]):
        lines.append(f"\nThe activations-only model without the quantizer of {left_out_name(name, m)}: agreement "
                     f"{m['agreement']:.2f}{se(m['agreement_se'])} (views)")
    return "\n".join(lines)


# The default recipe with each part taken away in turn, and the named presets: ``--variant NAME`` runs one
# (``make bench-ablations`` all), written as ``accuracy-NAME.json``; the README's ablation table lists them.
VARIANTS: dict[str, list[str]] = {
    "plain": ["quant=u8s8_plain", "calib=percentile"],
    "gptq-only": ["quant=u8s8_accurate", "calib=percentile"],
    "no-balance": ["quant.balance=false"],
    "percentile": ["calib=percentile"],
    "no-shared-concat": ["quant.shared_concat_ranges=false"],
    "no-weight-scales": ["quant.weight_scales=max"],
    "no-gptq": ["quant.weight_rounding=nearest"],
    "bias-correction": ["quant.bias_correction=true"],
    "pixel-input": ["quant.pixel_input=true"],
    "int8-stem": ["quant.float_stem=false"],
}


def bit_widths(text: str) -> tuple[int, ...]:
    """``9,10,12`` -> (9, 10, 12), each one ``with_activations`` can emulate."""
    from quantize.accuracy.partial_quant import ACTIVATION_BITS

    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: bit widths separated by commas, e.g. 9,10,12") from None
    if not all(b in ACTIVATION_BITS for b in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: each width {ACTIVATION_BITS[0]} to {ACTIVATION_BITS[-1]}")
    return widths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="zoo entry (conf/model/)")
    parser.add_argument("--root", type=Path, required=True, help="image folder (synset folders or flat + labels)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--views", type=int, default=12, help="views per held-out photo for agreement (1-12)")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON result (a .md table is written beside it)")
    parser.add_argument("--decompose", choices=DECOMPOSITIONS, help="also measure the int8 model with only its "
                        "weights, and with only its activations, quantized (halves), each group of activation "
                        "quantizers alone (groups, with the halves), and the activations-only model with each "
                        "quantizer left out in turn (quantizers, with the groups): where the disagreement comes from")
    parser.add_argument("--activation-bits", type=bit_widths, default=(), metavar="BITS[,BITS...]",
                        help="also measure the int8 model with every activation quantizer emulated with BITS bits on "
                        "its range, with the int8 and with the fp32 weights (implies --decompose halves)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="add that variant's overrides (see VARIANTS); "
                        "the default --out becomes accuracy-VARIANT.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. quant=u8s8_plain")
    args = parser.parse_args(argv)
    if args.variant:
        args.overrides = [*args.overrides, *VARIANTS[args.variant]]
        if args.out is None:
            args.out = Path("benchmarks/results") / args.model / f"accuracy-{args.variant}.json"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return measure_and_emit(lambda: run(args.model, args.root, args.overrides, args.folds, args.views, args.work_dir,
                                        args.threads, args.decompose, args.activation_bits),
                             args.out, as_table)


if __name__ == "__main__":
    sys.exit(main())
