"""Accuracy budget: keep the nodes that hurt int8 most in fp32 until the top-1 drop fits ``quant.max_drop``.

Candidates come ranked from the sensitivity analysis (the SQNR each node itself takes away, ``added_db``). The
search then spends at most ``max_trials`` quantize + evaluate trials on a tuning subset that the final evaluation
does not see:

- trial 0 is the int8 model as configured; when its drop already fits, nothing changes;
- each further trial adds the next candidate to ``nodes_to_exclude``. A candidate stays in the list only when it
  helped: the logits got closer to fp32 (SQNR up by ``min_gain_db``) or the drop went down. Top-1 on a small
  tuning set moves in whole images, so the smooth SQNR decides what to keep and the drop decides when to stop;
  a node that does not help is not kept in fp32 (it would only cost speed);
- the search stops at the first trial within budget, or when the trials or candidates run out; then the best
  trial found (lowest drop, then highest SQNR, then fewest fp32 nodes) is the result, with ``met`` false.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from quantize.core.runtime import input_name, make_session
from quantize.accuracy.sensitivity import Sensitivity

log = logging.getLogger(__name__)

# Ops worth running in fp32 (they compute); data movement around them is not where precision goes.
EXCLUDABLE = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class Score:
    top1: float          # int8 top-1 on the tuning subset, percent
    drop: float          # fp32 top-1 minus int8 top-1, points
    agreement: float     # percent of images where int8 and fp32 predict the same class
    sqnr_db: float       # logits SQNR against fp32


@dataclass
class Trial:
    number: int
    excluded: list[str]
    candidate: str | None
    score: Score
    kept: bool
    seconds: float = 0.0


@dataclass
class BudgetResult:
    max_drop: float
    max_trials: int
    met: bool
    excluded: list[str]                  # nodes the final model keeps in fp32 (beyond quant.nodes_to_exclude)
    baseline: Trial
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    ranking: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        for trial in [data["baseline"], data["best"], *data["trials"]]:
            if not math.isfinite(trial["score"]["sqnr_db"]):
                trial["score"]["sqnr_db"] = None
        return data


def rank_candidates(sensitivity: Sensitivity, fp32: onnx.ModelProto, int8_nodes: Iterable[str],
                    already: Iterable[str] = ()) -> list[str]:
    """Nodes to try in fp32, most damaging first: the node producing each quantized tensor, ordered by the SQNR it
    adds; a fused activation (Relu/Clip, gone from the int8 graph) stands for the Conv/Gemm before it."""
    producers = {out: node for node in fp32.graph.node for out in node.output}
    present, already = set(int8_nodes), set(already)
    ranked: list[str] = []
    for t in sensitivity.by_added():
        if t.added_db <= 0 or t.producer is None:
            continue
        node = next((n for n in fp32.graph.node if n.name == t.producer), None)
        if node is not None and node.op_type in FUSED_ACTIVATIONS and node.input[0] in producers:
            node = producers[node.input[0]]
        if node is None or node.op_type not in EXCLUDABLE or node.name not in present:
            continue
        if node.name not in ranked and node.name not in already:
            ranked.append(node.name)
    return ranked


def _better(a: Score, b: Score) -> bool:
    """Whether ``a`` is a better result than ``b`` (lower drop, then closer logits)."""
    return (a.drop, -a.sqnr_db) < (b.drop, -b.sqnr_db)


def search(candidates: Sequence[str], trial: Callable[[list[str]], Score], max_drop: float, max_trials: int,
           base_excluded: Sequence[str] = (), min_gain_db: float = 0.05) -> BudgetResult:
    """Greedy search over ``candidates`` (most damaging first); ``trial(excluded)`` quantizes with those nodes in
    fp32 and scores the model on the tuning subset."""
    if max_trials < 0:
        raise ValueError("max_trials must be >= 0")
    started = time.perf_counter()
    current = list(base_excluded)
    base = Trial(0, list(current), None, trial(list(current)), kept=True, seconds=time.perf_counter() - started)
    log.info("budget: trial 0 (as configured): drop %.2f, agreement %.1f%%, logits SQNR %.1f dB", base.score.drop,
             base.score.agreement, base.score.sqnr_db)
    result = BudgetResult(max_drop, max_trials, base.score.drop <= max_drop, [], base, base, [base],
                          list(candidates))
    if result.met:
        return result
    best_kept = base  # the last accepted state
    best = base
    for number, candidate in enumerate(candidates[:max_trials], 1):
        started = time.perf_counter()
        proposal = current + [candidate]
        score = trial(proposal)
        helped = score.sqnr_db > best_kept.score.sqnr_db + min_gain_db or score.drop < best_kept.score.drop
        t = Trial(number, proposal, candidate, score, kept=helped, seconds=time.perf_counter() - started)
        result.trials.append(t)
        log.info("budget: trial %d, +%s in fp32: drop %.2f, agreement %.1f%%, logits SQNR %.1f dB (%s)", number,
                 candidate, score.drop, score.agreement, score.sqnr_db, "kept" if helped else "reverted")
        if helped:
            current, best_kept = proposal, t
        if _better(score, best.score) or (score.drop == best.score.drop and score.sqnr_db == best.score.sqnr_db
                                          and len(proposal) < len(best.excluded)):
            best = t
        if score.drop <= max_drop:
            result.met, best = True, t
            break
    result.best = best
    result.excluded = [n for n in best.excluded if n not in set(base_excluded)]
    log.info("budget: %s after %d trials; %d nodes kept in fp32: %s", "met" if result.met else "NOT met",
             len(result.trials) - 1, len(result.excluded), ", ".join(result.excluded) or "none")
    return result


class TuneSet:
    """Decoded tuning images and the fp32 logits on them, kept in memory so each trial runs only the int8 model."""

    def __init__(self, fp32_path: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], threads: int = 0):
        self.threads = threads
        self.batches = [(np.ascontiguousarray(images), labels) for images, labels in batches]
        if not self.batches:
            raise ValueError("the tuning subset is empty")
        self.labels = np.concatenate([labels for _, labels in self.batches])
        self.fp32_logits = self._logits(fp32_path)
        self.fp32_top1 = 100.0 * float(np.mean(self.fp32_logits.argmax(1) == self.labels))

    def _logits(self, path: Path | bytes) -> np.ndarray:
        session = make_session(path, threads=self.threads)
        name = input_name(session)
        return np.concatenate([session.run(None, {name: images})[0] for images, _ in self.batches])

    def score(self, int8_path: Path | bytes) -> Score:
        logits = self._logits(int8_path)
        top1 = 100.0 * float(np.mean(logits.argmax(1) == self.labels))
        agreement = 100.0 * float(np.mean(logits.argmax(1) == self.fp32_logits.argmax(1)))
        noise = float(np.sum((logits.astype(np.float64) - self.fp32_logits) ** 2))
        signal = float(np.sum(self.fp32_logits.astype(np.float64) ** 2))
        sqnr = math.inf if noise == 0 else 10.0 * math.log10(signal / noise)
        return Score(top1, self.fp32_top1 - top1, agreement, sqnr)

    @property
    def num_images(self) -> int:
        return len(self.labels)
