import argparse
import json
import os

import numpy as np
import pytest
from conftest import SHARED_IMAGENET, SYNSETS, needs_shared_imagenet, write_tiny_imagenet

from data_prep import cache as cache_cmd
from quantize.data import crop_cache
from quantize.core.artifacts import file_sha256, read_json
from quantize.data.crop_cache import StaleCacheError, build_cache, cache_key, open_cache
from quantize.data.samples import iter_batches, list_samples
from quantize.config import model_entry
from quantize.core.errors import ConfigError, DataError
from quantize.data.image_list import match_image_list, read_image_list, samples_from_list
from quantize.data.preprocess import Preprocess

SMALL = Preprocess(resize=40, crop=32)


def assert_same_batches(cache, samples, p, batch_size):
    got = list(cache.iter_batches(batch_size, desc="test"))
    want = list(iter_batches(samples, batch_size, p, workers=2))
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want):
        assert x.dtype == wx.dtype == np.float32 and y.dtype == wy.dtype == np.int64
        assert x.shape == wx.shape and x.flags.c_contiguous
        assert x.tobytes() == wx.tobytes()  # bitwise, not approximately
        np.testing.assert_array_equal(y, wy)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    cache_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["cache", *map(str, argv)])
    args.run(args)


@pytest.fixture
def dataset(tmp_path):
    root = write_tiny_imagenet(tmp_path / "val", per_class=3)
    return root, list_samples(root)


@pytest.fixture
def built(dataset, tmp_path):
    root, samples = dataset
    return root, samples, build_cache(samples, root, SMALL, tmp_path / "caches", desc=None)


@pytest.mark.parametrize("flat", [False, True])
def test_cache_batches_equal_iter_batches(tmp_path, monkeypatch, flat):
    monkeypatch.setattr(crop_cache, "CHUNK", 4)  # 9 images: several windows, a partial last one
    root = write_tiny_imagenet(tmp_path / "val", per_class=3, flat=flat)
    samples = list_samples(root)
    path = build_cache(samples, root, SMALL, tmp_path / "caches")
    assert path == tmp_path / "caches" / cache_key(samples, root, SMALL)
    assert os.listdir(tmp_path / "caches") == [path.name]  # no temporary directories left over
    cache = open_cache(samples, root, SMALL, tmp_path / "caches")
    assert len(cache) == 9 and cache.path == path
    for batch_size in (1, 4, 100):
        assert_same_batches(cache, samples, SMALL, batch_size)
    assert cache.crops(0, 9).shape == (9, 3, 32, 32)


def test_manifest(built):
    root, samples, path = built
    manifest = read_json(path / "manifest.json")
    assert manifest["key"] == path.name and manifest["format"] == crop_cache.FORMAT
    assert manifest["preprocess"] == {"resize": 40, "crop": 32, "interpolation": "bilinear", "backend": "pillow",
                                      "resize_rounding": "floor", "crop_rounding": "round"}
    assert manifest["count"] == 9 and manifest["shape"] == [9, 3, 32, 32] and manifest["dtype"] == "uint8"
    assert manifest["root"] == str(root.resolve())
    for name in ("crops.npy", "labels.npy"):
        assert manifest["files"][name] == {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
    crops = np.load(path / "crops.npy", mmap_mode="r")
    assert crops.dtype == np.uint8 and crops.shape == (9, 3, 32, 32)
    assert np.load(path / "labels.npy").tolist() == [s.label for s in samples]


def test_key_depends_on_images_and_crop_not_on_normalization(built):
    root, samples, path = built
    caches = path.parent
    assert open_cache(samples[:-1], root, SMALL, caches) is None
    assert open_cache(samples[::-1], root, SMALL, caches) is None
    assert open_cache(samples, root, Preprocess(resize=40, crop=30), caches) is None
    assert open_cache(samples, root, Preprocess(resize=48, crop=32), caches) is None
    for other in ({"interpolation": "bicubic"}, {"backend": "opencv"}, {"resize_rounding": "half_up"},
                  {"crop_rounding": "floor"}):  # a cache built for other resizing is never served
        assert open_cache(samples, root, Preprocess(resize=40, crop=32, **other), caches) is None, other
    other_norm = Preprocess(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), color="bgr", scale=1)
    cache = open_cache(samples, root, other_norm, caches)
    assert cache.path == path  # crops do not depend on mean/std or channel order: the same cache serves both
    assert_same_batches(cache, samples, other_norm, 4)


def test_key_is_relative_to_root(tmp_path):
    a = write_tiny_imagenet(tmp_path / "a", per_class=1)
    b = write_tiny_imagenet(tmp_path / "b", per_class=1)
    assert cache_key(list_samples(a), a, SMALL) == cache_key(list_samples(b), b, SMALL)
    with pytest.raises(DataError, match="outside the dataset root"):  # a cache holds images of its root only
        cache_key(list_samples(a), b, SMALL)


def test_reopening_reuses(built, capsys):
    root, samples, path = built
    mtime = (path / "crops.npy").stat().st_mtime_ns
    assert open_cache(samples, root, SMALL, path.parent).path == path
    run_cli("--root", root, "--out", path.parent, "--resize", 40, "--crop", 32)
    assert "already exists and is valid (9 images" in capsys.readouterr().out
    assert (path / "crops.npy").stat().st_mtime_ns == mtime


