import json

import numpy as np
import pytest
from PIL import Image, ImageFile

import reference_transforms as ref
from conftest import SHARED_IMAGENET, needs_shared_imagenet
from quantize.config import model_entry
from quantize.core.errors import ConfigError, DataError
from quantize.data.preprocess import (Backend, ColorOrder, Interpolation, Preprocess, Rounding, crop_uint8, load_rgb,
                                      normalize, normalize_batch, preprocess, resized_size)

SAMPLE = SHARED_IMAGENET / "sample"


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def entry_preprocess(name, *overrides):
    return Preprocess.from_config(model_entry(name, list(overrides)).preprocess)


@pytest.fixture(scope="module")
def one_torch_thread():
    torch = pytest.importorskip("torch")
    # Tiny per-image ops: intra-op threads only add spin-wait overhead (10x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photos():
    files = sorted(SAMPLE.glob("*/*.JPEG"))
    assert len(files) == 200
    return files


# --- each source's own transform, pixel for pixel on the real photos -------------------------------------------

@needs_shared_imagenet()
@pytest.mark.parametrize("entry, weights", [("shufflenet_v2_x1_0", "shufflenet_v2_x1_0"),
                                            ("shufflenet_v2_x2_0", "shufflenet_v2_x2_0")])
def test_torchvision_entries_match_their_weights_transforms_on_real_photos(one_torch_thread, entry, weights):
    import torchvision

    transform = torchvision.models.get_model_weights(weights).DEFAULT.transforms()
    p = entry_preprocess(entry)
    assert (p.resize, p.crop) == (transform.resize_size[0], transform.crop_size[0])  # 256 for x1.0, 232 for x2.0
    for f in photos():
        img = load_rgb(f)
        ours, theirs = preprocess(img, p), transform(img).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, 224, 224)
        assert np.abs(ours - theirs).max() <= 1e-6, f


@needs_shared_imagenet()
@pytest.mark.parametrize("entry, reference", [("mmcls_shufflenet_v2_x1_0", ref.mmcls),
                                              ("ppcls_shufflenet_v2_x1_0", ref.ppcls),
                                              ("megvii_shufflenet_v2_x1_0", ref.megvii)])
def test_opencv_sources_match_their_own_pipelines_on_real_photos(one_torch_thread, entry, reference):
    """mmcls and PaddleClas decode with cv2.imdecode (BGR), Megvii with PIL; PaddleClas and Megvii resize with
    cv2.resize: the uint8 crops must be identical, the network inputs equal up to float32 rounding."""
    p = entry_preprocess(entry)
    for f in photos():
        want_crop, want = reference(f)
        crop = crop_uint8(load_rgb(f), p)
        np.testing.assert_array_equal(crop, want_crop, err_msg=str(f))
        got = normalize(crop, p)
        assert got.dtype == np.float32 and got.shape == want.shape == (3, 224, 224)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), f


@needs_shared_imagenet()
def test_opencv_resize_is_not_pillows():
    """The reason the OpenCV sources need their own backend: the same geometry gives other pixels."""
    f = photos()[0]
    opencv = crop_uint8(load_rgb(f), entry_preprocess("ppcls_shufflenet_v2_x1_0"))
    pillow = crop_uint8(load_rgb(f), entry_preprocess("ppcls_shufflenet_v2_x1_0", "model.preprocess.backend=pillow"))
    assert (opencv != pillow).mean() > 0.1


@needs_shared_imagenet()
def test_bicubic_torchvision_weights_match_on_real_photos(one_torch_thread):
    """+model=torchvision takes its weights' transforms(): efficientnet_b0's are bicubic."""
    import torchvision

    transform = torchvision.models.EfficientNet_B0_Weights.DEFAULT.transforms()
    p = entry_preprocess("torchvision", "model.name=efficientnet_b0")
    assert p.interpolation is Interpolation.bicubic
    for f in photos()[:20]:
        img = load_rgb(f)
        assert np.abs(preprocess(img, p) - transform(img).numpy()).max() <= 1e-6, f


# --- the same on synthetic sizes, where the rounding rules differ ------------------------------------------------

@pytest.mark.parametrize("size", [(40, 30), (30, 40), (300, 200), (341, 256), (256, 343), (1001, 257), (224, 224),
                                  (513, 512), (512, 515), (259, 700)])
@pytest.mark.parametrize("entry, reference", [("mmcls_shufflenet_v2_x1_0", ref.mmcls),
                                              ("ppcls_shufflenet_v2_x1_0", ref.ppcls),
                                              ("megvii_shufflenet_v2_x1_0", ref.megvii)])
