"""make bench-stability: the fp32 model's own top-1 under invisible input changes, on bench-accuracy's views."""

import json

import numpy as np
import pytest

from quantize.bench.stability import main, perturbations, shifted_right, with_pixel_noise

from conftest import write_tiny_imagenet


def test_pixel_noise_moves_values_by_levels_of_its_size_and_stays_8_bit():
    crops = np.full((4, 32, 32, 3), 128, np.uint8)
    crops[0] = 0
    crops[1] = 255
    moved = with_pixel_noise(crops, 0.5, np.random.default_rng(0)).astype(int) - crops
    assert with_pixel_noise(crops, 0.5, np.random.default_rng(0)).dtype == np.uint8
    middle = moved[2:]
    # P(|N(0, 0.5)| > 0.5) = P(|z| > 1) = 0.317; two levels need |z| > 3
    assert abs(np.mean(middle != 0) - 0.317) < 0.02 and np.abs(middle).max() <= 2 and abs(middle.mean()) < 0.02
    assert moved[0].min() == 0 and moved[1].max() == 0  # clipped at the ends of the 8-bit range
    assert np.mean(with_pixel_noise(crops, 0.25, np.random.default_rng(0))[2:] != 128) < 0.05


def test_shift_moves_the_content_one_pixel_right():
    crops = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    moved = shifted_right(crops)
    assert np.array_equal(moved[:, :, 1:], crops[:, :, :-1]) and np.array_equal(moved[:, :, 0], crops[:, :, 0])


def test_perturbations_are_seeded():
    crops = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    first, second = perturbations(), perturbations()
    assert list(first) == ["pixel noise 0.25", "pixel noise 0.5", "pixel noise 1", "shift 1 pixel"]
    for name in first:
        assert np.array_equal(first[name](crops), second[name](crops)), name
    assert not np.array_equal(first["pixel noise 0.5"](crops), first["pixel noise 0.5"](crops))  # fresh draws


def test_end_to_end_on_a_tiny_folder(tmp_path):
    data = write_tiny_imagenet(tmp_path / "val", classes=(3, 250), per_class=2)
    out = tmp_path / "stability.json"
    assert main(["--model", "shufflenet_v2_x0_5", "--root", str(data), "--views", "3", "--threads", "1",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "model.pretrained=false",
                 "export.check_images=2"]) == 0
    result = json.loads(out.read_text())
    assert result["photos"] == 4 and result["views_per_photo"] == 3 and result["load_average"]
    assert set(result["perturbations"]) == {"pixel noise 0.25", "pixel noise 0.5", "pixel noise 1", "shift 1 pixel"}
    for m in result["perturbations"].values():
        assert 0 <= m["agreement"] <= 100 and m["agreement_se"] is not None
        assert m["agreement"] * 12 / 100 == pytest.approx(round(m["agreement"] * 12 / 100))  # 4 photos x 3 views
    assert "| pixel noise 0.5 |" in out.with_suffix(".md").read_text()


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["--model", "shufflenet_v2_x0_5", "--root", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
