"""Image lists (labels-file format, one ``<image name> <class>`` per line) matched against a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantize.data.samples import Sample, list_samples, read_labels_file
from quantize.core.errors import DataError, examples

def read_image_list(path: str | Path, synsets: Sequence[str] | str | Path | None = None) -> list[tuple[str, int]]:
    """``(image name, class index)`` pairs in file order (classes may be indices or synset ids); a name that climbs
    out of the dataset root ('..', absolute) is a DataError, like in a labels file."""
    return list(read_labels_file(path, synsets, what="image list").items())


def match_image_list(
    samples: Sequence[Sample], entries: Sequence[tuple[str, int]], source: str = "image list"
) -> list[Sample]:
    """The samples named by ``entries`` (matched by file name), in the order of ``entries``.

    Every listed name must be exactly one sample of the dataset and carry the same label, otherwise the list
    was made for another dataset (or the dataset's labels are wrong) and using it would silently mislabel.
    """
    by_name: dict[str, list[Sample]] = {}
    for sample in samples:
        by_name.setdefault(sample.path.name, []).append(sample)
    missing = [name for name, _ in entries if name not in by_name]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(entries)} listed images are not in the dataset ({examples(missing)})"
        )
    ambiguous = [name for name, _ in entries if len(by_name[name]) > 1]
    if ambiguous:
        raise DataError(
            f"{source}: {len(ambiguous)} listed names match several dataset images ({examples(ambiguous)})"
        )
    wrong = [f"{name}: list {label}, dataset {by_name[name][0].label}"
             for name, label in entries if by_name[name][0].label != label]
    if wrong:
        raise DataError(
            f"{source}: the labels of {len(wrong)} listed images disagree with the dataset's ({examples(wrong)})"
        )
    return [by_name[name][0] for name, _ in entries]


def samples_from_list(
    root: str | Path, list_path: str | Path, labels: str | Path | None = None,
    synsets: Sequence[str] | str | Path | None = None,
) -> list[Sample]:
    """The images of the dataset at ``root`` named in ``list_path``, in list order."""
    samples = list_samples(root, labels_file=labels, synsets=synsets)
    return match_image_list(samples, read_image_list(list_path, synsets), source=f"image list {list_path}")
