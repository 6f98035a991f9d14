"""Evaluate stage: fp32 and int8 side by side on the same decoded batches.

One worker thread per core holds a one-thread session of each model and takes (batch, model) tasks in turn, while
decoding threads prepare the next batches. That beats running each model on every core in turn: small convolutions
parallelize poorly, one slow thread of a two-thread operator (another job on a shared machine) stalls the whole
operator, and whichever model is slower, no core waits for the other. Every stage is timed, so the report can say
where the time goes and what a full 50,000-image run would take.

Each model's per-image top-5 comes back with the result, and a model whose top-5 over the same images is already
known (``known=``) is scored from it instead of being run: the pipeline keeps the fp32 model's predictions, so every
later int8 variant of that model is evaluated at int8 speed alone.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from quantize.core.inference import DEFAULT, get_runtime
from quantize.core.prefetch import thread_pool

log = logging.getLogger(__name__)

FULL_VAL = 50_000  # ImageNet val: what the estimate in the log is for


@dataclass
class Evaluation:
    num_images: int
    top1: dict[str, float]            # percent, per model
    top5: dict[str, float]
    agreement_top1: float             # percent of images where every model predicts the same class
    seconds: float
    images_per_second: float
    correct: dict[str, int] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # per model: (images, 5) class ids, best first
    # Per stage: seconds spent and images per second of that stage alone ("input" = waiting for decoded batches;
    # a model's time is inside session.run, on its own share of the cores).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_images_per_second: dict[str, float] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)  # name and version of the runtime the models ran in


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether the label is among the k highest scores. Softmax is monotonic, so logits rank the same."""
    return hits(top_classes(logits, k), labels, k)


