import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_IMAGENET
from quantize.data.samples import Sample, balanced_subset, iter_batches, list_samples, load_synsets
from quantize.core.errors import DataError
from quantize.data.preprocess import Preprocess, load_rgb, preprocess

IMAGENET = SHARED_IMAGENET  # ../shared, or $QUANTIZE_SHARED
SYNSETS = load_synsets()


def write_image(path, size=(40, 30), seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt or "JPEG")
    return path


# class index -> image file names; two sizes, mixed extension case
CLASSES = {7: ["b.JPEG", "a.jpg"], 512: ["c.jpeg"], 999: ["d.PNG", "e.JPEG"]}


def folder_dataset(root):
    for i, (label, names) in enumerate(CLASSES.items()):
        for j, name in enumerate(names):
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            write_image(root / SYNSETS[label] / name, size=(300, 200) if j else (40, 30), seed=10 * i + j, fmt=fmt)
    return root


def flat_dataset(root, by_synset=False, labels_name="val_label.txt"):
    lines = []
    for i, (label, names) in enumerate(CLASSES.items()):
        for j, name in enumerate(names):
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            write_image(root / name, size=(300, 200) if j else (40, 30), seed=10 * i + j, fmt=fmt)
            lines.append(f"{name} {SYNSETS[label] if by_synset else label}")
    (root / labels_name).write_text("\n".join(lines) + "\n")
    return root


def pairs(samples):
    return [(s.path.name, s.label) for s in samples]


EXPECTED = [("a.jpg", 7), ("b.JPEG", 7), ("c.jpeg", 512), ("d.PNG", 999), ("e.JPEG", 999)]


