from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from quantize.core.errors import ConfigError, DataError
from quantize.data.preprocess import Preprocess, crop_uint8, load_rgb, normalize, normalize_batch, preprocess

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet" / "sample"


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def torchvision_transform():
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    # Tiny per-image ops: intra-op threads only add spin-wait overhead (10x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = Preprocess()
    yield transforms.Compose(
        [
            transforms.Resize(p.resize),
            transforms.CenterCrop(p.crop),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )
    torch.set_num_threads(threads)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} not present")
def test_matches_torchvision_on_real_photos(torchvision_transform):
    files = sorted(SAMPLE.glob("*/*.JPEG"))
    assert len(files) == 200
    for f in files:
        img = load_rgb(f)
        ours = preprocess(img)
        theirs = torchvision_transform(img).numpy()
        assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
        assert np.abs(ours - theirs).max() <= 1e-6, f


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (300, 200), (341, 256), (256, 343), (1001, 257), (224, 224)])
def test_matches_torchvision_on_odd_sizes(torchvision_transform, size):
    img = random_image(*size)
    assert np.abs(preprocess(img) - torchvision_transform(img).numpy()).max() <= 1e-6


def test_center_crop_offset_rounds_half_to_even():
    # 341 - 224 = 117 -> offset round(58.5) = 58 (Python/torchvision rounding), not 59.
    img = random_image(341, 256)
    expected = np.asarray(img)[16:240, 58:282]
    np.testing.assert_array_equal(crop_uint8(img), expected)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (100, 700), (224, 224)])
def test_portrait_and_landscape_give_square_crops(size):
    crop = crop_uint8(random_image(*size))
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


def test_grayscale_and_cmyk_jpegs_become_rgb(tmp_path):
    gray = tmp_path / "gray.JPEG"
    random_image(50, 40).convert("L").save(gray)
    cmyk = tmp_path / "cmyk.JPEG"
    random_image(50, 40).convert("CMYK").save(cmyk)
    assert Image.open(cmyk).mode == "CMYK"
    for f in (gray, cmyk):
        img = load_rgb(f)
        assert img.mode == "RGB" and img.size == (50, 40)
        assert preprocess(img).shape == (3, 224, 224)
    g = np.asarray(load_rgb(gray))
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_other_modes_become_rgb(tmp_path):
    random_image(20, 10).convert("RGBA").save(tmp_path / "rgba.png")
    random_image(20, 10).convert("P").save(tmp_path / "p.png")
    deep = np.full((10, 20), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    for name in ("rgba.png", "p.png", "deep.png"):
        assert load_rgb(tmp_path / name).mode == "RGB"
    # 16-bit values are scaled to 8 bits, not clipped at 255
    assert np.asarray(load_rgb(tmp_path / "deep.png")).max() == 40000 >> 8


def test_png_named_jpeg_decodes(tmp_path):
    f = tmp_path / "really_a_png.JPEG"
    random_image(30, 20).save(f, format="PNG")
    assert np.array_equal(np.asarray(load_rgb(f)), np.asarray(random_image(30, 20)))


def test_truncated_jpeg_raises_data_error_naming_file(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    f = tmp_path / "cut.JPEG"
    random_image(300, 200).save(f, quality=90)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        load_rgb(f)
    assert str(f) in str(info.value) and "\n" not in str(info.value)


def test_not_an_image_and_missing_file_raise_data_error(tmp_path):
    text = tmp_path / "notes.JPEG"
    text.write_text("not an image")
    with pytest.raises(DataError, match="notes.JPEG"):
        load_rgb(text)
    with pytest.raises(DataError, match="nope.JPEG"):
        load_rgb(tmp_path / "nope.JPEG")


def test_normalize_matches_formula():
    p = Preprocess()
    crops = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    batch = normalize_batch(crops, p)
    assert batch.dtype == np.float32 and batch.shape == (2, 3, 224, 224) and batch.flags.c_contiguous
    expected = (crops.transpose(0, 3, 1, 2) / 255.0 - np.array(p.mean)[:, None, None]) / np.array(p.std)[:, None, None]
    assert np.abs(batch - expected).max() < 1e-5
    np.testing.assert_array_equal(normalize(crops[1], p), batch[1])


def test_preprocess_config():
    p = Preprocess(resize=160, crop=128, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert p.mean == (0.5, 0.5, 0.5) and hash(p) == hash(Preprocess(160, 128, (0.5,) * 3, (0.5,) * 3))
    assert p.key() == {"resize": 160, "crop": 128, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert preprocess(random_image(90, 60), p).shape == (3, 128, 128)
    with pytest.raises(ConfigError):
        Preprocess(resize=200, crop=224)
    with pytest.raises(ConfigError):
        Preprocess(mean=(0.5, 0.5))
