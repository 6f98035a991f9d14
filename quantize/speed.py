"""How much faster the int8 model runs than the fp32 one: a small ONNX Runtime timing helper.

Models are timed in interleaved rounds (fp32, int8, fp32, int8, ...) on one fixed random batch. The speedup is the
ratio of the *fastest* run of each model: on a shared machine other jobs only ever add time, so the fastest of many
short runs is the closest to the model's own cost (on this 2-core box under load, the median ratio of structurally
identical int8 models spread from 1.3x to 2.0x while the ratio of minima stayed within a few percent). The median
ratio over rounds is kept beside it (``speedup_median``).
Sessions are created the way the evaluate stage creates them (all graph optimizations, so the int8 model's QDQ
pairs are fused into integer kernels).
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .runtime import input_name, make_session

log = logging.getLogger(__name__)


@dataclass
class Latency:
    batch_size: int
    threads: int
    runs: int
    ms: dict[str, float]         # median milliseconds per batch, per model
    ms_min: dict[str, float]     # fastest run per model
    speedup: dict[str, float]    # per model: fastest reference run / fastest model run (>1: faster)
    speedup_median: dict[str, float]  # per model: median over rounds of reference time / model time
    reference: str
    cpu: str

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(models: dict[str, Path], reference: str = "fp32", batch_size: int = 1, threads: int = 0,
            warmup: int = 5, runs: int = 100, seed: int = 0, image_size: int = 224) -> Latency:
    """Median latency of each model and its speedup over ``reference`` (a key of ``models``)."""
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    if runs < 1 or batch_size < 1:
        raise ValueError("runs and batch_size must be >= 1")
    sessions = {name: make_session(path, threads=threads) for name, path in models.items()}
    batch = np.random.default_rng(seed).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
    feeds = {name: {input_name(s): batch} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - started)
    ref = times[reference]
    result = Latency(
        batch_size=batch_size, threads=threads, runs=runs,
        ms={n: 1000 * statistics.median(t) for n, t in times.items()},
        ms_min={n: 1000 * min(t) for n, t in times.items()},
        speedup={n: min(ref) / min(t) for n, t in times.items()},
        speedup_median={n: statistics.median(r / m for r, m in zip(ref, t)) for n, t in times.items()},
        reference=reference, cpu=cpu_name())
    log.info("latency at batch %d: %s", batch_size,
             ", ".join(f"{n} {result.ms_min[n]:.2f} ms fastest, {result.ms[n]:.2f} ms median "
                       f"({result.speedup[n]:.2f}x {reference})" for n in models))
    return result