def stale(built, verify=True):
    root, samples, path = built
    with pytest.raises(StaleCacheError, match=f"crop cache at {path} is stale or corrupt") as info:
        open_cache(samples, root, SMALL, path.parent, verify=verify)
    assert "python -m data_prep cache" in str(info.value) and "\n" not in str(info.value)
    assert "--resize 40 --crop 32" in str(info.value)  # the options that rebuild it
    return info.value.reason


def test_tampered_manifest(built):
    manifest_path = built[2] / "manifest.json"
    manifest = read_json(manifest_path)
    manifest_path.write_text(json.dumps({**manifest, "count": 8}))
    assert stale(built) == "manifest count is 8, expected 9"
    manifest_path.write_text(json.dumps({**manifest, "preprocess": {"resize": 40, "crop": 30}}))
    assert "manifest preprocess is" in stale(built)
    manifest_path.write_text("{not json")
    assert "manifest.json is unreadable" in stale(built)
    manifest_path.unlink()
    assert "no manifest.json" in stale(built)


def test_replaced_images_make_the_cache_stale(built):
    """Other image files under the same names (another copy of the dataset) must not be served the old crops."""
    root, samples, path = built
    image = samples[4].path
    data = image.read_bytes()
    image.write_bytes(data + b"\0" * 16)  # still a valid JPEG, different file
    assert stale(built, verify=False) == "the image files are not the ones it was built from (their contents differ)"
    image.write_bytes(data)
    assert open_cache(samples, root, SMALL, path.parent).path == path


def test_truncated_crops(built):
    crops = built[2] / "crops.npy"
    crops.write_bytes(crops.read_bytes()[:-100])
    assert "crops.npy has" in stale(built, verify=False)


def test_flipped_byte_found_only_when_verifying(built):
    root, samples, path = built
    data = bytearray((path / "crops.npy").read_bytes())
    data[-5000] ^= 0xFF
    (path / "crops.npy").write_bytes(bytes(data))
    assert open_cache(samples, root, SMALL, path.parent, verify=False) is not None
    assert stale(built) == "crops.npy content differs from its sha256 in the manifest"


def test_corrupt_labels(built):
    root, samples, path = built
    np.save(path / "labels.npy", np.array([s.label + 1 for s in samples], dtype=np.int64))
    assert "labels.npy does not hold the labels" in stale(built, verify=False)


def test_failed_build_leaves_nothing(dataset, tmp_path):
    root, samples = dataset
    bad = samples[5].path
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match=bad.name):
        build_cache(samples, root, SMALL, tmp_path / "caches")
    assert os.listdir(tmp_path / "caches") == []
    assert open_cache(samples, root, SMALL, tmp_path / "caches") is None


