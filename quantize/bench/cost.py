"""What the default recipe costs against the plain one, through the real pipeline (``make bench-cost``).

    python -m quantize.bench.cost --model shufflenet_v2_x1_0 --root ../shared/data/imagenet/sample \
        [--images 1000] [--threads 1] [--out benchmarks/results/<model>/cost.json] [key=value ...]

The photos of ``--root`` are repeated (hard links, else copies, in their synset folders) until there are
``--images`` of them, so calibration reads that many. The model is exported once (not timed). Then each recipe runs
the pipeline in its own child process, ``stages=[calibrate,quantize,refine]`` (plus the stages the recipe's config
adds: balance, optimize), in a fresh work_dir sharing the cached export: wall seconds, CPU seconds of the child,
peak resident memory (read every 0.1 s from outside), and each stage's seconds from its log.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quantize.bench.latency import measure_and_emit
from quantize.core.errors import QuantizeError
from quantize.core.memory import watch_child

SCHEMA = "quantize-bench-cost/1"
RECIPES = {"plain": ["quant=u8s8_plain", "calib=percentile"], "default": []}
STAGE_DONE = re.compile(r"\] - (\w+): done in ([0-9.]+) s")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def repeated_folder(root: Path, images: int, out: Path) -> int:
    """``out`` filled with the photos of ``root`` (synset folders) repeated up to ``images`` files; the count."""
    photos = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise QuantizeError(f"--root {root} has no images in synset folders")
    for n in range(images):
        source = photos[n % len(photos)]
        target = out / source.parent.name / f"{source.stem}_copy{n // len(photos)}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return images


def pipeline(args: list[str], log: Path, rss_cap_gb: float, timeout: float) -> dict[str, Any]:
    """One pipeline run in a child process: wall and CPU seconds, peak RSS, stage seconds from its log."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "quantize", *args], stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        peak, killed = watch_child(process, rss_cap_gb, timeout)
        process.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text(errors="replace")
    if killed or process.returncode != 0:
        tail = killed or (text.strip().splitlines() or ["no output"])[-1]
        raise QuantizeError(f"pipeline {' '.join(args)} failed: {tail} (log {log})")
    return {"wall_seconds": wall,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mb": peak / 1024.0,
            "stages": {name: float(seconds) for name, seconds in STAGE_DONE.findall(text)}}


def run(model: str, root: Path, images: int, threads: int, overrides: list[str], rss_cap_gb: float = 12.0,
        timeout: float = 3600.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cost.") as scratch:
        scratch_dir = Path(scratch)
        data = scratch_dir / "images"
        repeated_folder(root, images, data)
        work = scratch_dir / "work"
        common = [f"+model={model}", f"data.root={data}", f"calib.num_images={images}", f"threads={threads}",
                  f"hydra.run.dir={scratch_dir / 'runs'}", *overrides]
        pipeline([*common, f"work_dir={work}", "stages=[export]"], scratch_dir / "export.log", rss_cap_gb, timeout)
        recipes = {}
        for name, recipe in RECIPES.items():
            own_work = scratch_dir / f"work-{name}"  # each recipe computes everything after the export itself
            shutil.copytree(work, own_work, symlinks=True)
            recipes[name] = {"overrides": recipe, **pipeline(
                [*common, *recipe, f"work_dir={own_work}", "stages=[calibrate,quantize,refine]"],
                scratch_dir / f"{name}.log", rss_cap_gb, timeout)}
    plain, default = recipes["plain"], recipes["default"]
    return {"schema": SCHEMA, "model": model, "root": str(root), "images": images, "threads": threads,
            "overrides": overrides, "recipes": recipes,
            "ratio": {"wall": default["wall_seconds"] / plain["wall_seconds"],
                      "cpu": default["cpu_seconds"] / plain["cpu_seconds"]},
            "load_average": list(os.getloadavg()), "cores": os.cpu_count()}


def as_table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}: {result['images']} calibration images, {result['threads']} thread(s), load "
             f"{result['load_average'][0]:.1f} on {result['cores']} cores", "",
             "| recipe | wall s | CPU s | peak RSS MiB | stages (s) |", "|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        lines.append(f"| {name} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {stages} |")
    lines.append(f"\ndefault / plain: {result['ratio']['wall']:.2f}x wall, {result['ratio']['cpu']:.2f}x CPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", type=Path, required=True, help="photos in synset folders, repeated to --images")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="config overrides for both recipes, e.g. model.checkpoint=...")
    args = parser.parse_args(argv)

    def measure() -> dict[str, Any]:
        if not args.root.is_dir():
            raise QuantizeError(f"--root {args.root} is not a folder")
        return run(args.model, args.root, args.images, args.threads, args.overrides)

    return measure_and_emit(measure, args.out, as_table)


if __name__ == "__main__":
    sys.exit(main())