def test_sources_match_on_odd_sizes(tmp_path, one_torch_thread, entry, reference, size):
    path = tmp_path / "image.png"  # lossless: every decoder reads the same pixels
    random_image(*size).save(path)
    p = entry_preprocess(entry)
    want_crop, want = reference(path)
    crop = crop_uint8(load_rgb(path), p)
    np.testing.assert_array_equal(crop, want_crop)
    assert np.abs(normalize(crop, p) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (300, 200), (341, 256), (256, 343), (1001, 257), (224, 224)])
def test_default_matches_torchvision_on_odd_sizes(one_torch_thread, size):
    transform = pytest.importorskip("torchvision").models.ShuffleNet_V2_X1_0_Weights.DEFAULT.transforms()
    img = random_image(*size)
    assert np.abs(preprocess(img) - transform(img).numpy()).max() <= 1e-6


@pytest.mark.parametrize("rounding, landscape, portrait", [
    ("floor", (256, 256), (256, 257)),      # 256 * 513 / 512 = 256.5 -> 256; 256 * 515 / 512 = 257.5 -> 257
    ("round", (256, 256), (256, 258)),      # halves to even
    ("half_up", (257, 256), (256, 258)),
])
def test_longer_side_rounding(rounding, landscape, portrait):
    p = Preprocess(resize_rounding=rounding)
    assert resized_size(513, 512, p) == landscape
    assert resized_size(512, 515, p) == portrait
    assert resized_size(500, 375, p) == (341, 256) and resized_size(375, 500, p) == (256, 341)


@pytest.mark.parametrize("rounding, offsets", [("round", (16, 18)), ("floor", (16, 17)), ("half_up", (17, 18))])
def test_crop_offset_rounding(rounding, offsets):
    # resize 257 and 259 keep 257x257 and 259x259 images as they are; (257 - 224) / 2 = 16.5, (259 - 224) / 2 = 17.5
    for side, offset in zip((257, 259), offsets):
        img = random_image(side, side)
        p = Preprocess(resize=side, crop_rounding=rounding)
        np.testing.assert_array_equal(crop_uint8(img, p), np.asarray(img)[offset:offset + 224, offset:offset + 224])


def test_center_crop_offset_rounds_half_to_even_by_default():
    # 341 - 224 = 117 -> offset round(58.5) = 58 (Python/torchvision rounding), not 59.
    img = random_image(341, 256)
    expected = np.asarray(img)[16:240, 58:282]
    np.testing.assert_array_equal(crop_uint8(img), expected)


@pytest.mark.parametrize("backend", ["pillow", "opencv"])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_every_interpolation_runs_and_differs(backend, interpolation):
    img = random_image(300, 200)
    p = Preprocess(resize=120, crop=100, backend=backend, interpolation=interpolation)
    crop = crop_uint8(img, p)
    assert crop.shape == (100, 100, 3) and crop.dtype == np.uint8
    if interpolation != "bilinear":
        assert not np.array_equal(crop, crop_uint8(img, Preprocess(resize=120, crop=100, backend=backend)))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (100, 700), (224, 224)])
def test_portrait_and_landscape_give_square_crops(size):
    crop = crop_uint8(random_image(*size))
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


# --- normalization and channel order -----------------------------------------------------------------------------

def test_normalize_matches_formula():
    p = Preprocess()
    crops = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    batch = normalize_batch(crops, p)
    assert batch.dtype == np.float32 and batch.shape == (2, 3, 224, 224) and batch.flags.c_contiguous
    expected = (crops.transpose(0, 3, 1, 2) / 255.0 - np.array(p.mean)[:, None, None]) / np.array(p.std)[:, None, None]
    assert np.abs(batch - expected).max() < 1e-5
    np.testing.assert_array_equal(normalize(crops[1], p), batch[1])