def test_folder_layout_labels_come_from_synset_list(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    (root / SYNSETS[7] / "notes.txt").write_text("ignored")
    (root / SYNSETS[3]).mkdir()  # empty class folder is fine
    samples = list_samples(root)
    assert pairs(samples) == EXPECTED
    assert all(s.path.parent.name == SYNSETS[s.label] for s in samples)


@pytest.mark.parametrize("by_synset", [False, True])
@pytest.mark.parametrize("labels_name", ["val_label.txt", "val.txt", "labels.txt"])
def test_flat_layout_matches_folder_layout(tmp_path, by_synset, labels_name):
    root = flat_dataset(tmp_path / "flat", by_synset=by_synset, labels_name=labels_name)
    write_image(root / "unlabelled.JPEG")  # present but not in the labels: ignored
    samples = list_samples(root)
    assert pairs(samples) == pairs(list_samples(folder_dataset(tmp_path / "folders"))) == EXPECTED
    assert all(s.path.parent == root for s in samples)


def test_explicit_labels_file(tmp_path):
    root = flat_dataset(tmp_path / "flat", labels_name="val_label.txt")
    (root / "val_label.txt").rename(tmp_path / "elsewhere.txt")
    assert pairs(list_samples(root, labels_file=tmp_path / "elsewhere.txt")) == EXPECTED
    with pytest.raises(DataError, match="cannot read labels file .*nope.txt"):
        list_samples(root, labels_file=tmp_path / "nope.txt")


def test_custom_synset_list(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    reordered = list(reversed(SYNSETS))
    assert {s.label for s in list_samples(root, synsets=reordered)} == {999 - 7, 999 - 512, 0}


def labels_error(tmp_path, lines):
    root = flat_dataset(tmp_path / "flat")
    (root / "val_label.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        list_samples(root)
    message = str(info.value)
    assert str(root / "val_label.txt") in message and "\n" not in message
    return message


def test_labels_class_out_of_range(tmp_path):
    message = labels_error(tmp_path, ["a.jpg 7", "b.JPEG 1000", "c.jpeg -1"])
    assert "2 lines with a class outside 0-999" in message and "line 2: 'b.JPEG 1000'" in message


def test_labels_duplicate_name(tmp_path):
    message = labels_error(tmp_path, ["a.jpg 7", "b.JPEG 7", "a.jpg 7"])
    assert "1 line repeating an earlier image name (line 3: 'a.jpg 7')" in message


def test_labels_malformed_lines(tmp_path):
    bad = [f"x{i}.JPEG" for i in range(7)]
    message = labels_error(tmp_path, ["a.jpg 7", *bad, "b.JPEG n99999999"])
    assert "7 malformed lines" in message and "line 6: 'x4.JPEG'" in message and "x5" not in message
    assert "..." in message
    assert "1 line whose class is neither an index nor a known synset" in message


def test_labels_missing_images(tmp_path):
    message = labels_error(tmp_path, ["a.jpg 7", "gone1.JPEG 7", "gone2.JPEG 8"])
    assert "2 of 3 images are missing" in message and "gone1.JPEG, gone2.JPEG" in message


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"^data root .*nowhere does not exist$"):
        list_samples(tmp_path / "nowhere")


def test_unknown_folder(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    (root / "cats").mkdir()
    with pytest.raises(DataError, match="cats"):
        list_samples(root)


def test_neither_layout(tmp_path):
    write_image(tmp_path / "a.JPEG")
    with pytest.raises(DataError, match="synset folders.*labels file"):
        list_samples(tmp_path)


def test_no_images_in_synset_folders(tmp_path):
    (tmp_path / SYNSETS[0]).mkdir()
    (tmp_path / SYNSETS[0] / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        list_samples(tmp_path)


def test_load_synsets_validates(tmp_path):
    assert len(SYNSETS) == 1000 and SYNSETS[0] == "n01440764" and SYNSETS[65] == "n01751748"
    short = tmp_path / "short.txt"
    short.write_text("\n".join(SYNSETS[:999]))
    with pytest.raises(DataError, match="short.txt"):
        load_synsets(short)
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(SYNSETS[:999] + [SYNSETS[0]]))
    with pytest.raises(DataError, match="999 unique"):
        load_synsets(dup)
    with pytest.raises(DataError, match="missing.txt"):
        load_synsets(tmp_path / "missing.txt")


def fake_samples(counts):
    """counts[k] images for class k, named so the sorted order is known."""
    return [Sample(Path(f"/d/{label:03d}/{i:03d}.JPEG"), label) for label, n in counts.items() for i in range(n)]


def test_balanced_subset_covers_every_class_first():
    counts = {0: 5, 3: 1, 4: 8, 9: 3, 20: 6}
    samples = fake_samples(counts)
    for n in range(len(samples) + 1):
        subset = balanced_subset(samples, n)
        assert len(subset) == n and len(set(subset)) == n
        assert subset == [s for s in samples if s in subset]  # input order kept
        taken = {label: sum(s.label == label for s in subset) for label in counts}
        # round robin: a class only gets a k-th image once every class with >= k images has k-1 ... k
        for label, k in taken.items():
            for other, m in taken.items():
                if k - m > 1:
                    assert m == counts[other], (n, taken)
        if n <= len(counts):
            assert len({s.label for s in subset}) == n  # distinct classes first


def test_balanced_subset_spreads_a_partial_round_over_classes():
    samples = fake_samples({label: 2 for label in range(1000)})
    labels = sorted(s.label for s in balanced_subset(samples, 100, seed=0))
    assert len(set(labels)) == 100
    assert max(labels) > 500  # not simply the 100 lowest class indices


def test_balanced_subset_is_deterministic_and_seeded():
    samples = fake_samples({label: 20 for label in range(10)})
    a = balanced_subset(samples, 35, seed=0)
    assert a == balanced_subset(samples, 35, seed=0)
    shuffled = random.Random(1).sample(samples, len(samples))
    b = balanced_subset(shuffled, 35, seed=0)
    assert set(b) == set(a) and b == [s for s in shuffled if s in b]  # same choice, input order kept
    assert set(a) != set(balanced_subset(samples, 35, seed=1))


def test_balanced_subset_all():
    samples = fake_samples({0: 2, 1: 3})
    assert balanced_subset(samples, None) == samples
    assert balanced_subset(samples, 5) == samples
    assert balanced_subset(samples, 100) == samples
    assert balanced_subset(samples, 0) == []


def test_iter_batches(tmp_path):
    samples = list_samples(folder_dataset(tmp_path / "ds"))
    p = Preprocess()
    batches = list(iter_batches(samples, 2, p, workers=2, desc="test"))
    assert [b[0].shape for b in batches] == [(2, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]
    assert all(x.dtype == np.float32 and y.dtype == np.int64 for x, y in batches)
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert labels.tolist() == [s.label for s in samples]
    for image, s in zip(images, samples):
        np.testing.assert_array_equal(image, preprocess(load_rgb(s.path), p))
    single = list(iter_batches(samples, 10, p, workers=1))
    assert len(single) == 1
    np.testing.assert_array_equal(single[0][0], images)
    early = iter_batches(samples, 1, p)
    next(early)
    early.close()  # abandoning the iterator shuts its threads down


def test_iter_batches_propagates_corrupt_image(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    bad = root / SYNSETS[512] / "c.jpeg"
    bad.write_bytes(bad.read_bytes()[:200])
    batches = iter_batches(list_samples(root), 2, Preprocess())
    next(batches)  # classes 7: fine
    with pytest.raises(DataError, match="c.jpeg"):
        next(batches)


@pytest.mark.skipif(not (IMAGENET / "sample").is_dir(), reason=f"{IMAGENET} not present")
def test_real_sample_and_metadata():
    samples = list_samples(IMAGENET / "sample")
    assert len(samples) == 200
    assert [s.label for s in samples] == list(range(0, 1000, 5))
    assert samples[0].label == 0 and samples[0].path.parent.name == "n01440764"
    synsets = load_synsets(IMAGENET / "synsets.txt")
    assert synsets == SYNSETS
    first = (IMAGENET / "val_synsets.txt").open().readline().strip()
    assert synsets.index(first) == 65
