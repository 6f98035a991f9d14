"""Evaluate stage: fp32 and int8 side by side on the same decoded batches."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .runtime import input_name, make_session

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    num_images: int
    top1: dict[str, float]            # percent, per model
    top5: dict[str, float]
    agreement_top1: float             # percent of images where every model predicts the same class
    seconds: float
    images_per_second: float
    correct: dict[str, int] = field(default_factory=dict)


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether the label is among the k highest scores. Softmax is monotonic, so logits rank the same."""
    top = np.argpartition(-logits, kth=min(k, logits.shape[1]) - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def evaluate(models: dict[str, Path], batches: Iterable[tuple[np.ndarray, np.ndarray]], threads: int = 0
             ) -> Evaluation:
    sessions = {name: make_session(path, threads=threads) for name, path in models.items()}
    hits1 = {name: 0 for name in models}
    hits5 = {name: 0 for name in models}
    agree = 0
    count = 0
    started = time.perf_counter()
    for images, labels in batches:
        predictions = []
        for name, session in sessions.items():
            logits = session.run(None, {input_name(session): images})[0]
            hits1[name] += int(topk_hits(logits, labels, 1).sum())
            hits5[name] += int(topk_hits(logits, labels, 5).sum())
            predictions.append(logits.argmax(axis=1))
        agree += int(np.all([p == predictions[0] for p in predictions], axis=0).sum())
        count += len(labels)
    seconds = time.perf_counter() - started
    if count == 0:
        raise ValueError("evaluation received no images")

    def percent(n: int) -> float:
        return 100.0 * n / count

    result = Evaluation(count, {n: percent(h) for n, h in hits1.items()}, {n: percent(h) for n, h in hits5.items()},
                        percent(agree), seconds, count / seconds if seconds else float("inf"), dict(hits1))
    log.info("evaluated %s on %d images in %.1f s (%.1f images/s): %s", ", ".join(models), count, seconds,
             result.images_per_second,
             "; ".join(f"{n} top-1 {result.top1[n]:.2f} top-5 {result.top5[n]:.2f}" for n in models))
    return result
