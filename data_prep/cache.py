"""``cache``: decode, resize and center-crop images once into a crop cache (the vendor flow's ``image2npz``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from data_prep.arguments import positive_int, seed
from quantize.core.digests import DigestStore
from quantize.data.crop_cache import CropCache, StaleCacheError, build_cache, cache_key, open_cache
from quantize.data.samples import Sample, balanced_subset, list_samples
from quantize.core.errors import DataError
from quantize.data.image_list import samples_from_list
from quantize.data.preprocess import Preprocess

_MIB = 1 << 20


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="preprocess images once into a uint8 crop cache read by calibration and evaluation",
        description="Decode, resize and center-crop the images of an ImageNet-style folder once into "
        "CACHE_DIR/<key>/ (crops.npy, labels.npy, manifest.json), the way a model's preprocessing does it "
        "(--model ENTRY, or the standard ImageNet transform; each setting can be overridden). The key covers "
        "every resize/crop setting and the exact image list, so a cache is only ever used for the images and "
        "the preprocessing it was built for.",
    )
    p.add_argument("--root", type=Path, required=True, metavar="VAL_DIR",
                   help="dataset: synset folders, or flat images plus a labels file")
    p.add_argument("--labels", type=Path, metavar="FILE", help="labels file of a flat dataset (default: found in root)")
    p.add_argument("--list", dest="image_list", type=Path, metavar="LIST_FILE",
                   help="cache only these images ('<image name> <class>' per line), in this order")
    p.add_argument("--limit", type=positive_int, metavar="N", help="a class-balanced subset of N images")
    p.add_argument("--seed", type=seed, default=0, metavar="S", help="seed of the --limit subset (default 0)")
    p.add_argument("--out", type=Path, required=True, metavar="CACHE_DIR", help="directory holding caches")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 2), metavar="N",
                   help="decoding threads (default: CPU count, at most 8)")
    p.add_argument("--model", metavar="ENTRY",
                   help="crop as zoo entry ENTRY is fed (conf/model/ENTRY.yaml's model.preprocess); default: the "
                   "standard ImageNet transform (Pillow bilinear, shorter side 256, center 224)")
    p.add_argument("--resize", type=positive_int, help="shorter side after resizing")
    p.add_argument("--crop", type=positive_int, help="center crop size")
    p.add_argument("--interpolation", help="nearest, bilinear, bicubic, lanczos, box/hamming (pillow), area (opencv)")
    p.add_argument("--backend", help="pillow or opencv")
    p.add_argument("--resize-rounding", help="rounding of the longer side: floor, round or half_up")
    p.add_argument("--crop-rounding", help="rounding of the crop offset: round, floor or half_up")
    p.add_argument("--verify", action="store_true", help="only check the existing cache and report OK or the problem")
    p.set_defaults(run=run)


def select_samples(args: argparse.Namespace) -> tuple[list[Sample], Path]:
    root = args.root.expanduser().resolve()
    if args.image_list is not None:
        samples = samples_from_list(root, args.image_list, labels=args.labels)
    else:
        samples = list_samples(root, labels_file=args.labels)
    if args.limit is not None:
        if args.limit > len(samples):
            raise DataError(f"--limit {args.limit} asks for more images than the {len(samples)} of {root}; "
                            f"give at most {len(samples)} or leave --limit out")
        samples = balanced_subset(samples, args.limit, seed=args.seed)
    return samples, root


CROP_SETTINGS = ("resize", "crop", "interpolation", "backend", "resize_rounding", "crop_rounding")


def chosen_preprocess(args: argparse.Namespace) -> Preprocess:
    """--model's preprocessing (or the standard one) with any of the resize/crop options given on top."""
    if args.model:
        from quantize.config import model_entry  # Hydra: only when a model is named

        settings = dict(model_entry(args.model).preprocess)
    else:
        settings = {}
    settings.update({name: getattr(args, name) for name in CROP_SETTINGS if getattr(args, name) is not None})
    return Preprocess.from_config(settings)


def _describe(cache: CropCache) -> str:
    return f"{len(cache)} images, {cache.nbytes / _MIB:.1f} MiB"


def run(args: argparse.Namespace) -> None:
    samples, root = select_samples(args)
    p = chosen_preprocess(args)
    if args.verify:
        verify(samples, root, p, args.out)
        return
    digests = DigestStore()  # in memory: the images are hashed once for the check and the build
    try:
        existing = open_cache(samples, root, p, args.out, verify=True, digests=digests)
    except StaleCacheError as exc:
        print(f"rebuilding {exc.path}: it is stale or corrupt ({exc.reason})")
        existing = None
    if existing is not None:
        print(f"cache {existing.path} already exists and is valid ({_describe(existing)}); nothing to do")
        return
    started = time.perf_counter()
    path = build_cache(samples, root, p, args.out, workers=args.workers, digests=digests)
    seconds = time.perf_counter() - started
    built = open_cache(samples, root, p, args.out, verify=False, digests=digests)
    print(f"cache {path}: {_describe(built)}, built in {seconds:.1f} s ({len(samples) / seconds:.0f} images/s)")


def verify(samples: list[Sample], root: Path, p: Preprocess, out: Path) -> None:
    cache = open_cache(samples, root, p, out, verify=True)  # every image read again: nothing remembered is trusted
    if cache is None:
        raise DataError(f"no cache of these {len(samples)} images at {Path(out) / cache_key(samples, root, p)}; "
                        "build it with the same arguments without --verify")
    print(f"cache {cache.path}: OK ({_describe(cache)}, images and crops sha256 verified)")
