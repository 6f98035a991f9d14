"""The data_prep commands written for labels, class names and val sorting."""

import errno
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_IMAGENET, write_tiny_imagenet

from data_prep.__main__ import main as data_prep_main
from data_prep.class_names import class_names, write_class_names
from data_prep.labels import DEVKIT_SYNSETS_FILE, val_image_name, write_labels
from data_prep.sort_val import sort_val
from quantize.data.samples import list_samples, load_synsets
from quantize.core.errors import DataError

SYNSETS = load_synsets()
VAL_SYNSETS = SHARED_IMAGENET / "val_synsets.txt"
needs_val_synsets = pytest.mark.skipif(not VAL_SYNSETS.is_file(), reason="../shared/data/imagenet is absent")
# First lines of the devkit's ILSVRC2012_validation_ground_truth.txt, as published in public code.
DEVKIT_GT_HEAD = [490, 361, 171, 822, 297, 482, 13, 704, 599, 164, 649]


def cli(argv: list[str]) -> int:
    return data_prep_main(argv)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    return err[-1]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- labels


GT_CLASSES = [65, 0, 999, 65, 517]


@pytest.fixture
def synset_gt(tmp_path):
    return write_lines(tmp_path / "gt.txt", [SYNSETS[c] for c in GT_CLASSES])


def expected_labels(classes):
    return "".join(f"{val_image_name(i)} {c}\n" for i, c in enumerate(classes, 1))


def test_labels_from_synset_ground_truth(tmp_path, synset_gt):
    assert write_labels(tmp_path / "val_label.txt", ground_truth=synset_gt) == 5
    text = (tmp_path / "val_label.txt").read_text()
    assert text == expected_labels(GT_CLASSES)
    assert text.splitlines()[0] == "ILSVRC2012_val_00000001.JPEG 65"
    assert leftovers(tmp_path) == []


def test_labels_synset_format_and_cli_default_out(tmp_path, synset_gt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["labels", "--ground-truth", str(synset_gt), "--format", "synset"]) == 0
    lines = (tmp_path / "val_label.txt").read_text().splitlines()
    assert lines == [f"{val_image_name(i)} {SYNSETS[c]}" for i, c in enumerate(GT_CLASSES, 1)]


def shuffled_devkit_order(seed=1):
    order = list(SYNSETS)
    random.Random(seed).shuffle(order)
    return order


def devkit_ids(order, classes):
    devkit_id = {s: k for k, s in enumerate(order, 1)}
    return [devkit_id[SYNSETS[c]] for c in classes]


def test_labels_from_devkit_ground_truth_with_devkit_synsets(tmp_path):
    order = shuffled_devkit_order()
    # map_clsloc.txt style: only the first token of each line counts
    write_lines(tmp_path / "order.txt", [f"{s} {k} name_{k}" for k, s in enumerate(order, 1)])
    ids = devkit_ids(order, GT_CLASSES)
    assert ids != [c + 1 for c in GT_CLASSES]  # the orders really differ
    write_lines(tmp_path / "devkit_gt.txt", ids)
    out = tmp_path / "labels.txt"
    assert cli(["labels", "--devkit-ground-truth", str(tmp_path / "devkit_gt.txt"),
                "--devkit-synsets", str(tmp_path / "order.txt"), "--out", str(out)]) == 0
    assert out.read_text() == expected_labels(GT_CLASSES)


