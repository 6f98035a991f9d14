"""Evaluation benchmark: how long a 50,000-image fp32 + int8 evaluation takes, from JPEG and from the crop cache.

    python -m quantize.bench.evaluation --model shufflenet_v2_x1_0 --root /data/val [--repeat 5] [--out bench_eval.json]
    python -m quantize.bench.evaluation --fp32 A.onnx --int8 B.onnx --root /data/val

Four runs of ``quantize.stages.evaluate.evaluate`` over the images of ``--root`` (each image ``--repeat`` times, so that a
small folder still gives a steady rate): fp32 and int8 decoded from JPEG, int8 alone with the fp32 predictions of
that run given (what every later int8 variant of the same model costs in the pipeline), and both again read from
a crop cache built first in ``--cache-dir``. Each run reports images/s overall and per stage and the minutes
50,000 images would take at that rate. Results: JSON and a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from quantize.bench.latency import package_version, add_model_arguments, chosen_models, chosen_preprocess, emit
from quantize.data.crop_cache import build_cache, open_cache
from quantize.data.samples import iter_batches, list_samples
from quantize.core.errors import QuantizeError
from quantize.stages.evaluate import FULL_VAL, evaluate
from quantize.data.preprocess import Preprocess
from quantize.core.runtime import cpu_name

SCHEMA = "quantize-bench-eval/1"


class _Repeated:
    """The batches of ``make()`` ``repeat`` times over, keeping the decode statistics of the JPEG path."""

    def __init__(self, make, repeat: int):
        self.make, self.repeat, self.stats = make, repeat, None

    def __iter__(self):
        for _ in range(self.repeat):
            batches = self.make()
            yield from batches
            stats = getattr(batches, "stats", None)
            if stats is not None:
                if self.stats is None:
                    self.stats = stats
                else:
                    self.stats.images += stats.images
                    self.stats.decode_seconds += stats.decode_seconds
                    self.stats.normalize_seconds += stats.normalize_seconds


def _row(name: str, result) -> dict[str, Any]:
    return {"run": name, "images": result.num_images, "seconds": result.seconds,
            "images_per_second": result.images_per_second,
            "minutes_for_50000": FULL_VAL / result.images_per_second / 60,
            "stage_images_per_second": result.stage_images_per_second, "threads": result.threads,
            "top1": result.top1, "agreement_top1": result.agreement_top1}


def run(models: dict[str, Path], root: Path, cache_dir: Path, repeat: int = 5, batch: int = 32, threads: int = 0,
        workers: int = 2, p: Preprocess = Preprocess()) -> dict[str, Any]:
    if repeat < 1 or batch < 1:
        raise QuantizeError("--repeat and --batch must be at least 1")
    samples = list_samples(root)
    rows = []
    jpeg = evaluate(models, _Repeated(lambda: iter_batches(samples, batch, p, workers=workers), repeat), threads)
    rows.append(_row("jpeg fp32+int8", jpeg))
    known = {"fp32": jpeg.predictions["fp32"]}
    int8 = {"int8": models["int8"]}
    rows.append(_row("jpeg int8, fp32 reused", evaluate(
        int8, _Repeated(lambda: iter_batches(samples, batch, p, workers=workers), repeat), threads, known=known)))
    cache = open_cache(samples, root, p, cache_dir, verify=False)
    if cache is None:
        build_cache(samples, root, p, cache_dir, workers=workers, desc="cache")
        cache = open_cache(samples, root, p, cache_dir, verify=False)
    rows.append(_row("cache fp32+int8", evaluate(models, _Repeated(lambda: cache.iter_batches(batch), repeat),
                                                 threads)))
    rows.append(_row("cache int8, fp32 reused", evaluate(int8, _Repeated(lambda: cache.iter_batches(batch), repeat),
                                                         threads, known=known)))
    return {"schema": SCHEMA, "machine": {"cpu": cpu_name(), "onnxruntime": package_version("onnxruntime")},
            "root": str(root), "distinct_images": len(samples), "repeat": repeat, "batch": batch, "threads": threads,
            "preprocess": p.key(),
            "models": {name: str(path) for name, path in models.items()}, "runs": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['machine']['cpu']}, onnxruntime {result['machine']['onnxruntime']}, "
             f"{result['distinct_images']} images x {result['repeat']}, batch {result['batch']}", "",
             "| run | images/s | 50,000 images | each stage alone, images/s |", "|---|---|---|---|"]
    for row in result["runs"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in row["stage_images_per_second"].items())
        lines.append(f"| {row['run']} | {row['images_per_second']:.0f} | {row['minutes_for_50000']:.1f} min | "
                     f"{stages} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.evaluation", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--root", type=Path, required=True, help="an image folder (synset folders or flat + labels)")
    parser.add_argument("--cache-dir", type=Path, help="where the crop cache is built (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="core budget (0: every core)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        models = chosen_models(args, parser)
        with tempfile.TemporaryDirectory(prefix="bench-eval.") as scratch:
            result = run(models, args.root, args.cache_dir or Path(scratch), repeat=args.repeat, batch=args.batch,
                         threads=args.threads, p=chosen_preprocess(args))
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return emit(result, args.model, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
