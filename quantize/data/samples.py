"""ImageNet-style dataset listing, class-balanced selection and batched decoding."""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from quantize.core.artifacts import key_of
from quantize.core.digests import DigestStore
from quantize.core.errors import ConfigError, DataError, examples
from quantize.core.prefetch import prefetch
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize_batch

log = logging.getLogger(__name__)

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


class SampleList(list):
    """What ``list_samples`` returns: the samples, plus ``skipped``, every file under the root that is not one of
    them, as ``(path relative to the root, reason)`` pairs. Nothing is dropped without being counted here."""

    def __init__(self, samples=(), skipped: Sequence[tuple[str, str]] = ()):
        super().__init__(samples)
        self.skipped = list(skipped)

    def skipped_summary(self, limit: int = 100) -> dict:
        """For reports: how many files were skipped, how many for each reason, and the first ``limit`` of them."""
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"count": len(self.skipped), "reasons": reasons,
                "files": [f"{path} ({reason})" for path, reason in self.skipped[:limit]]}


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


def _synset_list(synsets: Sequence[str] | str | Path | None) -> list[str]:
    """A synset list given as ids, as the path of a synsets file, or None (the bundled list)."""
    if synsets is None or isinstance(synsets, (str, Path)):
        return load_synsets(synsets)
    return list(synsets)


