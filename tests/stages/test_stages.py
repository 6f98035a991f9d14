"""Each stage alone, on a tiny network: export, calibrate, quantize, evaluate."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from quantize.stages.calibrate import activation_tensors, calibrate, save_ranges
from quantize.core.errors import ConfigError, ModelError
from quantize.stages.evaluate import evaluate, top_classes, topk_hits
from quantize.stages.export import export_onnx
from quantize.core.runtime import make_session
from quantize.graph.optimize import optimize
from quantize.stages.fp32_nodes import own_initializers
from quantize.stages.static_quant import int8_opset, model_opset, quantize_model

from zoo_models import Tiny


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(12, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(Tiny().eval(), path, images[:4])
    return result


def test_export_writes_a_checked_opset11_model_matching_pytorch(fp32, images):
    model = onnx.load(str(fp32.path))
    assert model_opset(model) == 11 and fp32.opset == 11
    assert fp32.max_abs_diff < 1e-4
    session = make_session(fp32.path)
    # dynamic batch: any batch size runs
    assert session.run(None, {"input": images[:5]})[0].shape == (5, 1000)


def test_export_refuses_a_model_that_onnx_cannot_reproduce(tmp_path, images):
    class Random(Tiny):
        def forward(self, x):  # the exporter freezes the random draw: ORT and PyTorch disagree
            return super().forward(x) + torch.rand(x.shape[0], 1000) * 10

    with pytest.raises(ModelError, match="disagrees with PyTorch"):
        export_onnx(Random().eval(), tmp_path / "m.onnx", images[:4])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_covers_every_activation(fp32, images, method):
    batches = [images[i:i + 5] for i in range(0, len(images), 5)]  # uneven last batch on purpose
    result = calibrate(fp32.path, iter(batches), method=method, percentile=99.9)
    original = onnx.load(str(fp32.path))
    expected = activation_tensors(optimize(original)[0])  # the graph that is quantized (stem_channels adds one)
    assert set(result.ranges) == set(expected) and "input" in result.ranges
    assert set(activation_tensors(original)) <= set(result.ranges)
    assert result.num_images == len(images)
    lo, hi = result.ranges["input"]
    assert images.min() <= lo < 0 < hi <= images.max()
    if method == "minmax":
        assert (lo, hi) == (pytest.approx(images.min()), pytest.approx(images.max()))


def test_percentile_ranges_do_not_depend_on_batching(fp32, images):
    one = calibrate(fp32.path, [images], method="percentile", percentile=99.0, num_bins=4096)
    many = calibrate(fp32.path, [images[i:i + 3] for i in range(0, 12, 3)], method="percentile",
                     percentile=99.0, num_bins=4096)
    for name, (lo, hi) in one.ranges.items():
        span = max(hi - lo, 1e-6)
        assert abs(many.ranges[name][0] - lo) <= 0.01 * span and abs(many.ranges[name][1] - hi) <= 0.01 * span


def test_unknown_method_is_a_config_error(fp32, images):
    with pytest.raises(ConfigError, match="calib.method"):
        calibrate(fp32.path, [images], method="kl")


@pytest.fixture(scope="module")
def ranges(tmp_path_factory, fp32, images):
    result = calibrate(fp32.path, [images], method="percentile")
    path = tmp_path_factory.mktemp("calib") / "ranges.json"
    save_ranges(result, path)
    return path


def test_ranges_file_is_onnxruntime_calibration_cache(ranges):
    payload = json.loads(ranges.read_text())
    assert payload["CLS"] == "TensorsData" and "input" in payload["data"]


@pytest.mark.parametrize("per_channel, opset", [(True, 13), (False, 11)])
def test_quantized_model_is_valid_int8_at_the_needed_opset(tmp_path, fp32, ranges, images, per_channel, opset):
    out = tmp_path / "model.int8.onnx"
    result = quantize_model(fp32.path, ranges, out, method="percentile", per_channel=per_channel)
    assert result.opset == opset
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model_opset(model) == opset
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {i.name: i for i in model.graph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights.values())
    int8_logits = make_session(out).run(None, {"input": images})[0]
    fp32_logits = make_session(fp32.path).run(None, {"input": images})[0]
    assert np.corrcoef(int8_logits.ravel(), fp32_logits.ravel())[0, 1] > 0.99


def test_int8_opset_rules():
    assert int8_opset(11, "qdq", True, None) == 13
    assert int8_opset(11, "qoperator", True, None) == 11
    assert int8_opset(11, "qdq", False, 13) == 13
    with pytest.raises(ConfigError):
        int8_opset(11, "qdq", True, 12)


def test_bad_quant_option_is_a_config_error(tmp_path, fp32, ranges):
    with pytest.raises(ConfigError, match="quant.activation_type"):
        quantize_model(fp32.path, ranges, tmp_path / "x.onnx", method="percentile", activation_type="int4")
    assert not (tmp_path / "x.onnx").exists()


def test_topk_hits():
    logits = np.array([[0.1, 0.9, 0.5, 0.0, 0.2, 0.3], [5, 4, 3, 2, 1, 0]], dtype=np.float32)
    assert topk_hits(logits, np.array([1, 1]), 1).tolist() == [True, False]
    assert topk_hits(logits, np.array([3, 4]), 5).tolist() == [False, True]


def test_top_classes_rank_by_score_then_lower_id():
    logits = np.array([[0.1, 0.9, 0.5, 0.9, 0.2, 0.3, 0.0], [6, 5, 4, 3, 2, 1, 0]], dtype=np.float32)
    assert top_classes(logits).tolist() == [[1, 3, 2, 5, 4], [0, 1, 2, 3, 4]]
    scores = np.random.default_rng(0).standard_normal((50, 1000)).astype(np.float32)
    assert (top_classes(scores)[:, 0] == scores.argmax(1)).all()


def test_evaluate_counts_accuracy_and_agreement(fp32, images):
    session = make_session(fp32.path)
    predicted = session.run(None, {"input": images})[0].argmax(1)
    labels = predicted.copy()
    labels[:3] = (labels[:3] + 1) % 1000  # three wrong labels
    batches = [(images[:7], labels[:7]), (images[7:], labels[7:])]
    result = evaluate({"a": fp32.path, "b": fp32.path}, batches)
    assert result.num_images == 12
    assert result.top1["a"] == result.top1["b"] == pytest.approx(100 * 9 / 12)
    assert result.agreement_top1 == 100.0
    assert result.top5["a"] >= result.top1["a"]


def test_known_predictions_score_like_a_run_of_the_model(fp32, images):
    """A model given by its earlier predictions is not run, and every figure equals the run where it was."""
    session = make_session(fp32.path)
    labels = session.run(None, {"input": images})[0].argmax(1)
    labels[:4] = (labels[:4] + 1) % 1000
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    both = evaluate({"a": fp32.path, "b": fp32.path}, batches)
    assert both.predictions["a"].shape == (12, 5)
    reused = evaluate({"b": fp32.path}, batches, known={"a": both.predictions["a"]})
    for field in ("top1", "top5", "correct"):
        assert getattr(reused, field) == getattr(both, field)
    assert reused.agreement_top1 == both.agreement_top1 == 100.0
    assert set(reused.stage_seconds) == {"input", "b"}  # "a" was not run

    shifted = np.roll(both.predictions["a"], 1, axis=0)  # predictions of other images: agreement must drop
    assert evaluate({"b": fp32.path}, batches, known={"a": shifted}).agreement_top1 < 100.0
    with pytest.raises(ValueError, match="cover 11 images"):
        evaluate({"b": fp32.path}, batches, known={"a": both.predictions["a"][:11]})


def test_own_initializers_copies_only_what_is_shared():
    shared = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, 0.0])
    own = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"], name="kept"),
         helper.make_node("Mul", ["y", "w"], ["z"], name="kept2"),
         helper.make_node("Add", ["z", "b"], ["out"], name="quantized")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])], [shared, own])
    model = helper.make_model(graph)
    result = own_initializers(model, ["kept", "kept2"])
    nodes = {n.name: n for n in result.graph.node}
    assert nodes["kept"].input[1] not in ("b", "w") and nodes["quantized"].input[1] == "b"
    assert nodes["kept2"].input[1] == "w"  # not shared: left as it is
    inits = {i.name: i for i in result.graph.initializer}
    assert onnx.numpy_helper.to_array(inits[nodes["kept"].input[1]]).tolist() == [0.0, 0.0]
    assert [n.input[1] for n in model.graph.node] == ["b", "w", "b"]  # the input model is not changed
    onnx.checker.check_model(result)
