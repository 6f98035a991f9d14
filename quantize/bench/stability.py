"""How far the fp32 model's own top-1 moves under input changes nobody would see: the floor that int8 agreement with
fp32 is read against.

    python -m quantize.bench.stability --model shufflenet_v2_x1_0 --root ../shared/data/imagenet/sample \
        [--views 12] [--out benchmarks/results/shufflenet_v2_x1_0/stability.json] [key=value ...]

On the views ``make bench-accuracy`` measures agreement on (every photo of the folder, ``accuracy.views_of``), each
view's 8-bit crop (after the model's resize and crop, before its normalization) is changed without changing how it
looks, and the fp32 model's top-1 on the changed crop is compared with its top-1 on the crop itself:

- pixel noise: Gaussian noise of ``sigma`` pixel levels added to every value, rounded back to 8 bits (at 0.5 about a
  third of the values move by one level, almost none by two); one seeded generator per level, so reruns agree;
- a one-pixel shift: the crop's content moved one pixel to the right, its first column repeated.

Agreement is averaged per photo with its standard error over photos, like bench-accuracy's, so the two read side by
side: an int8 model that agrees with fp32 less often than fp32 agrees with itself under half a pixel level of noise
moves the decisions more than that noise does. Nothing is calibrated or quantized here; only the fp32 export is run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from quantize.bench.accuracy import agreement_of, view_crops
from quantize.bench.latency import measure_and_emit
from quantize.core.errors import QuantizeError
from quantize.core.runtime import input_name, make_session
from quantize.data.preprocess import normalize_batch
from quantize.data.samples import list_samples

SCHEMA = 1
NOISE_LEVELS = (0.25, 0.5, 1.0)  # pixel levels (standard deviation)
SEED = 0


def with_pixel_noise(crops: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = crops.astype(np.float32) + rng.normal(0.0, sigma, crops.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def shifted_right(crops: np.ndarray) -> np.ndarray:
    """NHWC crops with their content one pixel to the right (the first column repeated)."""
    moved = np.empty_like(crops)
    moved[:, :, 1:] = crops[:, :, :-1]
    moved[:, :, :1] = crops[:, :, :1]
    return moved


def perturbations(seed: int = SEED) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    changes: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for k, sigma in enumerate(NOISE_LEVELS):
        rng = np.random.default_rng([seed, k])
        changes[f"pixel noise {sigma:g}"] = lambda crops, sigma=sigma, rng=rng: with_pixel_noise(crops, sigma, rng)
    changes["shift 1 pixel"] = shifted_right
    return changes


def run(model: str, root: Path, overrides: list[str], views: int = 12, work_dir: Path | None = None,
        threads: int = 0, photos_per_batch: int = 4) -> dict[str, Any]:
    from quantize.jobs.release import compose_model
    from quantize.pipeline.runner import Pipeline

    root = root.expanduser().resolve()
    samples = list_samples(root)
    work_dir = (work_dir or Path("artifacts")).resolve()
    started = time.perf_counter()
    changes = perturbations()
    reference: list[np.ndarray] = []
    changed: dict[str, list[np.ndarray]] = {name: [] for name in changes}
    with tempfile.TemporaryDirectory(prefix="bench-stability.") as scratch:
        cfg = compose_model(model, [f"data.root={root}", f"work_dir={work_dir}", f"threads={threads}",
                                    "analysis.speed=false", *overrides])
        pipeline = Pipeline(cfg, Path(scratch))
        fp32 = Path(pipeline.get("export").path)
        p = pipeline.preprocess
        session = make_session(fp32, threads=threads)
        name = input_name(session)

        def top1(crops: np.ndarray) -> np.ndarray:
            return session.run(None, {name: normalize_batch(crops, p)})[0].argmax(axis=1).reshape(-1, views)

        for start in tqdm(range(0, len(samples), photos_per_batch), desc="stability", unit="batch"):
            crops = np.stack([crop for s in samples[start:start + photos_per_batch] for crop in view_crops(s, p, views)])
            reference.append(top1(crops))
            for change_name, change in changes.items():
                changed[change_name].append(top1(change(crops)))
    fp32_top1 = np.concatenate(reference)
    measured = {change_name: agreement_of(np.concatenate(preds), fp32_top1) for change_name, preds in changed.items()}
    return {"schema": SCHEMA, "model": model, "root": str(root), "overrides": overrides, "photos": len(samples),
            "views_per_photo": views, "seed": SEED, "perturbations": measured,
            "seconds": time.perf_counter() - started, "load_average": list(os.getloadavg()), "cores": os.cpu_count()}


def as_table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}: fp32 top-1 on changed crops against fp32 top-1 on the crops, {result['photos']} "
             f"photos x {result['views_per_photo']} views (load {result['load_average'][0]:.1f} on "
             f"{result['cores']} cores)", "", "| change | agreement with unchanged (views) |", "|---|---|"]
    for change_name, m in result["perturbations"].items():
        se = "" if m["agreement_se"] is None else f" ± {m['agreement_se']:.2f}"
        lines.append(f"| {change_name} | {m['agreement']:.2f}{se} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.stability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="zoo entry (conf/model/)")
    parser.add_argument("--root", type=Path, required=True, help="image folder (synset folders or flat + labels)")
    parser.add_argument("--views", type=int, default=12, help="views per photo (1-12), as bench-accuracy's")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON result (a .md table is written beside it)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.checkpoint=PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def measure() -> dict[str, Any]:
        if not args.root.is_dir():
            raise QuantizeError(f"--root {args.root} is not a folder")
        return run(args.model, args.root, args.overrides, args.views, args.work_dir, args.threads)

    return measure_and_emit(measure, args.out, as_table)


if __name__ == "__main__":
    sys.exit(main())
