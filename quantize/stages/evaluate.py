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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from quantize.core.inference import DEFAULT, get_runtime

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


def evaluate(models: dict[str, Path], batches: Iterable[tuple[np.ndarray, np.ndarray]], threads: int = 0,
             workers: int | None = None, known: dict[str, np.ndarray] | None = None,
             runtime: str = DEFAULT) -> Evaluation:
    """Top-1/top-5 of each model and their top-1 agreement over ``batches`` of (float32 NCHW images, labels).

    ``threads`` is the core budget (0: every core). ``workers`` threads (default: one per core of the budget) each
    hold a one-thread session of every model and take (batch, model) tasks in turn, so the cores stay busy
    whichever model is slower; ``workers=1`` runs every model in one session with the whole budget.
    ``known`` maps more model names to their ``top_classes`` over exactly these images, in order (an earlier
    result's ``predictions``): they are scored and compared without being run. ``runtime`` names the inference
    runtime the models run in (``quantize.core.inference``)."""
    known = {name: np.asarray(top) for name, top in (known or {}).items()}
    if set(known) & set(models):
        raise ValueError(f"models {sorted(set(known) & set(models))} are both given and known")
    budget = threads or _cores()
    names = [*known, *models]
    workers = max(1, min(workers or budget, budget))
    per_session = max(1, budget // workers)
    engine = get_runtime(runtime)
    iterator = iter(batches)
    t0 = time.perf_counter()
    first = next(iterator, None)  # its size lets a runtime that compiles per shape (OpenVINO) do so before timing
    first_wait = time.perf_counter() - t0
    size = len(first[0]) if first is not None else None
    sessions = [{name: engine.load(path, threads=per_session, lean=True, batch=size) for name, path in models.items()}
                for _ in range(workers)]
    lock = threading.Lock()
    run_seconds = {name: 0.0 for name in models}
    hits1 = {name: 0 for name in names}
    hits5 = {name: 0 for name in names}
    predicted: dict[str, list[np.ndarray]] = {name: [] for name in names}
    agree = 0
    count = 0
    input_seconds = first_wait
    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def work(own: dict) -> None:
        while True:
            task = tasks.get()
            if task is None:
                return
            index, name, images = task
            try:
                if failure:
                    raise RuntimeError("stopped")
                t0 = time.perf_counter()
                logits = own[name].run(images)
                elapsed = time.perf_counter() - t0
                with lock:
                    run_seconds[name] += elapsed
                results.put((index, name, top_classes(logits)))
            except BaseException as exc:  # reported by the main thread
                if not failure:
                    failure.append(exc)
                results.put((index, name, None))

    threads_ = [threading.Thread(target=work, args=(own,), name=f"evaluate-{i}", daemon=True)
                for i, own in enumerate(sessions)]
    for thread in threads_:
        thread.start()
    pending: dict[int, dict[str, np.ndarray | None]] = {}
    batch_labels: dict[int, np.ndarray] = {}
    finished: dict[int, dict[str, np.ndarray]] = {}  # completed batches, scored in order
    sent = done = scored = 0
    seen = 0  # images sent so far: where the next batch starts in the known predictions

    def score(index: int, got: dict[str, np.ndarray]) -> None:
        nonlocal agree, count
        labels = batch_labels.pop(index)
        for name in names:
            hits1[name] += int(hits(got[name], labels, 1).sum())
            hits5[name] += int(hits(got[name], labels, 5).sum())
            predicted[name].append(got[name])
        first = got[names[0]][:, 0]
        agree += int(np.all([got[n][:, 0] == first for n in names], axis=0).sum())
        count += len(labels)

    def complete(index: int, got: dict[str, np.ndarray]) -> None:
        nonlocal done, scored
        done += 1
        if failure:
            return
        finished[index] = got
        while scored in finished:  # in order, so the predictions line up with the images
            score(scored, finished.pop(scored))
            scored += 1

    def collect(block: bool) -> None:
        while True:
            try:
                index, name, prediction = results.get(block=block)
            except queue.Empty:
                return
            block = False
            pending[index][name] = prediction
            if len(pending[index]) == len(names):
                complete(index, pending.pop(index))

    started = time.perf_counter() - first_wait
    try:
        while not failure:
            t0 = time.perf_counter()
            item, first = (first, None) if first is not None else (next(iterator, None), None)
            input_seconds += time.perf_counter() - t0
            if item is None:
                break
            images, labels = item
            images = np.ascontiguousarray(images, dtype=np.float32)
            batch_labels[sent] = np.asarray(labels)
            pending[sent] = {}
            for name, top in known.items():
                if len(top) < seen + len(images):
                    raise ValueError(f"the known predictions of {name} cover {len(top)} images; the batches have more")
                pending[sent][name] = top[seen:seen + len(images)]
            seen += len(images)
            for name in models:
                tasks.put((sent, name, images))
            sent += 1
            if not models:
                complete(sent - 1, pending.pop(sent - 1))
            collect(block=sent - done > workers + 1)  # a few batches in flight: memory stays flat
        while done < sent:
            collect(block=True)
    finally:
        for _ in threads_:
            tasks.put(None)
        for thread in threads_:
            thread.join()
    if failure:
        raise failure[0]
    seconds = time.perf_counter() - started
    if count == 0:
        raise ValueError("evaluation received no images")
    for name, top in known.items():
        if len(top) != count:
            raise ValueError(f"the known predictions of {name} cover {len(top)} images, the batches {count}")

    def percent(n: int) -> float:
        return 100.0 * n / count

    # A model's rate is per worker core: images / (its session time / workers). Decoding, when the batches say what
    # it cost (data.iter_batches does; a crop cache does not decode), is reported as a stage of its own.
    stage_seconds = {"input": input_seconds, **{n: run_seconds[n] / workers for n in models}}
    decode = getattr(batches, "stats", None)
    if decode is not None and getattr(decode, "images", 0):
        stage_seconds = {"decode": decode.images / decode.images_per_second * count / decode.images,
                         **stage_seconds}
    rates = {stage: count / s if s > 0 else float("inf") for stage, s in stage_seconds.items()}
    result = Evaluation(count, {n: percent(h) for n, h in hits1.items()}, {n: percent(h) for n, h in hits5.items()},
                        percent(agree), seconds, count / seconds if seconds else float("inf"), dict(hits1),
                        predictions={n: np.concatenate(p) for n, p in predicted.items()},
                        stage_seconds=stage_seconds, stage_images_per_second=rates,
                        threads={"workers": workers, "per_session": per_session},
                        runtime={"name": engine.name, "version": engine.version})
    log.info("evaluated %s in %s %s on %d images in %.1f s (%.1f images/s; alone: %s; %d workers x %d thread): %s",
             ", ".join(f"{n} (known)" if n in known else n for n in names), engine.name, engine.version, count, seconds,
             result.images_per_second, ", ".join(f"{stage} {rate:.0f} img/s" for stage, rate in rates.items()),
             workers, per_session,
             "; ".join(f"{n} top-1 {result.top1[n]:.2f} top-5 {result.top5[n]:.2f}" for n in names))
    log.info("at this rate %d images would take %.1f min", FULL_VAL, FULL_VAL / result.images_per_second / 60)
    return result
