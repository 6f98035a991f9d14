"""The public API: quantize.quantize_model from an iterable of images or arrays, with the CLI's defaults."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import quantize
from quantize.core.runtime import input_name, make_session

from conftest import compose_config, write_tiny_imagenet


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, stride=4, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(16, 1000)

    def forward(self, x):
        return self.fc(self.features(x))


def images_in(root):
    return sorted(root.rglob("*.JPEG"))


def logits(path, batch):
    session = make_session(path, threads=1)
    return session.run(None, {input_name(session): batch})[0]


def test_torch_module_from_arrays_gives_a_valid_int8_model(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 224, 224)).astype(np.float32) for _ in range(5)]
    result = quantize.quantize_model(TinyClassifier(), arrays, tmp_path / "tiny.int8.onnx")
    assert result.int8_path == tmp_path / "tiny.int8.onnx" and result.num_images == 5 and result.opset == 13
    model = onnx.load(str(result.int8_path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    batch = np.stack(arrays)
    fp32, int8 = logits(result.fp32_path, batch), logits(result.int8_path, batch)
    assert fp32.shape == int8.shape == (5, 1000)
    assert np.abs(int8 - fp32).max() < 0.1 * np.abs(fp32).max()  # quantized, not broken


def test_onnx_file_from_images_matches_the_cli(tmp_path):
    """Same fp32 file, same images, the plain recipe on both sides: the API's int8 model is the CLI pipeline's, value for value."""
    data = write_tiny_imagenet(tmp_path / "val", classes=(3, 250, 999), per_class=2)
    first = quantize.quantize_model(TinyClassifier(), [Image.open(p) for p in images_in(data)],
                                    tmp_path / "api" / "m.int8.onnx")
    fp32_file = first.fp32_path
    api = quantize.quantize_model(fp32_file, images_in(data), tmp_path / "api2" / "m.int8.onnx",
                                  calib=quantize.CalibConfig(method="percentile"), quant=quantize.QuantConfig())

    # QuantConfig()/CalibConfig() are the plain recipe, which the CLI runs as quant=u8s8_plain calib=percentile
    cfg = compose_config(["+model=onnx", f"model.path={fp32_file}", f"data.root={data}", "calib.list=null",
                          "quant=u8s8_plain", "calib=percentile", "calib.num_images=6", f"work_dir={tmp_path / 'work'}", "stages=[export,calibrate,quantize]"])
    quantize.run_pipeline(cfg, tmp_path / "run")
    cli_int8 = next((tmp_path / "work").rglob("model.int8.onnx"))

    def values(path):
        return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    ours, theirs = values(api.int8_path), values(cli_int8)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_default_recipe_through_the_api_matches_the_cli(tmp_path):
    """No quant/calib given to either: the API runs the CLI's default recipe and writes the same int8 model."""
    data = write_tiny_imagenet(tmp_path / "val", classes=(3, 250, 999), per_class=2)
    first = quantize.quantize_model(TinyClassifier(), [Image.open(p) for p in images_in(data)],
                                    tmp_path / "api" / "m.int8.onnx")
    api = quantize.quantize_model(first.fp32_path, images_in(data), tmp_path / "api2" / "m.int8.onnx")
    assert api.details["refine"]["weight_scales"]["layers"] > 0 and "balance" in api.details
    cfg = compose_config(["+model=onnx", f"model.path={first.fp32_path}", f"data.root={data}", "calib.list=null",
                          "calib.num_images=6", f"work_dir={tmp_path / 'work'}", "stages=[export,calibrate,quantize,refine]"])
    quantize.run_pipeline(cfg, tmp_path / "run")
    cli_int8 = next((tmp_path / "work").rglob("refine-*/model.int8.onnx"))

    def values(path):
        return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    ours, theirs = values(api.int8_path), values(cli_int8)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=0, err_msg=name)


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(quantize.QuantizeError, match="calibration_data is empty"):
        quantize.quantize_model(TinyClassifier(), [], tmp_path / "x.onnx")
    with pytest.raises(quantize.QuantizeError, match=r"CHW images or NCHW batches, got shape \[224, 224\]"):
        quantize.quantize_model(TinyClassifier(), [np.zeros((224, 224), np.float32)], tmp_path / "x.onnx")
    with pytest.raises(quantize.QuantizeError, match="calib.method='histogram' is not one of"):
        quantize.quantize_model(TinyClassifier(), [np.zeros((3, 224, 224), np.float32)], tmp_path / "x.onnx",
                                calib=quantize.CalibConfig(method="histogram"))
    assert json.dumps(quantize.CalibConfig().method) == '"percentile"'  # config choices serialise as their value
