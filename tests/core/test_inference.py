"""Inference runtimes behind one interface (quantize.core.inference): ONNX Runtime always, OpenVINO when installed."""

import sys

import numpy as np
import pytest

from quantize.core import inference
from quantize.core.errors import ConfigError
from quantize.core.inference import available, get_runtime
from quantize.core.runtime import make_session
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.evaluate import evaluate
from quantize.stages.export import export_onnx
from quantize.stages.speed import time_blocks
from quantize.stages.static_quant import quantize_model

from zoo_models import Tiny

needs_openvino = pytest.mark.skipif(not available("openvino"),
                                    reason="OpenVINO is not installed (pip install 'quantize[openvino]')")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(12, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, images):
    return export_onnx(Tiny().eval(), tmp_path_factory.mktemp("export") / "model.onnx", images[:4]).path


@pytest.fixture(scope="module")
def int8(tmp_path_factory, fp32, images):
    folder = tmp_path_factory.mktemp("int8")
    save_ranges(calibrate(fp32, [images], method="minmax"), folder / "ranges.json")
    return quantize_model(fp32, folder / "ranges.json", folder / "model.int8.onnx", method="minmax").path


def test_onnxruntime_behind_the_interface_is_a_plain_session(fp32, images):
    runtime = get_runtime("onnxruntime")
    assert runtime.name == "onnxruntime" and runtime.version == __import__("onnxruntime").__version__
    assert runtime.key() == {"onnxruntime": runtime.version}
    expected = make_session(fp32).run(None, {"input": images})[0]
    model = runtime.load(fp32, threads=1, lean=True, batch=4)
    np.testing.assert_array_equal(model.run(images), expected)
    np.testing.assert_array_equal(model.run(images[:5]), expected[:5])  # any batch size in one session


def test_an_unknown_runtime_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; runtimes are onnxruntime, openvino"):
        get_runtime("tensorrt")


def test_without_openvino_asking_for_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` sees when it is not installed
    monkeypatch.setattr(inference, "_made", {})
    with pytest.raises(ConfigError) as caught:
        get_runtime("openvino")
    message = str(caught.value)
    assert "\n" not in message and "pip install 'quantize[openvino]'" in message
    assert not available("openvino") and available("onnxruntime")


@needs_openvino
def test_openvino_computes_the_fp32_model_in_fp32(fp32, images):
    runtime = get_runtime("openvino")
    assert runtime.name == "openvino" and runtime.key() == {"openvino": runtime.version, "openvino_precision": "f32"}
    expected = make_session(fp32).run(None, {"input": images})[0]
    model = runtime.load(fp32, threads=1, batch=8)
    # not bfloat16 (OpenVINO's default on CPUs that have it): the logits are ONNX Runtime's to float rounding
    np.testing.assert_allclose(model.run(images[:8]), expected[:8], atol=1e-4)
    short = model.run(images[:3])  # padded to the compiled batch of 8, not compiled again
    assert short.shape == (3, 1000) and len(model.requests) == 1
    np.testing.assert_allclose(short, expected[:3], atol=1e-4)
    np.testing.assert_allclose(model.run(images), expected, atol=1e-4)  # 12 > 8: compiled for 12 on first use
    assert sorted(shape[0] for shape in model.requests) == [8, 12]


@needs_openvino
def test_openvino_runs_the_int8_qdq_model_like_onnxruntime(int8, images):
    ort_logits = get_runtime("onnxruntime").load(int8).run(images)
    ov_logits = get_runtime("openvino").load(int8, threads=1).run(images)
    # the same integer arithmetic up to where each runtime rounds its requantization
    assert np.corrcoef(ov_logits.ravel(), ort_logits.ravel())[0, 1] > 0.999
    assert (ov_logits.argmax(1) == ort_logits.argmax(1)).mean() >= 0.9


@needs_openvino
def test_evaluate_in_openvino_scores_like_onnxruntime(fp32, images):
    labels = make_session(fp32).run(None, {"input": images})[0].argmax(1)
    labels[:3] = (labels[:3] + 1) % 1000
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]  # the second batch is longer: compiled for it
    ort = evaluate({"fp32": fp32}, batches, threads=2, runtime="onnxruntime")
    ov = evaluate({"fp32": fp32}, batches, threads=2, runtime="openvino")
    assert ov.runtime == {"name": "openvino", "version": get_runtime("openvino").version}
    assert ort.runtime["name"] == "onnxruntime"
    np.testing.assert_array_equal(ov.predictions["fp32"][:, 0], ort.predictions["fp32"][:, 0])
    assert ov.top1 == ort.top1 == {"fp32": pytest.approx(75.0)}


@needs_openvino
def test_timing_alternates_runtimes_in_one_call(fp32, int8, images):
    models = {"fp32": fp32, "int8": int8, "openvino fp32": fp32, "openvino int8": int8}
    times = time_blocks(models, images[:2], runs=4, threads=1, warmup=1, blocks=2,
                        runtimes={"openvino fp32": "openvino", "openvino int8": "openvino"})
    assert list(times) == list(models) and all(len(t) == 4 and min(t) > 0 for t in times.values())
