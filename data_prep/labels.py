"""``labels``: write the ImageNet val labels file (``ILSVRC2012_val_00000001.JPEG 65`` per line, image order).

The ILSVRC2012 devkit numbers classes its own way: devkit id k (1-1000) is the k-th low-level synset of the
devkit's ``meta.mat`` (field ``ILSVRC2012_ID``), an order that is not the sorted one our class indices use.
The bundled ``quantize/resources/ilsvrc2012_devkit_synsets.txt`` lists that order, one WNID per line. It was
taken from ``imagenet_folder_id_class.txt`` in github.com/arthw/imagenet_label (commit 144da0c) and checked
against the ILSVRC2015 devkit's ``data/map_clsloc.txt`` as committed in github.com/wisetrue95/Classification2020
(same WNID order); it is a permutation of the 1000 sorted synsets, and mapping the first 11 lines of our
``val_synsets.txt`` through it gives 490, 361, 171, 822, 297, 482, 13, 704, 599, 164, 649: the published first
lines of ``ILSVRC2012_validation_ground_truth.txt``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from quantize.core.artifacts import write_text
from quantize.data.samples import NUM_CLASSES, SYNSETS_FILE, load_synsets
from quantize.core.errors import DataError, examples

log = logging.getLogger(__name__)

DEVKIT_SYNSETS_FILE = SYNSETS_FILE.parent / "ilsvrc2012_devkit_synsets.txt"
DEFAULT_OUT = Path("val_label.txt")


def val_image_name(number: int) -> str:
    """File name of the ``number``-th (1-based) ILSVRC2012 val image."""
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def read_lines(path: Path, what: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    while lines and not lines[-1].strip():  # trailing blank lines shift no image numbers
        lines.pop()
    if not lines:
        raise DataError(f"{what} {path} is empty")
    return lines


def _parse_per_line(path: Path, what: str, parse: Callable[[str], tuple[object, str | None]]) -> list:
    """One value per line (line i = image i), or a one-line DataError listing every problem by kind.

    ``parse`` gets the line's single token and returns ``(value, problem kind or None)``.
    """
    values = []
    problems: dict[str, list[str]] = {}
    for number, line in enumerate(read_lines(path, what), 1):
        tokens = line.split()
        if len(tokens) != 1:
            kind = "left blank" if not tokens else "with several tokens (expected one)"
            problems.setdefault(kind, []).append(f"line {number}: {line.strip()!r}")
            continue
        value, kind = parse(tokens[0])
        if kind is not None:
            problems.setdefault(kind, []).append(f"line {number}: {tokens[0]!r}")
        values.append(value)
    if problems:
        raise DataError(
            f"{what} {path}: "
            + "; ".join(f"{len(v)} {'line' if len(v) == 1 else 'lines'} {kind} ({examples(v)})"
                        for kind, v in problems.items())
        )
    return values


def read_synset_ground_truth(path: Path, synsets: Sequence[str]) -> list[str]:
    """Synset of each val image from a synset-per-line file (line i = image i, like ``val_synsets.txt``)."""
    known = set(synsets)
    return _parse_per_line(Path(path), "ground truth",
                           lambda t: (t, None if t in known else "with an unknown synset"))


def read_devkit_ground_truth(path: Path) -> list[int]:
    """Devkit class id (1-1000) of each val image (``ILSVRC2012_validation_ground_truth.txt``)."""
    def parse(token: str) -> tuple[int, str | None]:
        if not re.fullmatch(r"-?[0-9]+", token):  # plain decimal digits only: not '+5', '5.0', '1_0' or '٥'
            return 0, "with a non-integer id"
        ident = int(token)
        if token.startswith("-") or not 1 <= ident <= NUM_CLASSES:
            return ident, f"with an id outside 1-{NUM_CLASSES}"
        return ident, None

    return _parse_per_line(Path(path), "devkit ground truth", parse)


def devkit_order_from_text(path: Path) -> list[str]:
    """Synsets in devkit id order from a text file whose line k starts with the synset of devkit id k.

    The first token is all that is read, so ``map_clsloc.txt`` (``n02119789 1 kit_fox``) works as is.
    """
    return load_synsets(path)


def devkit_order_from_meta(path: Path) -> list[str]:
    """Synsets in devkit id order from the devkit's ``data/meta.mat`` (low-level synsets have ids 1-1000)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"reading --devkit-meta {path} needs scipy (pip install scipy); or pass --devkit-synsets FILE "
            "(line k = synset of devkit id k)"
        ) from None
    try:
        table = loadmat(str(path), squeeze_me=True).get("synsets")
    # loadmat signals a bad file with many exception types (ValueError, MatReadError, NotImplementedError...).
    except Exception as exc:  # noqa: BLE001
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read devkit meta {path}: {reason}") from None
    fields = set(getattr(getattr(table, "dtype", None), "names", None) or ())
    if not {"ILSVRC2012_ID", "WNID"} <= fields:
        raise DataError(f"devkit meta {path} has no 'synsets' table with ILSVRC2012_ID and WNID fields "
                        "(expected the devkit's data/meta.mat)")
    order: dict[int, str] = {}
    for ident, wnid in zip(table["ILSVRC2012_ID"].ravel(), table["WNID"].ravel()):
        if 1 <= int(ident) <= NUM_CLASSES:
            order[int(ident)] = str(wnid)
    missing = [str(k) for k in range(1, NUM_CLASSES + 1) if k not in order]
    if missing:
        raise DataError(f"devkit meta {path}: {len(missing)} of the devkit ids 1-{NUM_CLASSES} have no synset "
                        f"({examples(missing)})")
    return [order[k] for k in range(1, NUM_CLASSES + 1)]


