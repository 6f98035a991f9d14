"""The default recipe's methods on tiny models with known answers: weight-scale search, MSE ranges, shared Concat
ranges and range balancing. Each test checks the effect the method is for, measured, not a stored number."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize.accuracy.range_balance import balance, find_chains
from quantize.accuracy.shared_ranges import share_concat_ranges
from quantize.accuracy.weight_scales import search_scales, search_weight_scales
from quantize.core.runtime import make_session
from quantize.graph.optimize import optimize
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.histogram import StreamingHistogram
from quantize.stages.static_quant import quantize_model

OPSET = [helper.make_opsetid("", 13)]


def _save(model, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(path, x):
    session = make_session(path, threads=1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _images(n=16, seed=1, channels=3, size=12):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(8, channels, size, size)).astype(np.float32) for _ in range(n // 8)]


def _quantize(fp32_path, batches, tmp_path, method="minmax"):
    ranges = tmp_path / f"{fp32_path.stem}.ranges.json"
    save_ranges(calibrate(fp32_path, iter(batches), method=method, threads=1), ranges)
    out = tmp_path / f"{fp32_path.stem}.int8.onnx"
    quantize_model(fp32_path, ranges, out, method=method)
    return out


# --- weight-scale search -------------------------------------------------------------------------------------------

def _conv_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[1], 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None, None])
    return helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g", [x], [y],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]), opset_imports=OPSET)


def _dequantized_weight(model: onnx.ModelProto) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].dtype == np.int8)
    q, s = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
    return q * s.reshape(-1, 1, 1, 1)


def test_weights_on_a_per_tensor_grid_become_exact(tmp_path):
    """Weights stored on one per-tensor int8 grid (as the ONNX zoo's ShuffleNetV2) are off-grid under per-channel
    scales of max|w_c| / 127; the search finds scales on which they are exact, and the layer's int8 output moves
    closer to fp32."""
    rng = np.random.default_rng(0)
    step = 0.01
    levels = rng.integers(-127, 128, size=(6, 4, 3, 3))
    levels[1:] = np.clip(levels[1:] // rng.integers(2, 9, size=(5, 1, 1, 1)), -127, 127)  # channels of other peaks
    w = (levels * step).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    fp32 = _save(_conv_model(w, b), tmp_path / "conv.onnx")
    batches = _images(channels=4)
    int8_path = _quantize(fp32, batches, tmp_path)
    int8 = onnx.load(str(int8_path))
    before = np.abs(_dequantized_weight(int8) - w).max()
    result = search_weight_scales(onnx.load(str(fp32)), int8)
    after = np.abs(_dequantized_weight(int8) - w).max()
    assert result.layers == 1 and result.channels_changed >= 1
    assert before > 1e-4 and after < 1e-6
    assert result.error_searched < result.error_max_scale
    searched = _save(int8, tmp_path / "searched.onnx")
    x = batches[0]
    ref = _run(fp32, x)
    err_before = np.mean((_run(int8_path, x) - ref) ** 2)
    err_after = np.mean((_run(searched, x) - ref) ** 2)
    assert err_after < err_before


def test_searched_scales_never_round_worse_than_the_largest_weight():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(32, 50))
    scales = search_scales(w)
    base = np.abs(w).max(axis=1) / 127
    err = lambda s: ((w - np.clip(np.round(w / s[:, None]), -127, 127) * s[:, None]) ** 2).sum(axis=1)  # noqa: E731
    assert np.all(err(scales) <= err(base) + 1e-12)
    assert np.all(np.abs(w / scales[:, None]).max(axis=1) <= 127 + 1e-9)  # never clips
    assert np.array_equal(search_scales(np.zeros((2, 5))), np.ones(2))


# --- MSE ranges ----------------------------------------------------------------------------------------------------

def _quantization_mse(values: np.ndarray, lo: float, hi: float) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / 255
    zero = np.round(-lo / step)
    q = np.clip(np.round(values / step) + zero, 0, 255)
    return float(np.mean(((q - zero) * step - values) ** 2))


@pytest.mark.parametrize("signed", [False, True])
def test_mse_range_has_less_quantization_error_than_extremes_or_percentile(signed):
    rng = np.random.default_rng(5)
    values = rng.laplace(scale=1.0, size=400_000).astype(np.float32)
    if not signed:
        values = np.abs(values)  # never negative, a long tail
    hist = StreamingHistogram(2048)
    for part in np.array_split(values, 7):
        hist.add(part)
    lo, hi = hist.mse_range()
    assert hist.min <= lo <= max(hist.min, 0.0) and 0 <= hi <= hist.max
    mse = _quantization_mse(values, lo, hi)
    assert mse < _quantization_mse(values, float(values.min()), float(values.max()))
    assert mse < _quantization_mse(values, *hist.percentile_range(99.999))


def test_mse_calibration_method_writes_ranges(tmp_path):
    rng = np.random.default_rng(0)
    fp32 = _save(_conv_model(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), np.zeros(4, np.float32)),
                 tmp_path / "m.onnx")
    result = calibrate(fp32, iter(_images()), method="mse", threads=1)
    assert result.method == "mse" and set(result.ranges) >= {"x", "y"}
    x_lo, x_hi = result.ranges["x"]
    assert x_lo < 0 < x_hi


# --- shared Concat ranges ------------------------------------------------------------------------------------------

def test_concat_inputs_and_output_share_one_range(tmp_path):
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None, None])
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array((10 * rng.normal(size=(4, 3, 1, 1))).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(5, 8, 1, 1)).astype(np.float32), "w3")]
    model = helper.make_model(helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Relu", ["x"], ["rx"], name="r"),
        helper.make_node("Conv", ["rx", "w2"], ["b"], name="c2"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="c3")], "g", [x], [y], inits), opset_imports=OPSET)
    fp32 = _save(model, tmp_path / "cat.onnx")
    ranges = tmp_path / "r.json"
    save_ranges(calibrate(fp32, iter(_images()), method="minmax", threads=1), ranges)
    own = json.loads(ranges.read_text())["data"]
    graph = optimize(onnx.load(str(fp32)))[0]  # what calibration and quantization see
    cat = next(n for n in graph.graph.node if n.op_type == "Concat")
    joined = [*cat.input, cat.output[0]]
    assert own[cat.input[0]]["highest"] != own[cat.input[1]]["highest"]  # different ranges to begin with
    summary = share_concat_ranges(graph, ranges, tmp_path / "shared.json")
    shared = json.loads((tmp_path / "shared.json").read_text())["data"]
    assert summary == {"groups": 1, "tensors": 3}
    for name in joined:
        assert shared[name]["lowest"] == min(own[t]["lowest"] for t in joined)
        assert shared[name]["highest"] == max(own[t]["highest"] for t in joined)
    assert all(shared[t] == own[t] for t in own if t not in joined)
    out = tmp_path / "shared.int8.onnx"
    quantize_model(fp32, tmp_path / "shared.json", out, method="minmax")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    q_scales = {n.input[0]: float(inits[n.input[1]]) for n in onnx.load(str(out)).graph.node
                if n.op_type == "QuantizeLinear"}
    assert len({q_scales[t] for t in joined}) == 1


# --- range balancing -----------------------------------------------------------------------------------------------

def _stem_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> {depthwise Conv, dense Conv}; depthwise -> dense (signed, no activation); output
    channels of very different ranges."""
    rng = np.random.default_rng(seed)
    c = 8
    spread = np.geomspace(0.02, 2.0, c).astype(np.float32)
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    dw = rng.normal(size=(c, 1, 3, 3)).astype(np.float32) * spread[::-1, None, None, None] * 3
    pw_a = rng.normal(size=(c, c, 1, 1)).astype(np.float32)
    pw_b = rng.normal(size=(c, c, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=c).astype(np.float32) * spread, "b1"),
             numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(np.zeros(c, np.float32), "dwb"),
             numpy_helper.from_array(pw_a, "pa"), numpy_helper.from_array(pw_b, "pb")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None, None])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "dw", "dwb"], ["d1"], name="depthwise", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "pb"], ["e1"], name="dense_b"),
             helper.make_node("Conv", ["d1", "pa"], ["e2"], name="dense_a"),
             helper.make_node("Add", ["e1", "e2"], ["y"], name="add")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=OPSET)


