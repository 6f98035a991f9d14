"""``class-names``: the 1000 human-readable class names, one per line in class-index order."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quantize.core.artifacts import write_text
from quantize.data.samples import SYNSETS_FILE, load_synsets
from quantize.core.errors import DataError, examples

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("class_names.txt")


def class_names(synsets_path: str | Path | None = None) -> list[str]:
    """Class names in class-index order: the words after the synset id (``tench, Tinca tinca``)."""
    path = Path(synsets_path) if synsets_path is not None else SYNSETS_FILE
    load_synsets(path)  # validates the file: 1000 unique synset ids
    entries = [line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    nameless = [f"line {k}: {e[0]}" for k, e in enumerate(entries, 1) if len(e) < 2]
    if nameless:
        raise DataError(f"synsets file {path}: {len(nameless)} synsets have no class name after the id "
                        f"({examples(nameless)})")
    return [e[1].strip() for e in entries]


def write_class_names(out: Path, synsets_path: Path | None = None) -> int:
    names = class_names(synsets_path)
    write_text(Path(out), "".join(f"{name}\n" for name in names))
    return len(names)


def run(args: argparse.Namespace) -> None:
    count = write_class_names(args.out, args.synsets)
    log.info("wrote %d class names to %s", count, args.out)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "class-names",
        help="write the 1000 class names (tench, Tinca tinca) in class-index order",
        description="Write one class name per line, line k = class k, taken from the synsets file "
                    "('n01440764 tench, Tinca tinca' gives 'tench, Tinca tinca').",
    )
    p.add_argument("--synsets", type=Path, metavar="FILE",
                   help="synsets with names, in class-index order (default: the bundled ImageNet-1k list)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="file to write (default: %(default)s)")
    p.set_defaults(run=run)
    return p