def synthetic_meta(order):
    """A struct array laid out like the devkit's meta.mat: 1000 leaves (ids 1-1000) then a few inner nodes."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(k, s, f"words {k}", f"gloss {k}", 0, np.zeros(0), 0, 1300) for k, s in enumerate(order, 1)]
    rows += [(1001, "n00001740", "entity", "root", 2, np.array([1002, 1003]), 19, 0),
             (1002, "n00002137", "abstraction", "inner", 1, np.array([5]), 18, 0),
             (1003, "n00021939", "artifact", "inner", 1, np.array([7]), 17, 0)]
    table = np.empty(len(rows), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        table[i] = row
    return table


def test_labels_from_devkit_meta_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    order = shuffled_devkit_order(seed=2)
    table = synthetic_meta(order)
    rng = np.random.default_rng(0)
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": table[rng.permutation(len(table))]})
    write_lines(tmp_path / "devkit_gt.txt", devkit_ids(order, GT_CLASSES))
    write_labels(tmp_path / "labels.txt", devkit_ground_truth=tmp_path / "devkit_gt.txt",
                 devkit_meta=tmp_path / "meta.mat")
    assert (tmp_path / "labels.txt").read_text() == expected_labels(GT_CLASSES)


def test_devkit_meta_unreadable_or_not_a_devkit_meta(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    gt = write_lines(tmp_path / "gt.txt", [1])
    (tmp_path / "meta.mat").write_text("not a mat file")
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--devkit-meta", str(tmp_path / "meta.mat")]) == 1
    assert f"cannot read devkit meta {tmp_path / 'meta.mat'}: " in one_line_error(capsys)
    scipy_io.savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--devkit-meta", str(tmp_path / "other.mat")]) == 1
    assert "has no 'synsets' table with ILSVRC2012_ID and WNID fields" in one_line_error(capsys)
    scipy_io.savemat(tmp_path / "partial.mat", {"synsets": synthetic_meta(SYNSETS)[2:]})
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--devkit-meta", str(tmp_path / "partial.mat")]) == 1
    assert "2 of the devkit ids 1-1000 have no synset (1, 2)" in one_line_error(capsys)


def test_devkit_meta_without_scipy(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes "from scipy.io import ..." fail
    write_lines(tmp_path / "gt.txt", [1])
    assert cli(["labels", "--devkit-ground-truth", str(tmp_path / "gt.txt"),
                "--devkit-meta", str(tmp_path / "meta.mat"), "--out", str(tmp_path / "l.txt")]) == 1
    message = one_line_error(capsys)
    assert "needs scipy" in message and "--devkit-synsets" in message
    assert not (tmp_path / "l.txt").exists()


def test_bundled_devkit_order():
    order = load_synsets(DEVKIT_SYNSETS_FILE)
    assert sorted(order) == SYNSETS and order != SYNSETS
    assert order[:3] == ["n02119789", "n02100735", "n02110185"]
    assert order[490 - 1] == "n01751748" and SYNSETS.index("n01751748") == 65


def test_devkit_id_490_is_class_65(tmp_path):
    write_lines(tmp_path / "gt.txt", [490, 1])
    write_labels(tmp_path / "labels.txt", devkit_ground_truth=tmp_path / "gt.txt")
    assert (tmp_path / "labels.txt").read_text().splitlines() == [
        "ILSVRC2012_val_00000001.JPEG 65", f"ILSVRC2012_val_00000002.JPEG {SYNSETS.index('n02119789')}"]


@needs_val_synsets
def test_real_val_synsets_and_devkit_round_trip(tmp_path):
    direct = tmp_path / "direct.txt"
    assert write_labels(direct, ground_truth=VAL_SYNSETS) == 50_000
    lines = direct.read_text().splitlines()
    assert len(lines) == 50_000 and lines[0] == "ILSVRC2012_val_00000001.JPEG 65"
    assert lines[-1].startswith("ILSVRC2012_val_00050000.JPEG ")

    ids = devkit_ids(load_synsets(DEVKIT_SYNSETS_FILE), [SYNSETS.index(s) for s in VAL_SYNSETS.read_text().split()])
    assert ids[:len(DEVKIT_GT_HEAD)] == DEVKIT_GT_HEAD
    write_lines(tmp_path / "devkit_gt.txt", ids)
    write_labels(tmp_path / "via_devkit.txt", devkit_ground_truth=tmp_path / "devkit_gt.txt")
    assert (tmp_path / "via_devkit.txt").read_bytes() == direct.read_bytes()


def test_bad_synset_ground_truth_names_offenders(tmp_path, capsys):
    gt = write_lines(tmp_path / "gt.txt", [SYNSETS[0], "n99999999", "", f"{SYNSETS[1]} 3", "nope", SYNSETS[2], ""])
    out = tmp_path / "val_label.txt"
    out.write_text("old\n")
    assert cli(["labels", "--ground-truth", str(gt), "--out", str(out)]) == 1
    message = one_line_error(capsys)
    assert f"ground truth {gt}:" in message
    assert "2 lines with an unknown synset (line 2: 'n99999999', line 5: 'nope')" in message
    assert "1 line left blank (line 3: '')" in message
    assert "1 line with several tokens (expected one) (line 4:" in message
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []


def test_bad_devkit_ground_truth_names_offenders(tmp_path, capsys):
    gt = write_lines(tmp_path / "gt.txt", [1, 0, 1001, "x", 1000, *range(2, 10), -3])
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--out", str(tmp_path / "l.txt")]) == 1
    message = one_line_error(capsys)
    assert "3 lines with an id outside 1-1000 (line 2: '0', line 3: '1001', line 14: '-3')" in message
    assert "1 line with a non-integer id (line 4: 'x')" in message
    assert not (tmp_path / "l.txt").exists()


def test_bad_devkit_synsets_files(tmp_path, capsys):
    gt = write_lines(tmp_path / "gt.txt", [1])
    order = shuffled_devkit_order()
    unknown = write_lines(tmp_path / "unknown.txt", ["n00000001", *order[1:]])
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--devkit-synsets", str(unknown)]) == 1
    assert "1 of its synsets are not in the synsets list (id 1: n00000001)" in one_line_error(capsys)
    short = write_lines(tmp_path / "short.txt", order[:999])
    assert cli(["labels", "--devkit-ground-truth", str(gt), "--devkit-synsets", str(short)]) == 1
    assert "expected 1000 unique synset ids, found 999" in one_line_error(capsys)


def test_labels_argument_errors(tmp_path, synset_gt, capsys):
    with pytest.raises(DataError, match="exactly one of --ground-truth and --devkit-ground-truth"):
        write_labels(tmp_path / "l.txt")
    assert cli(["labels", "--ground-truth", str(synset_gt), "--devkit-synsets", str(DEVKIT_SYNSETS_FILE)]) == 1
    assert "only apply to --devkit-ground-truth" in one_line_error(capsys)
    assert cli(["labels", "--ground-truth", str(tmp_path / "absent.txt")]) == 1
    assert f"cannot read ground truth {tmp_path / 'absent.txt'}: No such file or directory" in one_line_error(capsys)
    with pytest.raises(SystemExit):  # argparse: the two sources exclude each other
        cli(["labels", "--ground-truth", str(synset_gt), "--devkit-ground-truth", str(synset_gt)])


# ---------------------------------------------------------------- class names


def test_class_names_bundled():
    names = class_names()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert names[134] == names[517] == "crane"


@pytest.mark.skipif(not (SHARED_IMAGENET / "synsets.txt").is_file(), reason="../shared/data/imagenet is absent")
def test_class_names_match_shared_synsets():
    assert class_names(SHARED_IMAGENET / "synsets.txt") == class_names()


def test_class_names_command(tmp_path):
    assert cli(["class-names", "--out", str(tmp_path / "names.txt")]) == 0
    lines = (tmp_path / "names.txt").read_text().splitlines()
    assert lines == class_names() and lines[1] == "goldfish, Carassius auratus"
    assert write_class_names(tmp_path / "again.txt") == 1000


def test_class_names_missing_names(tmp_path, capsys):
    lines = [f"{s} name {i}" for i, s in enumerate(SYNSETS)]
    lines[3], lines[7] = SYNSETS[3], SYNSETS[7]
    bad = write_lines(tmp_path / "synsets.txt", lines)
    assert cli(["class-names", "--synsets", str(bad), "--out", str(tmp_path / "n.txt")]) == 1
    assert f"synsets file {bad}: 2 synsets have no class name after the id (line 4: {SYNSETS[3]}, line 8: " \
           in one_line_error(capsys)
    assert not (tmp_path / "n.txt").exists()


# ---------------------------------------------------------------- sort-val


CLASSES = (3, 250, 999)


@pytest.fixture
def flat_val(tmp_path):
    return write_tiny_imagenet(tmp_path / "val", classes=CLASSES, per_class=2, flat=True)


def flat_images(root):
    return sorted(p.name for p in root.glob("*.JPEG"))


def sorted_images(root):
    return sorted(p.relative_to(root).as_posix() for p in root.glob("n*/*.JPEG"))


EXPECTED_SORTED = [f"{SYNSETS[c]}/{val_image_name(2 * i + j)}" for i, c in enumerate(CLASSES) for j in (1, 2)]


def test_sort_val_links_in_place_and_is_idempotent(flat_val, capsys, caplog):
    caplog.set_level("INFO")
    assert cli(["sort-val", "--root", str(flat_val)]) == 0
    assert sorted_images(flat_val) == EXPECTED_SORTED
    assert len(flat_images(flat_val)) == 6  # hard links keep the flat names
    first = EXPECTED_SORTED[0]
    assert os.path.samefile(flat_val / first, flat_val / Path(first).name)
    assert "6 linked, 0 already in place" in caplog.text
    caplog.clear()
    result = sort_val(flat_val)
    assert (result.placed, result.in_place) == (0, 6)
    assert "0 linked, 6 already in place" in caplog.text
    samples = list_samples(flat_val)  # synset folders now win over the labels file
    assert [(s.path.parent.name, s.label) for s in samples] == [(SYNSETS[c], c) for c in CLASSES for _ in (1, 2)]


def test_sort_val_into_other_folder_by_synset_labels(flat_val, tmp_path):
    labels = flat_val / "val_label.txt"
    by_synset = [f"{name} {SYNSETS[int(c)]}" for name, c in (line.split() for line in labels.read_text().splitlines())]
    write_lines(tmp_path / "synset_labels.txt", by_synset)
    out = tmp_path / "sorted"
    result = sort_val(flat_val, tmp_path / "synset_labels.txt", out)
    assert result.placed == 6 and sorted_images(out) == EXPECTED_SORTED
    assert sorted_images(flat_val) == []


def test_sort_val_move(flat_val, caplog):
    caplog.set_level("INFO")
    assert sort_val(flat_val, move=True).placed == 6
    assert flat_images(flat_val) == [] and sorted_images(flat_val) == EXPECTED_SORTED
    assert "6 moved, 0 already in place" in caplog.text
    again = sort_val(flat_val, move=True)
    assert (again.placed, again.in_place) == (0, 6)


def test_move_after_link_removes_flat_names(flat_val):
    sort_val(flat_val)
    result = sort_val(flat_val, move=True)
    assert (result.placed, result.in_place) == (6, 0)
    assert flat_images(flat_val) == [] and sorted_images(flat_val) == EXPECTED_SORTED


def test_sort_val_dry_run_touches_nothing(flat_val, capsys):
    before = sorted(p.name for p in flat_val.iterdir())
    assert cli(["sort-val", "--root", str(flat_val), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would link 6 images into 3 synset folders under {flat_val}, 0 already in place" in out
    assert f"{flat_val / val_image_name(1)} -> {flat_val / SYNSETS[3] / val_image_name(1)}" in out
    assert "... (3 more)" in out
    assert sorted(p.name for p in flat_val.iterdir()) == before


def test_sort_val_refuses_missing_images_before_anything(flat_val, capsys):
    for number in (2, 5):
        (flat_val / val_image_name(number)).unlink()
    assert cli(["sort-val", "--root", str(flat_val), "--move"]) == 1
    message = one_line_error(capsys)
    assert f"2 of the 6 labelled images are neither in {flat_val} nor sorted" in message
    assert f"({val_image_name(2)}, {val_image_name(5)})" in message
    assert sorted_images(flat_val) == [] and len(flat_images(flat_val)) == 4


def test_sort_val_never_overwrites_a_different_file(flat_val, capsys):
    target = flat_val / SYNSETS[250] / val_image_name(3)
    target.parent.mkdir()
    target.write_bytes(b"something else")
    assert cli(["sort-val", "--root", str(flat_val)]) == 1
    assert f"1 target already holds other content ({target}); not overwriting" in one_line_error(capsys)
    assert target.read_bytes() == b"something else"
    assert sorted_images(flat_val) == [target.relative_to(flat_val).as_posix()]


def test_identical_copy_counts_as_in_place(flat_val):
    target = flat_val / SYNSETS[250] / val_image_name(3)
    target.parent.mkdir()
    target.write_bytes((flat_val / val_image_name(3)).read_bytes())
    result = sort_val(flat_val)
    assert (result.placed, result.in_place) == (5, 1)


def test_sort_val_copies_when_hard_links_are_impossible(flat_val, tmp_path, monkeypatch, caplog):
    def no_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    caplog.set_level("INFO")
    result = sort_val(flat_val, out=tmp_path / "other")
    assert (result.placed, result.copied) == (0, 6)
    assert "0 linked, 6 copied (hard links impossible: Invalid cross-device link)" in caplog.text
    assert "copying instead" in caplog.text
    assert sorted_images(tmp_path / "other") == EXPECTED_SORTED and len(flat_images(flat_val)) == 6
    assert sort_val(flat_val, out=tmp_path / "other").in_place == 6
    moved = sort_val(flat_val, out=tmp_path / "third", move=True)
    assert moved.placed == 6 and flat_images(flat_val) == []


def test_sort_val_input_errors(tmp_path, flat_val, capsys):
    assert cli(["sort-val", "--root", str(tmp_path / "absent")]) == 1
    assert f"val folder {tmp_path / 'absent'} does not exist" in one_line_error(capsys)
    (flat_val / "val_label.txt").unlink()
    assert cli(["sort-val", "--root", str(flat_val)]) == 1
    assert f"cannot read labels file {flat_val / 'val_label.txt'}" in one_line_error(capsys)
    bad = write_lines(tmp_path / "bad.txt", [f"{val_image_name(1)} 1000"])
    assert cli(["sort-val", "--root", str(flat_val), "--labels", str(bad)]) == 1
    assert "1 line with a class outside 0-999" in one_line_error(capsys)