def test_balance_finds_the_chains_through_relu_and_maxpool():
    chains = {c.producer: c for c in find_chains(_stem_model())}
    assert set(chains) == {"stem", "depthwise"}
    assert chains["stem"].tensor == "p1" and sorted(chains["stem"].readers) == ["dense_b", "depthwise"]
    assert chains["depthwise"].readers == ["dense_a"] and chains["depthwise"].depthwise == [False]


def test_balance_keeps_the_function_evens_the_channels_and_lowers_int8_error(tmp_path):
    fp32 = _save(_stem_model(), tmp_path / "stem.onnx")
    batches = _images(n=32, channels=3, size=16)
    result = balance(fp32, tmp_path / "balanced.onnx", iter(batches), threads=1)
    balanced = tmp_path / "balanced.onnx"
    x = np.concatenate(batches)
    ref = _run(fp32, x)
    np.testing.assert_allclose(_run(balanced, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert len(result.chains) == 2
    for chain in result.chains:
        # every channel on the same peak, as far as the scale cap (16) allows
        assert chain["peak_spread_before"] > 2
        assert chain["peak_spread_after"] <= max(1.0, chain["peak_spread_before"] / 16) * 1.01
    held_out = _images(n=16, seed=9, channels=3, size=16)[0]
    target = _run(fp32, held_out)
    error = {}
    for name, path in (("plain", fp32), ("balanced", balanced)):
        int8 = _quantize(path, batches, tmp_path / name if (tmp_path / name).mkdir() is None else tmp_path)
        error[name] = float(np.mean((_run(int8, held_out) - target) ** 2))
    assert error["balanced"] < 0.5 * error["plain"]
