"""The committed calibration list and the calib-set command that regenerates it."""

import logging
from collections import Counter
from pathlib import Path

import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.calib_set import default_list_path, read_ground_truth, select
from data_prep.labels import val_image_name
from quantize.core.errors import ConfigError, DataError

from conftest import REPO, SHARED_IMAGENET, SYNSETS, needs_shared_imagenet

COMMITTED = REPO / "calib_lists" / "ilsvrc2012_val_1000.txt"


def synthetic_ground_truth(path: Path, per_class: int = 3, classes: int = 1000) -> Path:
    """Synset-per-line ground truth: image i belongs to class (i - 1) % classes."""
    path.write_text("".join(f"{SYNSETS[i % classes]}\n" for i in range(per_class * classes)))
    return path


def parse(path: Path) -> list[tuple[str, int]]:
    return [(name, int(label)) for name, label in (line.split() for line in path.read_text().splitlines())]


@needs_shared_imagenet()
def test_calib_set_reproduces_the_committed_list_byte_for_byte(tmp_path):
    out = tmp_path / "list.txt"
    assert data_prep_main(["calib-set", "--ground-truth", str(SHARED_IMAGENET / "val_synsets.txt"),
                           "--out", str(out)]) == 0
    assert out.read_bytes() == COMMITTED.read_bytes()


@needs_shared_imagenet()
def test_committed_list_has_one_image_per_class_with_ground_truth_labels():
    entries = parse(COMMITTED)
    truth = dict(read_ground_truth(SHARED_IMAGENET / "val_synsets.txt"))
    assert len(entries) == 1000 and [n for n, _ in entries] == sorted(n for n, _ in entries)
    assert sorted(label for _, label in entries) == list(range(1000))
    assert all(truth[name] == label for name, label in entries)
    assert truth[val_image_name(1)] == 65


def test_default_list_names():
    assert default_list_path(1000, 0) == COMMITTED
    assert default_list_path(2000, 7).name == "ilsvrc2012_val_2000_seed7.txt"


def test_two_per_class_and_an_uneven_remainder_spread_over_classes(tmp_path, caplog):
    entries = read_ground_truth(synthetic_ground_truth(tmp_path / "gt.txt"))
    assert Counter(Counter(label for _, label in select(entries, 2000)).values()) == {2: 1000}
    with caplog.at_level(logging.INFO):
        uneven = select(entries, 1500, seed=4)
    counts = Counter(label for _, label in uneven)
    assert Counter(counts.values()) == {1: 500, 2: 500}
    assert max(c for c, k in counts.items() if k == 2) > 500  # not the 500 lowest class indices
    assert "not a multiple of 1000" in caplog.text and "500 classes" in caplog.text
    assert uneven == select(entries, 1500, seed=4)
    assert uneven != select(entries, 1500, seed=5)


def test_labels_file_ground_truth_gives_the_same_list(tmp_path):
    gt = synthetic_ground_truth(tmp_path / "gt.txt", per_class=2)
    entries = read_ground_truth(gt)
    labels = tmp_path / "val_label.txt"
    labels.write_text("".join(f"{name} {label}\n" for name, label in reversed(entries)))
    assert select(read_ground_truth(labels), 1000, seed=2) == select(entries, 1000, seed=2)


def test_missing_classes_and_small_n_are_refused(tmp_path):
    entries = read_ground_truth(synthetic_ground_truth(tmp_path / "gt.txt", per_class=1, classes=999))
    with pytest.raises(DataError, match="999 of the 1000 classes; 1 classes have no image"):
        select(entries, 1000)
    full = read_ground_truth(synthetic_ground_truth(tmp_path / "gt2.txt", per_class=1))
    with pytest.raises(DataError, match="needs 2 images per class"):
        select(full, 2000)
    with pytest.raises(ConfigError, match="at least one image for each"):
        select(full, 999)


def test_unknown_synset_in_ground_truth_names_the_line(tmp_path):
    gt = synthetic_ground_truth(tmp_path / "gt.txt", per_class=1)
    lines = gt.read_text().splitlines()
    lines[4] = "n99999999"
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"1 line with an unknown synset \(line 5: 'n99999999'\)"):
        read_ground_truth(gt)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "list.txt"
    assert data_prep_main(["calib-set", "--ground-truth", str(tmp_path / "absent.txt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read ground truth")
    assert not out.exists()
