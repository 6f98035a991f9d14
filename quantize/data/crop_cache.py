"""Preprocessed uint8 crops on disk, so calibration and evaluation skip JPEG decoding and resizing.

A cache lives in ``<cache_dir>/<key>/``: ``crops.npy`` (uint8, N x 3 x crop x crop, one memory-mapped array),
``labels.npy`` (int64, N) and ``manifest.json``, written last. The key hashes everything the uint8 crops depend on
(``Preprocess.crop_key``: resize size and rounding, interpolation, backend, crop size and offset rounding) and the
ordered (image path relative to the dataset root, label) pairs, so a cache built for other preprocessing is never
served; the manifest also records a digest of the image files' bytes (``quantize.core.digests``), so a cache of
other photos under the same names (another copy of the dataset, files replaced in place, even at the same size and
mtime) is found stale. Color order, scale and mean/std are applied when batches are read, so models that only
differ in those share a cache. The cache's files must be regular files inside its directory: a symlink leading
elsewhere is refused.

Crops are written and read through short-lived memory-mapped windows of a few dozen images, never a mapping of
the whole file: touched pages of a mapping count in the process's resident memory until it is unmapped, and
50,000 crops are 7.5 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from quantize.core.artifacts import file_sha256, key_of, read_json
from quantize.core.digests import DigestStore, combined
from quantize.data.samples import Sample, inside
from quantize.core.errors import ConfigError, DataError
from quantize.core.prefetch import prefetch
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize_batch

FORMAT = "crop-cache/4"  # 2: a digest of the image files' sizes; 3: per-model resize settings; 4: a digest of their bytes
CROPS, LABELS, MANIFEST = "crops.npy", "labels.npy", "manifest.json"
CHUNK = 64  # images per memory-mapped window while building (reading uses one window per batch)


class StaleCacheError(DataError):
    """A cache directory exists under the expected key but does not hold what the key promises."""

    def __init__(self, path: Path, reason: str, rebuild_hint: str):
        self.path, self.reason = path, reason
        super().__init__(f"crop cache at {path} is stale or corrupt ({reason}); {rebuild_hint}")


class _Problem(Exception):
    """Internal: why a cache directory failed validation."""


# --- identity ---------------------------------------------------------------------------------------------------

def crop_key(p: Preprocess) -> dict[str, Any]:
    """The part of the preprocessing the uint8 crops depend on."""
    return p.crop_key()


def cache_flags(p: Preprocess) -> str:
    """The ``data_prep cache`` options that build crops for ``p`` (those that differ from their defaults)."""
    default = Preprocess().crop_key()
    return "".join(f" --{name.replace('_', '-')} {value}" for name, value in p.crop_key().items()
                   if value != default[name])


def _relative(path: Path, root: Path) -> str:
    path, root = Path(path), Path(root)
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    path, root = path.resolve(), root.resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{path} is outside the dataset root {root}; a cache holds images of its root only")
    return path.relative_to(root).as_posix()


def _pairs(samples: Sequence[Sample], root: str | Path) -> list[list[Any]]:
    return [[_relative(s.path, Path(root)), int(s.label)] for s in samples]


def _list_sha256(pairs: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def _images_sha256(samples: Sequence[Sample], digests: DigestStore | None) -> str:
    """A digest of the image files' bytes, in sample order: other photos under the same names change it, so the
    cache is found stale instead of serving the old crops. ``digests`` remembers file digests between runs (by
    path, size, mtime, ctime and inode); without one every file is read."""
    return combined((digests or DigestStore()).digests([s.path for s in samples]))


def _cache_dir(cache_dir: str | Path) -> Path:
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"crop cache folder {cache_dir} is a file; give a folder to hold caches (it is created "
                        "when missing)")
    return cache_dir


def _key(pairs: list[list[Any]], p: Preprocess) -> str:
    return key_of({"preprocess": crop_key(p), "images": pairs})


def cache_key(samples: Sequence[Sample], root: str | Path, p: Preprocess) -> str:
    return _key(_pairs(samples, root), p)


# --- building ---------------------------------------------------------------------------------------------------

def _crop(sample: Sample, p: Preprocess) -> np.ndarray:
    return crop_uint8(load_rgb(sample.path), p)


def _decoded(samples: Sequence[Sample], p: Preprocess, workers: int) -> Iterator[np.ndarray]:
    """uint8 HWC crops in sample order, decoded by ``workers`` threads with a bounded number in flight."""
    return prefetch(partial(_crop, p=p), samples, workers, ahead=max(8, 4 * workers), name="cache-decode")


def _window(path: Path, offset: int, start: int, count: int, crop: int, mode: str) -> np.memmap:
    """A memory map of crops [start, start + count) of a crops.npy whose data begins at ``offset``."""
    item = 3 * crop * crop
    return np.memmap(path, dtype=np.uint8, mode=mode, offset=offset + start * item, shape=(count, 3, crop, crop))


def _write_crops(path: Path, samples: Sequence[Sample], p: Preprocess, workers: int, desc: str | None) -> str:
    """Fill ``path`` with the samples' CHW crops; returns the file's sha256, hashed as it is written."""
    header = open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(samples), 3, p.crop, p.crop))
    offset = header.offset
    del header  # only its header and size were needed; never touch pages of a whole-file mapping
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(offset))
    chunk = np.empty((min(CHUNK, len(samples)), 3, p.crop, p.crop), dtype=np.uint8)
    crops = _decoded(samples, p, workers)
    progress = tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=None) if desc else None
    try:
        for start in range(0, len(samples), len(chunk)):
            count = min(len(chunk), len(samples) - start)
            for i in range(count):
                chunk[i] = next(crops).transpose(2, 0, 1)
            _window(path, offset, start, count, p.crop, "r+")[:] = chunk[:count]
            digest.update(chunk[:count])
            if progress is not None:
                progress.update(count)
    finally:
        crops.close()
        if progress is not None:
            progress.close()
    return digest.hexdigest()


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory to its final name, replacing a stale one there."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
    os.replace(final, old)  # onto an empty directory: allowed by rename(2)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build_cache(
    samples: Sequence[Sample], root: str | Path, p: Preprocess, cache_dir: str | Path, workers: int = 2,
    desc: str | None = "cache", digests: DigestStore | None = None,
) -> Path:
    """Decode ``samples`` into a new cache and return its directory (replacing any cache under the same key).

    Built in a temporary sibling directory renamed into place at the end: an error or Ctrl-C leaves nothing
    under the final name. A DataError from any image propagates.
    """
    if not samples:
        raise DataError("no images to cache")
    pairs = _pairs(samples, root)
    key = _key(pairs, p)
    cache_dir = _cache_dir(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = cache_dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would make the cache private to one user
    try:
        crops_sha = _write_crops(tmp / CROPS, samples, p, workers, desc)
        np.save(tmp / LABELS, np.array([s.label for s in samples], dtype=np.int64))
        manifest = {
            "format": FORMAT, "key": key, "preprocess": crop_key(p), "count": len(samples),
            "shape": [len(samples), 3, p.crop, p.crop], "dtype": "uint8", "list_sha256": _list_sha256(pairs),
            "images_sha256": _images_sha256(samples, digests),
            "files": {CROPS: _file_entry(tmp / CROPS, crops_sha), LABELS: _file_entry(tmp / LABELS)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "root": str(Path(root).resolve()), "build_seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last
        _move_into_place(tmp, cache_dir / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir / key


def _file_entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256 or file_sha256(path)}


# --- opening ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropCache:
    path: Path
    p: Preprocess
    manifest: dict[str, Any]
    labels: np.ndarray
    offset: int  # where the crop bytes start in crops.npy

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return sum(entry["bytes"] for entry in self.manifest["files"].values())

    def crops(self, start: int, stop: int) -> np.ndarray:
        """uint8 NCHW crops [start, stop), copied out of a memory-mapped window."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return np.empty((0, 3, self.p.crop, self.p.crop), dtype=np.uint8)
        return np.array(_window(self.path / CROPS, self.offset, start, stop - start, self.p.crop, "r"))

    def iter_batches(self, batch_size: int, desc: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 NCHW normalized images, int64 labels) batches in sample order, like ``data.iter_batches``."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        progress = tqdm(total=len(self), desc=desc, unit="img", file=sys.stderr, disable=None) if desc else None
        try:
            for start in range(0, len(self), batch_size):
                stop = min(start + batch_size, len(self))
                crops = self.crops(start, stop)
                if progress is not None:
                    progress.update(stop - start)
                yield normalize_batch(crops.transpose(0, 2, 3, 1), self.p), self.labels[start:stop].copy()
        finally:
            if progress is not None:
                progress.close()


