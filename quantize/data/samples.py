"""ImageNet-style dataset listing, class-balanced selection and batched decoding."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantize.core.artifacts import key_of
from quantize.core.errors import ConfigError, DataError, examples
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize_batch

SYNSETS_FILE = Path(__file__).resolve().parents[1] / "resources" / "imagenet_synsets.txt"
NUM_CLASSES = 1000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
LABELS_FILE_NAMES = ("val_label.txt", "val.txt", "labels.txt")

LAYOUTS_HELP = (
    "expected either synset folders (root/n01440764/*.JPEG) or images directly in root plus a labels file "
    f"({', '.join(LABELS_FILE_NAMES)}) with lines like 'ILSVRC2012_val_00000001.JPEG 65' "
    "(class index) or 'ILSVRC2012_val_00000001.JPEG n01751748' (synset id)"
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def load_synsets(path: str | Path | None = None, expected: int = NUM_CLASSES) -> list[str]:
    """Synset ids in class-index order (line k = class k; the first token of each non-blank line)."""
    path = Path(path) if path is not None else SYNSETS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read synsets file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    synsets = [line.split()[0] for line in lines if line.strip()]
    unique = len(set(synsets))
    if len(synsets) != expected or unique != expected:
        raise DataError(
            f"synsets file {path}: expected {expected} unique synset ids, found {len(synsets)} ids ({unique} unique)"
        )
    return synsets


def list_samples(
    root: str | Path, labels_file: str | Path | None = None, synsets: Sequence[str] | None = None
) -> list[Sample]:
    """Every labelled image under ``root``, sorted by (label, file name).

    Layout detection: an explicit ``labels_file`` means flat files; otherwise synset-named subfolders mean
    the folder layout, then a labels file found in root (``LABELS_FILE_NAMES``) means flat files.
    Labels always come from the synset list (class index = position in it), never from folder order.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    synsets = list(synsets) if synsets is not None else load_synsets()
    class_of = {s: i for i, s in enumerate(synsets)}

    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if labels_file is None and not any(f in class_of for f in folders):
        labels_file = next((root / n for n in LABELS_FILE_NAMES if (root / n).is_file()), None)
        if labels_file is None and not folders:
            raise DataError(f"data root {root} has no dataset: {LAYOUTS_HELP}")
    if labels_file is not None:
        samples = _list_flat(root, Path(labels_file), synsets, class_of)
    else:
        samples = _list_folders(root, folders, class_of)
    return sorted(samples, key=lambda s: (s.label, s.path.name, str(s.path)))


