"""Does the int8 model's accuracy hold in each runtime? fp32 and int8 in every runtime, on the same images.

    python -m quantize.bench.runtimes --model efficientnet_lite0 --root ../shared/data/imagenet/sample \
        [--runtimes onnxruntime,openvino] [--threads 2] [--out benchmarks/results/efficientnet_lite0/runtimes.json]

Per runtime, on the standard crop of every labelled image: fp32 and int8 top-1/top-5 and their top-1 agreement,
as the evaluate stage computes them. Then what a difference between runtimes is made of:

- ``views``: top-1 agreement needs no labels, so it is also measured on the 12 views of each image that
  ``make bench-accuracy`` uses (the photo, its mirror, corner and centre crops of both: ``bench.accuracy.views_of``),
  each preprocessed like the photo: twelve times the inputs, all natural photographs;
- ``paired``: against the first runtime, how many inputs agree with fp32 in only one of the two runtimes; the
  difference of agreement is (only first - only other) / inputs, and its standard error treats the 12 views of an
  image as one cluster (they are not independent);
- ``int8_runtimes_agree``: how often the two runtimes' int8 top-1 are the same class;
- ``qdq_reference``: the int8 file computed literally, every QuantizeLinear/DequantizeLinear in float (ONNX
  Runtime with graph optimizations off): how often each runtime's fused integer kernels give its top-1.

The result is written as JSON and printed as a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from quantize.bench.accuracy import views_of
from quantize.bench.latency import add_model_arguments, chosen_models, chosen_preprocess, emit, package_version
from quantize.core.errors import QuantizeError
from quantize.core.inference import RUNTIMES, get_runtime
from quantize.core.runtime import cpu_name, make_session
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize_batch
from quantize.data.samples import list_samples
from quantize.stages.evaluate import hits, top_classes

SCHEMA = "quantize-bench-runtimes/1"
VIEWS = 12  # view 0 is the photo itself: its standard crop is what the evaluate stage sees


def views(path: Path, p: Preprocess = Preprocess()) -> np.ndarray:
    """(VIEWS, 3, crop, crop) float32: every view of the image, preprocessed like the image."""
    return normalize_batch(np.stack([crop_uint8(v.convert("RGB"), p) for v in views_of(load_rgb(path), VIEWS)]), p)


def run(models: dict[str, Path], root: Path, runtimes: list[str], threads: int = 0, chunk: int = 4,
        limit: int | None = None, preprocess: Preprocess = Preprocess()) -> dict[str, Any]:
    """Both models in every runtime on every view of the images under ``root``, fed through ``preprocess`` (the
    model's own), as a JSON-able dict."""
    samples = list_samples(root)[:limit]
    if not samples:
        raise QuantizeError(f"no images under {root}")
    engines = {name: get_runtime(name) for name in runtimes}
    loaded = {(rt, m): engines[rt].load(path, threads=threads, lean=True, batch=chunk * VIEWS)
              for rt in runtimes for m, path in models.items()}
    # the int8 file computed as written (every Q/DQ in float); no memory pattern: five models are alive at once
    reference = make_session(models["int8"], threads=threads, level="disable", memory_pattern=False)
    feed = reference.get_inputs()[0].name
    top: dict[Any, list[np.ndarray]] = {key: [] for key in [*loaded, "qdq"]}
    labels = np.array([s.label for s in samples])
    for start in range(0, len(samples), chunk):
        batch = np.concatenate([views(s.path, preprocess) for s in samples[start:start + chunk]])
        for key, model in loaded.items():
            top[key].append(top_classes(model.run(batch)))
        top["qdq"].append(top_classes(reference.run(None, {feed: batch})[0]))
    per_view = {key: np.concatenate(parts) for key, parts in top.items()}  # (images * VIEWS, 5)
    views_per_image = VIEWS
    standard = {key: t[::views_per_image] for key, t in per_view.items()}  # view 0 of each image

    def pct(mask: np.ndarray) -> float:
        return 100.0 * float(np.mean(mask))

    result: dict[str, Any] = {
        "schema": SCHEMA, "root": str(root), "images": len(samples), "views_per_image": views_per_image,
        "machine": {"cpu": cpu_name(), "onnxruntime": package_version("onnxruntime")},
        "runtimes": {rt: engines[rt].version for rt in runtimes},
        "models": {name: str(path) for name, path in models.items()}, "threads": threads, "per_runtime": {},
    }
    agrees = {rt: per_view[(rt, "fp32")][:, 0] == per_view[(rt, "int8")][:, 0] for rt in runtimes}
    for rt in runtimes:
        s = {m: standard[(rt, m)] for m in models}
        result["per_runtime"][rt] = {
            "fp32": {"top1": pct(hits(s["fp32"], labels, 1)), "top5": pct(hits(s["fp32"], labels, 5))},
            "int8": {"top1": pct(hits(s["int8"], labels, 1)), "top5": pct(hits(s["int8"], labels, 5))},
            "agreement_top1": pct(s["fp32"][:, 0] == s["int8"][:, 0]),
            "views_agreement_top1": pct(agrees[rt]),
            "qdq_reference_agreement_top1": {"images": pct(s["int8"][:, 0] == standard["qdq"][:, 0]),
                                             "views": pct(per_view[(rt, "int8")][:, 0] == per_view["qdq"][:, 0])},
        }
    first = runtimes[0]
    result["qdq_reference"] = {
        "int8_top1": pct(hits(standard["qdq"], labels, 1)),
        "agreement_top1": {"images": pct(standard["qdq"][:, 0] == standard[(first, "fp32")][:, 0]),
                           "views": pct(per_view["qdq"][:, 0] == per_view[(first, "fp32")][:, 0])}}
    result["paired"] = {}
    for rt in runtimes[1:]:
        only_first, only_other = agrees[first] & ~agrees[rt], ~agrees[first] & agrees[rt]
        per_image = (agrees[first].astype(float) - agrees[rt].astype(float)).reshape(-1, views_per_image).mean(1)
        n_img = len(per_image)
        standard_first, standard_rt = agrees[first][::views_per_image], agrees[rt][::views_per_image]
        discordant = int((standard_first != standard_rt).sum())
        result["paired"][rt] = {
            "against": first,
            "images": {"only_" + first: int((standard_first & ~standard_rt).sum()),
                       "only_" + rt: int((~standard_first & standard_rt).sum()),
                       "difference": pct(standard_first) - pct(standard_rt),
                       "standard_error": 100.0 * math.sqrt(discordant) / n_img},
            "views": {"only_" + first: int(only_first.sum()), "only_" + rt: int(only_other.sum()),
                      "difference": pct(agrees[first]) - pct(agrees[rt]),
                      "standard_error": 100.0 * float(per_image.std(ddof=1)) / math.sqrt(n_img) if n_img > 1
                      else float("nan")},
            "int8_runtimes_agree": {"images": pct(standard[(first, "int8")][:, 0] == standard[(rt, "int8")][:, 0]),
                                    "views": pct(per_view[(first, "int8")][:, 0] == per_view[(rt, "int8")][:, 0])},
            "fp32_runtimes_agree": {"views": pct(per_view[(first, "fp32")][:, 0] == per_view[(rt, "fp32")][:, 0])},
        }
    return result


def table(result: dict[str, Any]) -> str:
    n, v = result["images"], result["images"] * result["views_per_image"]
    lines = [f"{result.get('model', '')}: {n} images ({v} views), "
             + ", ".join(f"{k} {ver}" for k, ver in result["runtimes"].items()),
             "",
             "| runtime | fp32 top-1 | fp32 top-5 | int8 top-1 | int8 top-5 | agreement | agreement, views | "
             "int8 = QDQ reference, views |",
             "|---|---|---|---|---|---|---|---|"]
    for rt, r in result["per_runtime"].items():
        lines.append(f"| {rt} | {r['fp32']['top1']:.2f} | {r['fp32']['top5']:.2f} | {r['int8']['top1']:.2f} | "
                     f"{r['int8']['top5']:.2f} | {r['agreement_top1']:.2f} | {r['views_agreement_top1']:.2f} | "
                     f"{r['qdq_reference_agreement_top1']['views']:.2f} |")
    q = result["qdq_reference"]
    lines += ["", f"QDQ reference (float Q/DQ): int8 top-1 {q['int8_top1']:.2f}, agreement "
              f"{q['agreement_top1']['images']:.2f} (views {q['agreement_top1']['views']:.2f})"]
    for rt, p in result["paired"].items():
        first = p["against"]
        for unit in ("images", "views"):
            d = p[unit]
            lines.append(f"{first} - {rt} agreement, {unit}: {d['difference']:+.2f} points "
                         f"(SE {d['standard_error']:.2f}; agree with fp32 only in {first}: {d['only_' + first]}, "
                         f"only in {rt}: {d['only_' + rt]})")
        lines.append(f"int8 top-1 identical in {first} and {rt}: {p['int8_runtimes_agree']['images']:.2f}% of images, "
                     f"{p['int8_runtimes_agree']['views']:.2f}% of views")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.runtimes", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--root", type=Path, required=True, help="labelled images (synset folders or flat + labels)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated; the first is compared "
                                                                        "with each other one")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        models = chosen_models(args, parser)
        runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
        if not runtimes or any(r not in RUNTIMES for r in runtimes):
            raise QuantizeError(f"--runtimes {args.runtimes}: choose from {', '.join(RUNTIMES)}")
        result = run(models, args.root, runtimes, threads=args.threads, limit=args.limit,
                     preprocess=chosen_preprocess(args))
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return emit(result, args.model, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