def test_bgr_scale_and_mean_in_network_order():
    crops = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    raw = normalize_batch(crops, Preprocess(resize=8, crop=8, color="bgr", scale=1, mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_array_equal(raw, crops[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32))
    p = Preprocess(resize=8, crop=8, color="bgr", scale=2.0, mean=(10, 20, 30), std=(1, 2, 4))
    want = (crops[..., ::-1].transpose(0, 3, 1, 2) * 2.0 - np.array([10, 20, 30])[:, None, None]) \
        / np.array([1, 2, 4])[:, None, None]
    assert np.abs(normalize_batch(crops, p) - want).max() < 1e-4


def test_lite0_is_fed_minus_one_to_one():
    p = entry_preprocess("efficientnet_lite0")
    x = normalize(np.array([[[0, 127, 255]]], dtype=np.uint8), p)
    np.testing.assert_allclose(x[:, 0, 0], [-127 / 128, 0.0, 1.0])
    assert p.interpolation is Interpolation.bicubic and p.color is ColorOrder.rgb


def test_megvii_is_fed_bgr_0_255():
    p = entry_preprocess("megvii_shufflenet_v2_x2_0")
    assert (p.backend, p.color, p.resize_rounding) == (Backend.opencv, ColorOrder.bgr, Rounding.half_up)
    x = normalize(np.array([[[10, 20, 30]]], dtype=np.uint8), p)
    np.testing.assert_array_equal(x[:, 0, 0], [30, 20, 10])


# --- config: defaults per entry, overrides, validation -------------------------------------------------------------

def test_torchvision_zoo_entries_carry_their_weights_transforms():
    import torchvision

    for entry in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"):
        t = torchvision.models.get_model_weights(entry).DEFAULT.transforms()
        p = entry_preprocess(entry)
        assert (p.resize, p.crop, p.interpolation.value, list(p.mean), list(p.std)) == \
            (t.resize_size[0], t.crop_size[0], t.interpolation.value, t.mean, t.std), entry
        assert (p.backend, p.color) == (Backend.pillow, ColorOrder.rgb)


def test_bring_your_own_defaults_and_overrides():
    assert entry_preprocess("onnx", "model.path=x.onnx") == Preprocess()
    assert entry_preprocess("torchvision", "model.name=mobilenet_v3_large").resize == 232
    p = entry_preprocess("torchvision", "model.name=mobilenet_v3_large", "model.preprocess.resize=300",
                         "model.preprocess.backend=opencv")
    assert (p.resize, p.backend) == (300, Backend.opencv)
    # a whole source's block for any entry, and any key on top
    p = entry_preprocess("onnx", "model.path=x.onnx", "model/preprocess=megvii", "model.preprocess.crop=200")
    assert (p.color, p.crop) == (ColorOrder.bgr, 200)


@pytest.mark.parametrize("settings, words", [
    ({"interpolation": "linear"}, "unknown value 'linear'"),
    ({"backend": "tensorflow"}, "choose one of pillow, opencv"),
    ({"color": "yuv"}, "unknown value 'yuv'"),
    ({"resize_rounding": "ceil"}, "unknown value 'ceil'"),
    ({"mean": [0.5, 0.5]}, "needs 3 values"),
    ({"std": [1, 1, 1, 1]}, "needs 3 values"),
    ({"std": [1, 0, 1]}, "must be > 0"),
    ({"mean": "0.5"}, "needs 3 numbers"),
    ({"resize": 0}, "positive"),
    ({"crop": -224}, "positive"),
    ({"resize": 200}, "larger than model.preprocess.resize"),
    ({"resize": 256.5}, "whole number"),
    ({"scale": 0}, "must be > 0"),
    ({"backend": "opencv", "interpolation": "hamming"}, "not available with backend=opencv"),
    ({"interpolation": "area"}, "not available with backend=pillow"),
    ({"size": 256}, "unknown key(s) size"),
])
def test_bad_settings_are_one_line_config_errors(settings, words):
    with pytest.raises(ConfigError) as info:
        Preprocess.from_config(settings)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_keys_and_description():
    p = entry_preprocess("ppcls_shufflenet_v2_x1_0")
    assert Preprocess.from_config(p.key()) == p and hash(p) == hash(Preprocess.from_config(p.key()))
    # the crop depends on geometry only; normalization and channel order are applied when batches are read
    assert Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, color="bgr", scale=1).crop_key() == Preprocess().crop_key()
    for change in ({"resize": 300}, {"crop": 200}, {"interpolation": "bicubic"}, {"backend": "opencv"},
                   {"resize_rounding": "round"}, {"crop_rounding": "floor"}):
        assert Preprocess(**change).crop_key() != Preprocess().crop_key(), change
    block = json.loads(json.dumps(p.describe()))  # plain JSON, for a deployer without this project
    assert Preprocess.from_config(block["settings"]) == p
    assert block["input"] == {"layout": "NCHW", "dtype": "float32", "channels": "RGB", "height": 224, "width": 224}
    assert block["resize"]["backend"] == "opencv" and "round_half_even" in block["resize"]["longer_side"]
    assert block["center_crop"]["offset"] == "floor((side - 224) / 2)"
    assert "cv2.resize(INTER_LINEAR" in " ".join(block["steps"])


# --- decoding ----------------------------------------------------------------------------------------------------

@needs_shared_imagenet()
def test_pillow_decodes_the_photos_as_opencv_does():
    """Why one decoder serves the OpenCV sources: Pillow and cv2.imdecode give the same pixels (grayscale included)."""
    for f in photos():
        np.testing.assert_array_equal(np.asarray(load_rgb(f)), ref.cv2_decode(f)[..., ::-1], err_msg=str(f))


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


def test_preprocess_config_small_sizes():
    p = Preprocess(resize=160, crop=128, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert p.mean == (0.5, 0.5, 0.5) and p == Preprocess(resize=160, crop=128, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert preprocess(random_image(90, 60), p).shape == (3, 128, 128)