def open_cache(
    samples: Sequence[Sample], root: str | Path, p: Preprocess, cache_dir: str | Path, verify: bool = True,
    digests: DigestStore | None = None,
) -> CropCache | None:
    """The cache of these samples, or None if there is none; StaleCacheError if it exists but does not match.

    The image files' bytes must be the ones the cache was built from (their digests come from ``digests`` when
    given, else every image is read). ``verify`` also compares the cache files' sha256 with the manifest (reads
    the whole cache once).
    """
    pairs = _pairs(samples, root)
    cache_dir = _cache_dir(cache_dir)
    path = cache_dir / _key(pairs, p)
    if not path.exists() and not path.is_symlink():
        return None
    expected = {
        "format": FORMAT, "key": path.name, "preprocess": crop_key(p), "count": len(samples),
        "shape": [len(samples), 3, p.crop, p.crop], "dtype": "uint8", "list_sha256": _list_sha256(pairs),
        "images_sha256": _images_sha256(samples, digests),
    }
    try:
        _check_inside(path, cache_dir)
        manifest = _read_manifest(path, expected)
        offset = _check_crops(path, tuple(expected["shape"]))
        labels = _check_labels(path, [s.label for s in samples])
        if verify:
            _check_hashes(path, manifest)
    except _Problem as problem:
        hint = f"rebuild it with `python -m data_prep cache --root {root} --out {cache_dir}{cache_flags(p)}` " \
               "(and the same image selection) or delete it"
        raise StaleCacheError(path, str(problem), hint) from None
    return CropCache(path=path, p=p, manifest=manifest, labels=labels, offset=offset)