def test_interrupted_build_leaves_nothing_and_rebuild_replaces_stale(built, monkeypatch):
    root, samples, path = built
    (path / "manifest.json").unlink()  # a stale directory under the final name
    real_crop, calls = crop_cache._crop, []

    def interrupted(sample, p):
        calls.append(sample)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_crop(sample, p)

    monkeypatch.setattr(crop_cache, "_crop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, root, SMALL, path.parent)
    assert os.listdir(path.parent) == [path.name] and not (path / "manifest.json").exists()
    monkeypatch.setattr(crop_cache, "_crop", real_crop)
    assert build_cache(samples, root, SMALL, path.parent) == path
    assert os.listdir(path.parent) == [path.name]
    assert len(open_cache(samples, root, SMALL, path.parent)) == 9


def test_writes_through_small_windows(dataset, tmp_path, monkeypatch):
    """Memory stays flat: crops go to the file through bounded memory-mapped windows, never all at once."""
    root, samples = dataset
    monkeypatch.setattr(crop_cache, "CHUNK", 2)
    real_window, windows = crop_cache._window, []

    def window(path, offset, start, count, crop, mode):
        windows.append((start, count, mode))
        mapped = real_window(path, offset, start, count, crop, mode)
        assert isinstance(mapped, np.memmap)
        return mapped

    monkeypatch.setattr(crop_cache, "_window", window)
    path = build_cache(samples, root, SMALL, tmp_path / "caches")
    assert windows == [(start, min(2, 9 - start), "r+") for start in range(0, 9, 2)]
    cache = open_cache(samples, root, SMALL, tmp_path / "caches")
    assert_same_batches(cache, samples, SMALL, 3)
    assert max(count for _, count, _ in windows) <= 3
    assert path.is_dir()


@pytest.mark.parametrize("flat", [False, True])
def test_list_subset(tmp_path, capsys, flat):
    root = write_tiny_imagenet(tmp_path / "val", per_class=3, flat=flat)
    listed = ["ILSVRC2012_val_00000008.JPEG 999", "ILSVRC2012_val_00000002.JPEG 3",
              f"ILSVRC2012_val_00000005.JPEG {SYNSETS[250]}"]  # a class may be given by synset id
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    samples = samples_from_list(root, tmp_path / "list.txt")
    assert [(s.path.name, s.label) for s in samples] == [
        ("ILSVRC2012_val_00000008.JPEG", 999), ("ILSVRC2012_val_00000002.JPEG", 3),
        ("ILSVRC2012_val_00000005.JPEG", 250)]
    run_cli("--root", root, "--list", tmp_path / "list.txt", "--out", tmp_path / "caches",
            "--resize", 40, "--crop", 32, "--workers", 2)
    out = capsys.readouterr().out
    assert "3 images" in out and "images/s" in out
    cache = open_cache(samples, root, SMALL, tmp_path / "caches")
    assert cache.labels.tolist() == [999, 3, 250]
    assert_same_batches(cache, samples, SMALL, 2)


def test_list_errors(dataset, tmp_path):
    root, samples = dataset
    lst = tmp_path / "list.txt"
    lst.write_text("ILSVRC2012_val_00000001.JPEG 3\nnope_1.JPEG 3\nnope_2.JPEG 5\n")
    with pytest.raises(DataError, match=r"2 of 3 listed images are not in the dataset \(nope_1.JPEG, nope_2.JPEG\)"):
        samples_from_list(root, lst)
    lst.write_text("ILSVRC2012_val_00000001.JPEG 4\n")
    with pytest.raises(DataError, match="labels of 1 listed images disagree.*00000001.JPEG: list 4, dataset 3"):
        run_cli("--root", root, "--list", lst, "--out", tmp_path / "caches")
    assert read_image_list(lst) == [("ILSVRC2012_val_00000001.JPEG", 4)]
    with pytest.raises(DataError, match="match several dataset images"):
        match_image_list(samples + samples[:1], [(samples[0].path.name, samples[0].label)])


def test_verify_command(built, capsys):
    root, samples, path = built
    args = ("--root", root, "--out", path.parent, "--resize", 40, "--crop", 32, "--verify")
    run_cli(*args)
    assert f"cache {path}: OK (9 images" in capsys.readouterr().out
    with pytest.raises(DataError, match="no cache of these 9 images"):
        run_cli("--root", root, "--out", path.parent, "--verify")  # default 256/224: another key
    data = bytearray((path / "crops.npy").read_bytes())
    data[-1] ^= 1
    (path / "crops.npy").write_bytes(bytes(data))
    with pytest.raises(StaleCacheError, match="sha256"):
        run_cli(*args)
    run_cli(*args[:-1])  # without --verify: rebuilds the corrupt cache
    assert "rebuilding" in capsys.readouterr().out
    run_cli(*args)


def test_limit_selects_a_balanced_subset(dataset, tmp_path, capsys):
    root, samples = dataset
    run_cli("--root", root, "--out", tmp_path / "caches", "--limit", 4, "--seed", 1, "--resize", 40, "--crop", 32)
    assert "4 images" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "caches")) == 1


def test_model_option_crops_as_the_entry_is_fed(dataset, tmp_path, capsys):
    root, samples = dataset
    run_cli("--root", root, "--out", tmp_path / "caches", "--model", "megvii_shufflenet_v2_x1_0", "--resize", 40,
            "--crop", 32)
    megvii = Preprocess(resize=40, crop=32, backend="opencv", resize_rounding="half_up", color="bgr", scale=1,
                        mean=(0, 0, 0), std=(1, 1, 1))
    cache = open_cache(samples, root, megvii, tmp_path / "caches")
    assert cache is not None and cache.manifest["preprocess"]["backend"] == "opencv"
    assert open_cache(samples, root, SMALL, tmp_path / "caches") is None
    assert_same_batches(cache, samples, megvii, 4)
    with pytest.raises(ConfigError, match="unknown model nope"):
        run_cli("--root", root, "--out", tmp_path / "caches", "--model", "nope")
    with pytest.raises(ConfigError, match="unknown value 'cubic'"):
        run_cli("--root", root, "--out", tmp_path / "caches", "--interpolation", "cubic")


@needs_shared_imagenet()
@pytest.mark.parametrize("entry", ["efficientnet_lite0", "ppcls_shufflenet_v2_x1_0"])
def test_real_photos_per_model(tmp_path, entry):
    """`data_prep cache --model ENTRY` builds what the pipeline reads for that entry, and only for it."""
    root = SHARED_IMAGENET / "sample"
    samples = list_samples(root)
    p = Preprocess.from_config(model_entry(entry).preprocess)
    run_cli("--root", root, "--out", tmp_path / "caches", "--model", entry)
    cache = open_cache(samples, root, p, tmp_path / "caches")
    assert len(cache) == 200 and open_cache(samples, root, Preprocess(), tmp_path / "caches") is None
    assert_same_batches(cache, samples, p, 64)


@needs_shared_imagenet()
def test_real_photos(tmp_path):
    root = SHARED_IMAGENET / "sample"
    samples = list_samples(root)
    p = Preprocess()
    build_cache(samples, root, p, tmp_path / "caches")
    cache = open_cache(samples, root, p, tmp_path / "caches")
    assert len(cache) == 200
    assert_same_batches(cache, samples, p, 64)