def check_devkit_order(order: Sequence[str], synsets: Sequence[str], source: Path) -> None:
    known = set(synsets)
    unknown = [f"id {k}: {s}" for k, s in enumerate(order, 1) if s not in known]
    if unknown:
        raise DataError(f"devkit synsets {source}: {len(unknown)} of its synsets are not in the synsets list "
                        f"({examples(unknown)})")
    if len(set(order)) != len(order):
        raise DataError(f"devkit synsets {source}: {len(order) - len(set(order))} synsets are repeated")


def load_devkit_order(meta: Path | None, devkit_synsets: Path | None, synsets: Sequence[str]) -> list[str]:
    if meta is not None:
        source, order = Path(meta), devkit_order_from_meta(Path(meta))
    else:
        source = Path(devkit_synsets) if devkit_synsets is not None else DEVKIT_SYNSETS_FILE
        order = devkit_order_from_text(source)
    check_devkit_order(order, synsets, source)
    return order


def format_labels(image_synsets: Sequence[str], synsets: Sequence[str], fmt: str = "index") -> str:
    """Labels file text: image i gets its class index (``fmt="index"``) or its synset (``fmt="synset"``)."""
    class_of = {s: i for i, s in enumerate(synsets)}
    column = (lambda s: str(class_of[s])) if fmt == "index" else (lambda s: s)
    return "".join(f"{val_image_name(i)} {column(s)}\n" for i, s in enumerate(image_synsets, 1))


def write_labels(
    out: Path,
    *,
    ground_truth: Path | None = None,
    devkit_ground_truth: Path | None = None,
    devkit_meta: Path | None = None,
    devkit_synsets: Path | None = None,
    synsets_file: Path | None = None,
    fmt: str = "index",
) -> int:
    """Write the labels file atomically from one of the two ground truths; returns the number of images."""
    if (ground_truth is None) == (devkit_ground_truth is None):
        raise DataError("give exactly one of --ground-truth and --devkit-ground-truth")
    if ground_truth is not None and (devkit_meta or devkit_synsets):
        raise DataError("--devkit-meta and --devkit-synsets only apply to --devkit-ground-truth")
    synsets = load_synsets(synsets_file)
    if ground_truth is not None:
        image_synsets = read_synset_ground_truth(Path(ground_truth), synsets)
    else:
        ids = read_devkit_ground_truth(Path(devkit_ground_truth))
        order = load_devkit_order(devkit_meta, devkit_synsets, synsets)
        image_synsets = [order[k - 1] for k in ids]
    write_text(Path(out), format_labels(image_synsets, synsets, fmt))
    return len(image_synsets)


def run(args: argparse.Namespace) -> None:
    count = write_labels(
        args.out,
        ground_truth=args.ground_truth,
        devkit_ground_truth=args.devkit_ground_truth,
        devkit_meta=args.devkit_meta,
        devkit_synsets=args.devkit_synsets,
        synsets_file=args.synsets,
        fmt=args.format,
    )
    log.info("wrote %d labels to %s", count, args.out)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "labels",
        help="write val_label.txt (ILSVRC2012_val_00000001.JPEG 65) from a ground truth",
        description=(
            "Write the ImageNet val labels file, one 'ILSVRC2012_val_<i>.JPEG <class>' line per image in image "
            "order, from a synset-per-line ground truth (--ground-truth) or from the ILSVRC2012 devkit's "
            "data/ILSVRC2012_validation_ground_truth.txt (--devkit-ground-truth). Devkit ids are mapped to our "
            "class indices (position in the sorted synset list) through the devkit's synset order: the bundled "
            "one by default, or --devkit-meta / --devkit-synsets."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ground-truth", type=Path, metavar="FILE",
                        help="line i = synset of ILSVRC2012_val_<i>.JPEG (like val_synsets.txt)")
    source.add_argument("--devkit-ground-truth", type=Path, metavar="FILE",
                        help="line i = devkit class id (1-1000) of image i")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--devkit-meta", type=Path, metavar="META_MAT",
                       help="the devkit's data/meta.mat, for the devkit id order (needs scipy)")
    order.add_argument("--devkit-synsets", type=Path, metavar="FILE",
                       help="line k starts with the synset of devkit id k (e.g. map_clsloc.txt); "
                            "default: the bundled ILSVRC2012 order")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="labels file to write (default: %(default)s)")
    p.add_argument("--synsets", type=Path, metavar="FILE",
                   help="synsets in class-index order (default: the bundled ImageNet-1k list)")
    p.add_argument("--format", choices=("index", "synset"), default="index",
                   help="second column: class index or synset id (default: %(default)s)")
    p.set_defaults(run=run)
    return p