def _check_inside(path: Path, cache_dir: Path) -> None:
    """The cache directory and its files are what they claim: nothing in it leads outside it."""
    if not inside(path, os.path.realpath(cache_dir)):
        raise _Problem(f"{path.name} leads outside {cache_dir} (to {os.path.realpath(path)})")
    real = os.path.realpath(path)
    for name in (MANIFEST, CROPS, LABELS):
        if (path / name).is_symlink() and not inside(path / name, real):
            raise _Problem(f"{name} is a link leading outside the cache (to {os.path.realpath(path / name)}); "
                           "a cache's files must be inside it")


def _read_manifest(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    if not (path / MANIFEST).is_file():
        raise _Problem(f"no {MANIFEST}, so it is incomplete")
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Problem(f"{MANIFEST} is unreadable: {' '.join(str(exc).split())}") from None
    if not isinstance(manifest, dict):
        raise _Problem(f"{MANIFEST} is not a JSON object")
    for field, want in expected.items():
        if field == "images_sha256" and manifest.get("format") == FORMAT and manifest.get(field) != want:
            raise _Problem("the image files are not the ones it was built from (their contents differ)")
        if manifest.get(field) != want:
            raise _Problem(f"manifest {field} is {_short(manifest.get(field))}, expected {_short(want)}")
    files = manifest.get("files")
    for name in (CROPS, LABELS):
        entry = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and "sha256" in entry):
            raise _Problem(f"{MANIFEST} lacks the size and sha256 of {name}")
        if not (path / name).is_file():
            raise _Problem(f"{name} is missing")
        size, want = (path / name).stat().st_size, entry["bytes"]
        if size != want:
            raise _Problem(f"{name} has {size} bytes, the manifest says {want}")
    return manifest


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_crops(path: Path, shape: tuple[int, ...]) -> int:
    try:
        crops = np.load(path / CROPS, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise _Problem(f"{CROPS} is not a readable .npy: {' '.join(str(exc).split())}") from None
    if crops.dtype != np.uint8 or crops.shape != shape or not crops.flags.c_contiguous:
        raise _Problem(f"{CROPS} holds {crops.dtype} {crops.shape}, expected uint8 {shape}")
    return crops.offset


def _check_labels(path: Path, labels: list[int]) -> np.ndarray:
    try:
        stored = np.load(path / LABELS)
    except (OSError, ValueError) as exc:
        raise _Problem(f"{LABELS} is not a readable .npy: {' '.join(str(exc).split())}") from None
    if stored.dtype != np.int64 or stored.shape != (len(labels),) or not np.array_equal(stored, labels):
        raise _Problem(f"{LABELS} does not hold the labels of the listed images")
    return stored


def _check_hashes(path: Path, manifest: dict[str, Any]) -> None:
    for name in (CROPS, LABELS):
        if file_sha256(path / name) != manifest["files"][name]["sha256"]:
            raise _Problem(f"{name} content differs from its sha256 in the manifest")
