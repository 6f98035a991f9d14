"""How much faster the int8 model runs than the fp32 one: a small timing helper (ONNX Runtime, or any runtime of
``quantize.core.inference``).

Each model is timed in blocks of runs on one fixed random batch, one session alive at a time, and the blocks
alternate (fp32, int8, fp32, int8, ...) so a change of machine load during the measurement hits both. Only one
session exists at a time because ONNX Runtime's intra-op threads spin after a run: with two sessions alive, the
threads of the one that just ran steal the cores from the other (measured here: fp32 Lite0 took 12 ms per run
interleaved with an int8 session, 5.2 ms alone). The speedup is the ratio of the median runs, which repeated
measurements reproduce within a few percent; the ratio of the fastest runs is kept beside it (``speedup_fastest``)
but is not steady here: this VM sometimes runs a whole block 35% faster (fp32 Lite0 5.1 instead of 7.9 ms), and
one such block decides a minimum. Sessions are created the way the evaluate stage creates
them (all graph optimizations, so the int8 model's QDQ pairs are fused into integer kernels).

Every block starts with at least ``MIN_WARMUP`` untimed runs: a fresh ONNX Runtime session plans its memory on the
first run and allocates that plan, page by page, on the second, so at batch 32 its first two runs take up to twice
as long as the later ones (ShuffleNetV2 x0.25 fp32: 70, 63, then 32 ms), and more so for the model with more memory.
Timing the second run measured page faults, not kernels, and flattered int8.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantize.core.inference import DEFAULT, get_runtime
from quantize.core.runtime import cpu_name

log = logging.getLogger(__name__)

MIN_WARMUP = 2


@dataclass
class Latency:
    batch_size: int
    threads: int
    runs: int
    ms: dict[str, float]         # median milliseconds per batch, per model
    ms_min: dict[str, float]     # fastest run per model
    speedup: dict[str, float]    # per model: median reference time / median model time (>1: faster)
    speedup_fastest: dict[str, float]  # per model: fastest reference run / fastest model run
    reference: str
    cpu: str

    def as_dict(self) -> dict:
        return asdict(self)


def time_blocks(models: dict[str, Path], batch: np.ndarray, runs: int, threads: int = 0, warmup: int = 5,
                blocks: int = 4, runtimes: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` runs of every model on ``batch``: ``blocks`` alternating blocks, each with a
    freshly loaded model (warmed up by ``warmup`` runs, at least ``MIN_WARMUP``) that is the only one alive while it
    is timed. ``runtimes`` maps a model's name to the runtime it runs in (default: ONNX Runtime), so one call
    alternates runtimes too."""
    if runs < 1 or blocks < 1:
        raise ValueError("runs and blocks must be >= 1")
    engines = {name: get_runtime((runtimes or {}).get(name, DEFAULT)) for name in models}
    blocks, warmup = min(blocks, runs), max(warmup, MIN_WARMUP)
    times: dict[str, list[float]] = {name: [] for name in models}
    for count in [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]:
        for name, path in models.items():
            model = engines[name].load(path, threads=threads, batch=len(batch))  # OpenVINO compiles for it here
            for _ in range(warmup):
                model.run(batch)
            for _ in range(count):
                started = time.perf_counter()
                model.run(batch)
                times[name].append(time.perf_counter() - started)
            del model
    return times


def measure(models: dict[str, Path], reference: str = "fp32", batch_size: int = 1, threads: int = 0,
            warmup: int = 5, runs: int = 100, seed: int = 0, image_size: int = 224, blocks: int = 4) -> Latency:
    """Latency of each model and its speedup over ``reference`` (a key of ``models``); ``runs`` timed runs per
    model, in ``blocks`` alternating blocks."""
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    if runs < 1 or batch_size < 1 or blocks < 1:
        raise ValueError("runs, blocks and batch_size must be >= 1")
    batch = np.random.default_rng(seed).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
    times = time_blocks(models, batch, runs, threads=threads, warmup=warmup, blocks=blocks)
    ref = times[reference]
    result = Latency(
        batch_size=batch_size, threads=threads, runs=runs,
        ms={n: 1000 * statistics.median(t) for n, t in times.items()},
        ms_min={n: 1000 * min(t) for n, t in times.items()},
        speedup={n: statistics.median(ref) / statistics.median(t) for n, t in times.items()},
        speedup_fastest={n: min(ref) / min(t) for n, t in times.items()},
        reference=reference, cpu=cpu_name())
    log.info("latency at batch %d: %s", batch_size,
             ", ".join(f"{n} {result.ms[n]:.2f} ms median, {result.ms_min[n]:.2f} ms fastest "
                       f"({result.speedup[n]:.2f}x {reference})" for n in models))
    return result