def top_classes(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """(images, k) class ids by falling score, ties broken by the lower id, so column 0 is ``logits.argmax(1)``."""
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(logits, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int32)


def hits(top: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether the label is among the first k of its ``top_classes``."""
    return (top[:, :k] == np.asarray(labels)[:, None]).any(axis=1)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Tally:
    """Top-1/top-5 hits of each model and their top-1 agreement, batch by batch in image order."""

    def __init__(self, names: list[str]):
        self.names = names
        self.hits1 = {name: 0 for name in names}
        self.hits5 = {name: 0 for name in names}
        self.predicted: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self.agree = 0
        self.count = 0

    def add(self, labels: np.ndarray, got: dict[str, np.ndarray]) -> None:
        for name in self.names:
            self.hits1[name] += int(hits(got[name], labels, 1).sum())
            self.hits5[name] += int(hits(got[name], labels, 5).sum())
            self.predicted[name].append(got[name])
        first = got[self.names[0]][:, 0]
        self.agree += int(np.all([got[n][:, 0] == first for n in self.names], axis=0).sum())
        self.count += len(labels)

    def percent(self, n: int) -> float:
        return 100.0 * n / self.count


class _Sessions:
    """One loaded copy of every model per worker thread, lent to whichever thread runs a task."""

    def __init__(self, loaded: list[dict], names: list[str]):
        self.free: queue.Queue = queue.Queue()
        for own in loaded:
            self.free.put(own)
        self.seconds = {name: 0.0 for name in names}
        self.lock = threading.Lock()

    def top5(self, name: str, images: np.ndarray) -> np.ndarray:
        own = self.free.get()
        try:
            started = time.perf_counter()
            logits = own[name].run(images)
            elapsed = time.perf_counter() - started
            with self.lock:
                self.seconds[name] += elapsed
        finally:
            self.free.put(own)
        return top_classes(logits)


def _known_slices(known: dict[str, np.ndarray], start: int, size: int) -> dict[str, np.ndarray]:
    for name, top in known.items():
        if len(top) < start + size:
            raise ValueError(f"the known predictions of {name} cover {len(top)} images; the batches have more")
    return {name: top[start:start + size] for name, top in known.items()}


def evaluate(models: dict[str, Path], batches: Iterable[tuple[np.ndarray, np.ndarray]], threads: int = 0,
             workers: int | None = None, known: dict[str, np.ndarray] | None = None,
             runtime: str = DEFAULT) -> Evaluation:
    """Top-1/top-5 of each model and their top-1 agreement over ``batches`` of (float32 NCHW images, labels).

    ``threads`` is the core budget (0: every core). ``workers`` threads (default: one per core of the budget) each
    run a one-thread copy of a model on a batch at a time, taking (batch, model) tasks in turn, so the cores stay
    busy whichever model is slower; ``workers=1`` runs every model in one session with the whole budget.
    ``known`` maps more model names to their ``top_classes`` over exactly these images, in order (an earlier
    result's ``predictions``): they are scored and compared without being run. ``runtime`` names the inference
    runtime the models run in (``quantize.core.inference``)."""
    known = {name: np.asarray(top) for name, top in (known or {}).items()}
    if set(known) & set(models):
        raise ValueError(f"models {sorted(set(known) & set(models))} are both given and known")
    budget = threads or _cores()
    tally = _Tally([*known, *models])
    workers = max(1, min(workers or budget, budget))
    per_session = max(1, budget // workers)
    engine = get_runtime(runtime)
    iterator = iter(batches)
    started = time.perf_counter()
    first = next(iterator, None)  # its size lets a runtime that compiles per shape (OpenVINO) do so before timing
    input_seconds = time.perf_counter() - started
    size = len(first[0]) if first is not None else None
    sessions = _Sessions([{name: engine.load(path, threads=per_session, lean=True, batch=size)
                           for name, path in models.items()} for _ in range(workers)], list(models))
    in_flight: deque[tuple[np.ndarray, dict[str, np.ndarray | Future]]] = deque()

    def score_oldest() -> None:
        labels, got = in_flight.popleft()
        tally.add(labels, {name: top.result() if isinstance(top, Future) else top for name, top in got.items()})

    with thread_pool(workers, "evaluate") as pool:
        item, seen = first, 0
        while item is not None:
            images = np.ascontiguousarray(item[0], dtype=np.float32)
            got: dict[str, np.ndarray | Future] = _known_slices(known, seen, len(images))
            got.update({name: pool.submit(sessions.top5, name, images) for name in models})
            in_flight.append((np.asarray(item[1]), got))
            seen += len(images)
            while len(in_flight) > workers + 1:  # a few batches in flight: memory stays flat
                score_oldest()
            t0 = time.perf_counter()
            item = next(iterator, None)
            input_seconds += time.perf_counter() - t0
        while in_flight:
            score_oldest()
    seconds = time.perf_counter() - started
    count = tally.count
    if count == 0:
        raise ValueError("evaluation received no images")
    for name, top in known.items():
        if len(top) != count:
            raise ValueError(f"the known predictions of {name} cover {len(top)} images, the batches {count}")
    stage_seconds = _stage_seconds(batches, input_seconds, sessions.seconds, workers, count)
    rates = {stage: count / s if s > 0 else float("inf") for stage, s in stage_seconds.items()}
    result = Evaluation(count, {n: tally.percent(h) for n, h in tally.hits1.items()},
                        {n: tally.percent(h) for n, h in tally.hits5.items()}, tally.percent(tally.agree), seconds,
                        count / seconds if seconds else float("inf"), dict(tally.hits1),
                        predictions={n: np.concatenate(p) for n, p in tally.predicted.items()},
                        stage_seconds=stage_seconds, stage_images_per_second=rates,
                        threads={"workers": workers, "per_session": per_session},
                        runtime={"name": engine.name, "version": engine.version})
    log.info("evaluated %s in %s %s on %d images in %.1f s (%.1f images/s; alone: %s; %d workers x %d thread): %s",
             ", ".join(f"{n} (known)" if n in known else n for n in tally.names), engine.name, engine.version, count,
             seconds, result.images_per_second, ", ".join(f"{stage} {rate:.0f} img/s" for stage, rate in rates.items()),
             workers, per_session,
             "; ".join(f"{n} top-1 {result.top1[n]:.2f} top-5 {result.top5[n]:.2f}" for n in tally.names))
    log.info("at this rate %d images would take %.1f min", FULL_VAL, FULL_VAL / result.images_per_second / 60)
    return result


def _stage_seconds(batches, input_seconds: float, run_seconds: dict[str, float], workers: int,
                   count: int) -> dict[str, float]:
    """Seconds per stage. A model's time is per worker core (its session time / workers). Decoding, when the batches
    say what it cost (data.iter_batches does; a crop cache does not decode), is a stage of its own."""
    stage_seconds = {"input": input_seconds, **{n: s / workers for n, s in run_seconds.items()}}
    decode = getattr(batches, "stats", None)
    if decode is not None and getattr(decode, "images", 0):
        stage_seconds = {"decode": decode.images / decode.images_per_second * count / decode.images,
                         **stage_seconds}
    return stage_seconds
