"""``calib-set``: the committed, reproducible calibration list drawn from the ImageNet val ground truth.

Rule (seeded, deterministic): images of each class are sorted by name and shuffled with
``numpy.random.default_rng([seed, class])``; the list takes ``N // 1000`` images from every class (the first
ones of that order) and, when ``N`` is not a multiple of 1000, one more from ``N % 1000`` classes picked by a
seeded permutation of the classes (see ``quantize.data.samples.balanced_subset``). Lines are ``<image name> <class>``,
sorted by name.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from data_prep.labels import read_lines, read_synset_ground_truth, val_image_name
from quantize.core.artifacts import write_text
from data_prep.arguments import positive_int, seed
from quantize.data.samples import NUM_CLASSES, Sample, balanced_subset, load_synsets, read_labels_file
from quantize.core.errors import ConfigError, DataError, examples

log = logging.getLogger(__name__)

LIST_DIR = Path(__file__).resolve().parent.parent / "calib_lists"


def default_list_path(n: int, seed: int) -> Path:
    return LIST_DIR / (f"ilsvrc2012_val_{n}.txt" if seed == 0 else f"ilsvrc2012_val_{n}_seed{seed}.txt")


def read_ground_truth(path: Path, synsets: list[str] | None = None) -> list[tuple[str, int]]:
    """(image name, class) pairs from a synset-per-line ground truth (line i = synset of val image i) or from a
    labels file (``name class`` or ``name synset`` per line)."""
    synsets = synsets or load_synsets()
    first = next((line.split() for line in read_lines(path, "ground truth") if line.strip()), [])
    if len(first) != 1:
        return list(read_labels_file(path, synsets).items())
    class_of = {s: i for i, s in enumerate(synsets)}
    return [(val_image_name(i), class_of[synset])
            for i, synset in enumerate(read_synset_ground_truth(path, synsets), 1)]


def select(entries: list[tuple[str, int]], n: int, seed: int = 0,
           num_classes: int = NUM_CLASSES) -> list[tuple[str, int]]:
    """``n`` entries, class-balanced by the module's rule, sorted by name."""
    if n < num_classes:
        raise ConfigError(f"N={n}: a calibration list needs at least one image for each of the {num_classes} "
                          "classes")
    per_class = Counter(label for _, label in entries)
    absent = [str(c) for c in range(num_classes) if c not in per_class]
    if absent:
        raise DataError(f"the ground truth has {num_classes - len(absent)} of the {num_classes} classes; "
                        f"{len(absent)} classes have no image ({examples(absent)})")
    base = n // num_classes
    short = [f"{c} ({k})" for c, k in sorted(per_class.items()) if k < base]
    if short or n > len(entries):
        raise DataError(f"N={n} needs {base} images per class from {len(entries)} images, but {len(short)} "
                        f"classes have fewer (class (images): {examples(short)})")
    if n % num_classes:
        log.info("N=%d is not a multiple of %d: every class gets %d images and %d classes, chosen by a seeded "
                 "permutation (seed %d), get one more", n, num_classes, n // num_classes, n % num_classes, seed)
    samples = [Sample(Path(name), label) for name, label in entries]
    chosen = balanced_subset(samples, n, seed=seed)
    return sorted(((s.path.name, s.label) for s in chosen), key=lambda e: e[0])


def write_list(entries: list[tuple[str, int]], out: Path) -> None:
    write_text(out, "".join(f"{name} {label}\n" for name, label in entries))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else default_list_path(args.n, args.seed)
    entries = read_ground_truth(Path(args.ground_truth), load_synsets(args.synsets) if args.synsets else None)
    chosen = select(entries, args.n, args.seed)
    write_list(chosen, out)
    per_class = Counter(label for _, label in chosen)
    log.info("wrote %s: %d images from %d, %d-%d per class, %d classes (seed %d)", out, len(chosen), len(entries),
             min(per_class.values()), max(per_class.values()), len(per_class), args.seed)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calib-set", help="write a class-balanced calibration list from the val ground truth",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ground-truth", required=True,
                   help="synset-per-line ground truth (val_synsets.txt) or a labels file (val_label.txt)")
    p.add_argument("--n", type=positive_int, default=1000, help="number of images (default 1000: one per class)")
    p.add_argument("--seed", type=seed, default=0, help="selection seed (default 0)")
    p.add_argument("--out", help="output file (default calib_lists/ilsvrc2012_val_<N>[_seed<S>].txt)")
    p.add_argument("--synsets", help="the 1000 sorted synsets (default: the bundled list)")
    p.set_defaults(run=run)