def _is_image(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith(".") and entry.is_file()


def _list_folders(root: Path, folders: list[str], class_of: dict[str, int]) -> list[Sample]:
    unknown = [f for f in folders if f not in class_of]
    if unknown:
        raise DataError(
            f"data root {root}: {len(unknown)} folders are not ImageNet synset ids ({examples(unknown)}); "
            + LAYOUTS_HELP
        )
    samples = [
        Sample(root / folder / e.name, class_of[folder])
        for folder in folders
        for e in os.scandir(root / folder)
        if _is_image(e)
    ]
    if not samples:
        raise DataError(f"data root {root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in its synset folders")
    return samples


def read_labels_file(path: str | Path, synsets: Sequence[str] | None = None) -> dict[str, int]:
    """``{image name: class index}`` from a labels file (``name class`` or ``name synset`` per line), validated."""
    synsets = list(synsets) if synsets is not None else load_synsets()
    return _parse_labels(Path(path), synsets, {s: i for i, s in enumerate(synsets)})


def _parse_labels(path: Path, synsets: Sequence[str], class_of: dict[str, int]) -> dict[str, int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    n = len(synsets)
    labels: dict[str, int] = {}
    problems: dict[str, list[str]] = {}  # kind of problem -> offending lines, in file order
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"line {number}: {line.strip()!r}"
        if len(tokens) != 2:
            problems.setdefault("malformed {lines}, expected '<image name> <class>'", []).append(where)
            continue
        name, cls = tokens
        if cls in class_of:
            label = class_of[cls]
        else:
            try:
                label = int(cls)
            except ValueError:
                problems.setdefault("{lines} whose class is neither an index nor a known synset", []).append(where)
                continue
            if not 0 <= label < n:
                problems.setdefault(f"{{lines}} with a class outside 0-{n - 1}", []).append(where)
                continue
        if name in labels:
            problems.setdefault("{lines} repeating an earlier image name", []).append(where)
            continue
        labels[name] = label
    if problems:
        parts = [
            f"{len(v)} {kind.format(lines='line' if len(v) == 1 else 'lines')} ({examples(v)})"
            for kind, v in problems.items()
        ]
        raise DataError(f"labels file {path}: " + "; ".join(parts))
    if not labels:
        raise DataError(f"labels file {path} has no entries")
    return labels


def _list_flat(root: Path, labels_file: Path, synsets: Sequence[str], class_of: dict[str, int]) -> list[Sample]:
    labels = _parse_labels(labels_file, synsets, class_of)
    present = {e.name for e in os.scandir(root) if e.is_file()}
    missing = [name for name in labels if name not in present and not (root / name).is_file()]
    if missing:
        raise DataError(
            f"labels file {labels_file}: {len(missing)} of {len(labels)} images are missing from {root} "
            f"({examples(missing)})"
        )
    return [Sample(root / name, label) for name, label in labels.items()]


def balanced_subset(samples: Sequence[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """A deterministic, class-balanced subset of ``n`` samples, returned in input order.

    Rule: within each class, images are sorted by file name then shuffled with
    ``numpy.random.default_rng([seed, label])``. The subset is filled in rounds: round ``r`` takes the
    ``r``-th image of every class that still has one, visiting classes in the order of a seeded permutation
    (``default_rng([seed, 1_000_003, r])``), until ``n`` are taken. So every class is covered before any
    repeats, class counts differ by at most one (unless a class runs out), a last partial round is spread over
    classes at random rather than given to the lowest class indices, and the result depends only on the set
    of samples and the seed, never on filesystem order. ``n=None`` or ``n >= len(samples)`` returns all.
    """
    if n is None or n >= len(samples):
        return list(samples)
    if n < 0:
        raise ConfigError(f"subset size must be >= 0, got {n}")
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    queues = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: (samples[i].path.name, str(samples[i].path)))
        order = np.random.default_rng([seed, label]).permutation(len(members))
        queues.append([members[k] for k in order])
    chosen: list[int] = []
    rank = 0
    while len(chosen) < n:
        visit = np.random.default_rng([seed, 1_000_003, rank]).permutation(len(queues))
        chosen.extend(queues[q][rank] for q in visit if rank < len(queues[q]))
        rank += 1
    return [samples[i] for i in sorted(chosen[:n])]


def _decode(sample: Sample, p: Preprocess) -> np.ndarray:
    return crop_uint8(load_rgb(sample.path), p)


def _timed_decode(sample: Sample, p: Preprocess) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    crop = _decode(sample, p)
    return crop, time.perf_counter() - started


@dataclass
class DecodeStats:
    """What decoding cost: ``decode_seconds`` adds up every image's decode in the worker threads; ``images`` counts
    them; ``workers`` ran in parallel, so ``images / (decode_seconds / workers)`` is the decoding rate alone."""
    workers: int
    images: int = 0
    decode_seconds: float = 0.0
    normalize_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        busy = self.decode_seconds / max(1, self.workers) + self.normalize_seconds
        return self.images / busy if busy > 0 else float("inf")


class _Batches:
    """The iterator ``iter_batches`` returns: batches, plus ``stats`` (a DecodeStats) about producing them."""

    def __init__(self, generator, stats: DecodeStats):
        self._generator, self.stats = generator, stats

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._generator)

    def close(self) -> None:
        self._generator.close()


def iter_batches(
    samples: Sequence[Sample], batch_size: int, p: Preprocess, workers: int = 2, desc: str | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float32 NCHW images, int64 labels) batches in sample order; the last batch may be smaller.

    Images are decoded by ``workers`` threads (PIL releases the GIL while decoding and resizing; measured on the
    2-core machine, a pool of processes decoded no faster and would copy every crop between processes), with at
    most a few batches in flight so memory stays flat. A DataError from any image propagates. The returned
    iterator's ``stats`` tells the time spent decoding.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    stats = DecodeStats(workers=max(1, workers))
    return _Batches(_generate(samples, batch_size, p, workers, desc, stats), stats)


def _generate(samples, batch_size, p, workers, desc, stats):
    in_flight_limit = 3 * batch_size
    progress = tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=None) if desc else None
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    try:
        pending: deque = deque()
        next_index = 0
        for start in range(0, len(samples), batch_size):
            stop = min(start + batch_size, len(samples))
            while next_index < len(samples) and next_index < start + in_flight_limit:
                pending.append(pool.submit(_timed_decode, samples[next_index], p))
                next_index += 1
            done = [pending.popleft().result() for _ in range(stop - start)]
            stats.decode_seconds += sum(seconds for _, seconds in done)
            stats.images += len(done)
            started = time.perf_counter()
            crops = np.stack([crop for crop, _ in done])
            labels = np.array([s.label for s in samples[start:stop]], dtype=np.int64)
            batch = normalize_batch(crops, p)
            stats.normalize_seconds += time.perf_counter() - started
            if progress is not None:
                progress.update(stop - start)
            yield batch, labels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress.close()


def samples_digest(samples: list[Sample], root: Path) -> str:
    """A key for an image list: paths relative to ``root`` (so a moved dataset keeps its key) and labels."""
    return key_of([[str(s.path.relative_to(root)) if s.path.is_relative_to(root) else str(s.path), s.label]
                   for s in samples])
