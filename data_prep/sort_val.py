"""``sort-val``: sort a flat ImageNet val folder into synset folders (``val/n01440764/*.JPEG``) from a labels file.

Hard links by default (no extra disk, the flat files stay usable), a copy only where hard links are impossible,
or ``--move``. Every step leaves each image whole under at least one name, so an interrupted run is finished by
running it again; images already in place are counted, not redone.
"""

from __future__ import annotations

import argparse
import errno
import filecmp
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from quantize.core.artifacts import atomic_path
from quantize.data.samples import inside, load_synsets, read_labels_file
from quantize.core.errors import DataError, examples

log = logging.getLogger(__name__)

DEFAULT_LABELS_NAME = "val_label.txt"
# Errors meaning "this filesystem pair cannot hard-link", as opposed to a problem with one file.
_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_DRY_RUN_EXAMPLES = 3


@dataclass
class Plan:
    todo: list[tuple[Path, Path]] = field(default_factory=list)  # (flat source, target) still to place
    leftovers: list[Path] = field(default_factory=list)  # --move: flat sources whose target already holds them
    in_place: int = 0


@dataclass
class Result:
    placed: int = 0  # linked, or moved with --move
    copied: int = 0
    in_place: int = 0
    copy_reason: str | None = None


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one inode, or two regular files with the same bytes."""
    if os.path.samefile(a, b):
        return True
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def make_plan(root: Path, labels: dict[str, int], synsets: list[str], out: Path, move: bool) -> Plan:
    """What is left to do; refuses (DataError) if images are missing or a target holds a different file."""
    plan = Plan()
    missing: list[str] = []
    conflicts: list[str] = []
    leaving: list[str] = []
    root_real, out_real = os.path.realpath(root), os.path.realpath(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give the folder the synset folders go in (default: VAL_DIR)")
    for name, label in labels.items():
        source, target = root / name, out / synsets[label] / Path(name).name
        # nothing is read, linked or moved from outside the root, nor written outside the output folder
        if (source.exists() or source.is_symlink()) and not inside(source, root_real):
            leaving.append(f"{name} -> {os.path.realpath(source)}")
            continue
        if not inside(target.parent if not target.is_symlink() else target, out_real):
            leaving.append(f"{target} -> {os.path.realpath(target)}")
            continue
        if target.exists():
            if not source.exists():
                plan.in_place += 1
            elif not same_file(source, target):
                conflicts.append(str(target))
            elif move and source != target:
                plan.leftovers.append(source)
            else:
                plan.in_place += 1
        elif source.is_file():
            plan.todo.append((source, target))
        else:
            missing.append(name)
    if leaving:
        raise DataError(f"{len(leaving)} labelled entr{'ies' if len(leaving) > 1 else 'y'} lead outside {root} or "
                        f"{out} ({examples(leaving)}); nothing outside them is moved or linked: nothing was changed")
    if missing:
        raise DataError(f"{len(missing)} of the {len(labels)} labelled images are neither in {root} nor sorted "
                        f"under {out} ({examples(missing)}); nothing was changed")
    if conflicts:
        many = len(conflicts) > 1
        raise DataError(f"{len(conflicts)} target{'s' if many else ''} already hold{'' if many else 's'} other "
                        f"content ({examples(conflicts)}); not overwriting, nothing was changed")
    return plan


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)
        if target.exists():
            raise DataError(f"{target} appeared while sorting; not overwriting it")


def _place(source: Path, target: Path, move: bool, result: Result) -> None:
    if result.copy_reason is None:
        try:
            os.link(source, target)
        except FileExistsError:
            raise DataError(f"{target} appeared while sorting; not overwriting it") from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            result.copy_reason = exc.strerror or str(exc)
            log.warning("cannot hard-link %s to %s (%s): copying instead", source, target, result.copy_reason)
        else:
            result.placed += 1
    if result.copy_reason is not None:
        _copy(source, target)
        if move:
            result.placed += 1
        else:
            result.copied += 1
    if move:
        source.unlink()


def execute(plan: Plan, move: bool) -> Result:
    result = Result(in_place=plan.in_place)
    made: set[Path] = set()
    verb = "moving" if move else "linking"
    for source, target in tqdm(plan.todo, desc=verb, unit="img", file=sys.stderr, disable=None):
        try:
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            _place(source, target, move, result)
        except OSError as exc:
            raise DataError(f"{verb} {source} to {target} failed: {exc.strerror or exc}; "
                            "run again to finish (done images are kept)") from None
    for source in plan.leftovers:
        try:
            source.unlink()
        except OSError as exc:
            raise DataError(f"cannot remove {source} (already sorted): {exc.strerror or exc}") from None
        result.placed += 1
    return result


def describe_plan(plan: Plan, out: Path, move: bool) -> str:
    verb = "move" if move else "link"
    folders = len({target.parent for _, target in plan.todo})
    lines = [f"dry run: would {verb} {len(plan.todo)} images into {folders} synset folders under {out}, "
             f"{plan.in_place} already in place"]
    if plan.leftovers:
        lines[0] += f", and remove {len(plan.leftovers)} flat copies of images already sorted"
    lines += [f"  {source} -> {target}" for source, target in plan.todo[:_DRY_RUN_EXAMPLES]]
    if len(plan.todo) > _DRY_RUN_EXAMPLES:
        lines.append(f"  ... ({len(plan.todo) - _DRY_RUN_EXAMPLES} more)")
    return "\n".join(lines)


def describe_result(result: Result, out: Path, move: bool) -> str:
    done = f"{result.placed} moved" if move else f"{result.placed} linked"
    if result.copied:
        done += f", {result.copied} copied (hard links impossible: {result.copy_reason})"
    return f"{done}, {result.in_place} already in place under {out}"


def sort_val(
    root: Path,
    labels_file: Path | None = None,
    out: Path | None = None,
    move: bool = False,
    dry_run: bool = False,
    synsets_file: Path | None = None,
) -> Plan | Result:
    """Sort (or with ``dry_run`` only plan) the flat val images of ``root``; see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"val folder {root} {'is not a directory' if root.exists() else 'does not exist'}")
    out = Path(out) if out is not None else root
    synsets = load_synsets(synsets_file)
    labels = read_labels_file(labels_file if labels_file is not None else root / DEFAULT_LABELS_NAME, synsets)
    plan = make_plan(root, labels, synsets, out, move)
    if dry_run:
        print(describe_plan(plan, out, move))
        return plan
    result = execute(plan, move)
    log.info("%s", describe_result(result, out, move))
    return result


def run(args: argparse.Namespace) -> None:
    sort_val(args.root, args.labels, args.out, move=args.move, dry_run=args.dry_run, synsets_file=args.synsets)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sort-val",
        help="sort flat val images into synset folders (hard links by default)",
        description=(
            "Place each image named in the labels file at OUT/<synset>/<name>: hard links by default (a copy "
            "where hard links are impossible, e.g. across devices), or moved with --move. Idempotent: images "
            "already in place are skipped. Refuses before changing anything if labelled images are missing or "
            "a target holds a different file."
        ),
    )
    p.add_argument("--root", type=Path, required=True, metavar="VAL_DIR", help="folder holding the flat images")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help=f"labels file, '<name> <class or synset>' per line (default: VAL_DIR/{DEFAULT_LABELS_NAME})")
    p.add_argument("--out", type=Path, metavar="DIR", help="where the synset folders go (default: VAL_DIR)")
    p.add_argument("--move", action="store_true", help="move the images instead of hard-linking them")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--synsets", type=Path, metavar="FILE",
                   help="synsets in class-index order (default: the bundled ImageNet-1k list)")
    p.set_defaults(run=run)
    return p