def inside(path: str | Path, root_real: str) -> bool:
    """Whether ``path``, with every symlink resolved, is ``root_real`` (a resolved folder) or lies under it."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _outside_error(root: Path, leaving: list[str]) -> DataError:
    many = len(leaving) > 1
    return DataError(
        f"data root {root}: {len(leaving)} entr{'ies' if many else 'y'} lead{'' if many else 's'} outside it "
        f"({examples(leaving)}); nothing outside the given root is read: copy the images into it, or point the "
        "root at the folder that holds them")


def list_samples(
    root: str | Path, labels_file: str | Path | None = None, synsets: Sequence[str] | str | Path | None = None
) -> SampleList:
    """Every labelled image under ``root``, sorted by (label, file name), with every other file counted.

    Layout detection: an explicit ``labels_file`` means flat files; otherwise synset-named subfolders mean
    the folder layout, then a labels file found in root (``LABELS_FILE_NAMES``) means flat files.
    Labels always come from the synset list (class index = position in it), never from folder order.
    Nothing outside ``root`` is read: a symlink (or labels entry) leading out of it is a DataError. Files that
    are not samples (other formats, nested folders, dangling links, unlabelled images, ...) are returned in
    ``skipped`` and logged.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    synsets = _synset_list(synsets)
    class_of = {s: i for i, s in enumerate(synsets)}

    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if labels_file is None and not any(f in class_of for f in folders):
        labels_file = next((root / n for n in LABELS_FILE_NAMES if (root / n).is_file()), None)
        if labels_file is None and not folders:
            raise DataError(f"data root {root} has no dataset: {LAYOUTS_HELP}")
        if labels_file is not None and not inside(labels_file, os.path.realpath(root)):  # found, not given
            raise _outside_error(root, [f"{labels_file.name} -> {os.path.realpath(labels_file)}"])
    if labels_file is not None:
        samples, skipped = _list_flat(root, Path(labels_file), synsets, class_of)
    else:
        samples, skipped = _list_folders(root, folders, class_of)
    skipped = _without_other_names(samples, skipped, root)
    result = SampleList(sorted(samples, key=lambda s: (s.label, s.path.name, str(s.path))), sorted(skipped))
    if skipped:
        log.warning("data root %s: %s", root, describe_skipped(result.skipped))
    return result


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """``skipped 3 files (not a .jpeg/.jpg/.png file: a.webp, b.bmp; dangling link: c.JPEG)``."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    parts = "; ".join(f"{reason}: {examples(paths)}" for reason, paths in by_reason.items())
    return f"skipped {len(skipped)} file{'' if len(skipped) == 1 else 's'} ({parts})"


SKIP_FORMAT = f"not a {'/'.join(IMAGE_EXTENSIONS)} file"


def _classify(path: str, entry: os.DirEntry, root_real: str, leaving: list[str]) -> str | None:
    """None for an image to read; otherwise why it is skipped. Links leading out of the root go to ``leaving``."""
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not os.path.exists(target):
            return "dangling link"
        if not inside(target, root_real):
            leaving.append(f"{path} -> {target}")
            return "link leading outside the root"
    if entry.name.startswith("."):
        return "hidden file"
    if entry.is_dir():
        return "folder"
    if not entry.is_file():
        return "not a regular file"
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
        return SKIP_FORMAT
    return None


def _walk_files(folder: str, prefix: str) -> list[str]:
    """Every non-directory entry under ``folder`` (links not followed), as ``prefix/relative path``."""
    found = []
    for parent, dirs, files in os.walk(folder):
        relative = os.path.relpath(parent, folder)
        base = prefix if relative == "." else f"{prefix}/{relative}"
        found += [f"{base}/{name}" for name in sorted(files)]
        found += [f"{base}/{name}" for name in dirs if os.path.islink(os.path.join(parent, name))]
    return found


def _list_folders(root: Path, folders: list[str], class_of: dict[str, int]
                  ) -> tuple[list[Sample], list[tuple[str, str]]]:
    unknown = [f for f in folders if f not in class_of]
    if unknown:
        raise DataError(
            f"data root {root}: {len(unknown)} folders are not ImageNet synset ids ({examples(unknown)}); "
            + LAYOUTS_HELP
        )
    root_real = os.path.realpath(root)
    leaving = [f"{f} -> {os.path.realpath(root / f)}" for f in folders if not inside(root / f, root_real)]
    if leaving:
        raise _outside_error(root, leaving)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for folder in folders:
        for e in os.scandir(root / folder):
            name = f"{folder}/{e.name}"
            reason = _classify(name, e, root_real, leaving)
            if reason is None:
                samples.append(Sample(root / folder / e.name, class_of[folder]))
            elif reason == "folder":
                skipped += [(p, "in a nested folder") for p in _walk_files(e.path, name)]
            else:
                skipped.append((name, reason))
    for e in os.scandir(root):  # files beside the synset folders
        if e.name in LABELS_FILE_NAMES or e.name in folders:
            continue
        reason = _classify(e.name, e, root_real, [])  # not read, so only counted
        if reason == "folder":
            skipped += [(p, "in a folder that is not a synset id") for p in _walk_files(e.path, e.name)]
        else:
            skipped.append((e.name, reason or "not in a synset folder"))
    if leaving:
        raise _outside_error(root, leaving)
    if not samples:
        raise DataError(f"data root {root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in its synset folders")
    return samples, skipped


def _without_other_names(samples: list[Sample], skipped: list[tuple[str, str]], root: Path
                         ) -> list[tuple[str, str]]:
    """Skipped entries that are not another name (hard link) of a sample: after ``data_prep sort-val`` sorts a flat
    folder in place, its flat names are the same files as the sorted ones, and nothing is dropped."""
    if not skipped:
        return skipped
    def identity(path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)
    used = {identity(s.path) for s in samples}
    return [(path, reason) for path, reason in skipped
            if reason in ("dangling link",) or identity(root / path) not in used]


def read_labels_file(path: str | Path, synsets: Sequence[str] | str | Path | None = None,
                     what: str = "labels file") -> dict[str, int]:
    """``{image name: class index}`` from a labels file (``name class`` or ``name synset`` per line), validated.

    A class is a synset id of the list or a plain decimal number (ASCII digits only: not '+5', '5.0', '0x5',
    '1_0', '٥'); a name is a path relative to the data root that does not climb out of it ('..', absolute)."""
    synsets = _synset_list(synsets)
    return _parse_labels(Path(path), synsets, {s: i for i, s in enumerate(synsets)}, what)


_FIELD_SEPARATORS = re.compile(r"[ \t]+")
_DECIMAL = re.compile(r"-?[0-9]+")  # a minus sign only to say "outside 0-999" rather than "not a number"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def escapes_root(name: str) -> bool:
    """Whether a relative name from a labels file or list would leave the root it is read against."""
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts or name.startswith("~")


def _parse_labels(path: Path, synsets: Sequence[str], class_of: dict[str, int],
                  what: str = "labels file") -> dict[str, int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    n = len(synsets)
    labels: dict[str, int] = {}
    problems: dict[str, list[str]] = {}  # kind of problem -> offending lines, in file order
    for number, line in enumerate(lines, 1):
        stripped = line.strip(" \t\r\n\f\v")
        if not stripped:
            continue
        tokens = _FIELD_SEPARATORS.split(stripped)  # ASCII blanks only: a no-break space is not a separator
        where = f"line {number}: {stripped!r}"
        if len(tokens) != 2 or _CONTROL.search(stripped):
            problems.setdefault("malformed {lines}, expected '<image name> <class>'", []).append(where)
            continue
        name, cls = tokens
        if escapes_root(name):
            problems.setdefault("{lines} naming a path outside the data root (names are relative to it, "
                                "without '..')", []).append(where)
            continue
        if cls in class_of:
            label = class_of[cls]
        elif _DECIMAL.fullmatch(cls):
            label = int(cls)
            if cls.startswith("-") or not 0 <= label < n:
                problems.setdefault(f"{{lines}} with a class outside 0-{n - 1}", []).append(where)
                continue
        else:
            problems.setdefault(f"{{lines}} whose class is neither an index nor a known synset (an index is "
                                f"written in plain decimal digits, 0-{n - 1})", []).append(where)
            continue
        name = os.path.normpath(name)
        if name in labels:
            problems.setdefault("{lines} repeating an earlier image name", []).append(where)
            continue
        labels[name] = label
    if problems:
        parts = [
            f"{len(v)} {kind.format(lines='line' if len(v) == 1 else 'lines')} ({examples(v)})"
            for kind, v in problems.items()
        ]
        raise DataError(f"{what} {path}: " + "; ".join(parts))
    if not labels:
        raise DataError(f"{what} {path} has no entries")
    return labels


def _list_flat(root: Path, labels_file: Path, synsets: Sequence[str], class_of: dict[str, int]
               ) -> tuple[list[Sample], list[tuple[str, str]]]:
    labels = _parse_labels(labels_file, synsets, class_of)
    root_real = os.path.realpath(root)
    entries = {e.name: e for e in os.scandir(root)}
    missing, leaving = [], []
    for name in labels:
        entry = entries.get(name)
        if entry is not None and not entry.is_symlink():  # a plain file of the root: the common case, no syscall
            if not entry.is_file():
                missing.append(name)
            continue
        real = os.path.realpath(root / name)
        if not os.path.isfile(real):
            missing.append(name)
        elif not inside(real, root_real):
            leaving.append(f"{name} -> {real}")
    if leaving:
        raise _outside_error(root, leaving)
    if missing:
        raise DataError(
            f"labels file {labels_file}: {len(missing)} of {len(labels)} images are missing from {root} "
            f"({examples(missing)})"
        )
    skipped: list[tuple[str, str]] = []
    labels_real = os.path.realpath(labels_file)
    for name, e in sorted(entries.items()):
        if name in labels or name in LABELS_FILE_NAMES or os.path.realpath(e.path) == labels_real:
            continue
        reason = _classify(name, e, root_real, [])
        if reason == "folder":
            skipped += [(p, "not in the labels file") for p in _walk_files(e.path, name)
                        if os.path.normpath(p) not in labels]
        else:
            skipped.append((name, reason or "not in the labels file"))
    return [Sample(root / name, label) for name, label in labels.items()], skipped


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
    progress = tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=None) if desc else None
    decoded = prefetch(partial(_timed_decode, p=p), samples, workers, ahead=3 * batch_size, name="decode")
    try:
        for start in range(0, len(samples), batch_size):
            stop = min(start + batch_size, len(samples))
            done = list(itertools.islice(decoded, stop - start))
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
        decoded.close()
        if progress is not None:
            progress.close()


def samples_digest(samples: Sequence[Sample], root: Path, store: DigestStore | None = None) -> str:
    """A key for an image list: the root, each image's path relative to it, its label and the digest of its bytes
    (``store`` remembers digests between runs; without one every file is hashed). Other photos under the same
    names, in place or in another folder, give another key."""
    digests = (store or DigestStore()).digests([s.path for s in samples])
    if store is not None:
        store.save()
    return key_of({"root": str(root),
                   "images": [[str(s.path.relative_to(root)) if s.path.is_relative_to(root) else str(s.path),
                               s.label, digest] for s, digest in zip(samples, digests)]})
