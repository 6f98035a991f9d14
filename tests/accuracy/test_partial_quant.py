"""Half-quantized models: only the weights, or only the activations, of an int8 model (accuracy/partial_quant.py)."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantize.accuracy.partial_quant import activations_only, weights_only
from quantize.core.errors import ModelError
from quantize.core.runtime import make_session
from quantize.graph.optimize import optimize
from quantize.stages.static_quant import quantize_model

from accuracy_models import conv_net, images, minmax_ranges, save

LAYERS = ("conv1", "conv2", "conv3")


@pytest.fixture()
def pair(tmp_path):
    model = conv_net(seed=5)
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = images(32)
    ranges = minmax_ranges(model, data, tmp_path / "ranges.json")
    int8 = quantize_model(fp32, ranges, tmp_path / "int8.onnx", method="minmax").path
    return optimize(model)[0], onnx.load(str(int8)), np.concatenate(data)


def run(model: onnx.ModelProto, x: np.ndarray, level: str | None = None) -> np.ndarray:
    return make_session(model.SerializeToString(), level=level).run(None, {"x": x})[0]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.name in LAYERS}


def test_weights_only_rounds_the_weights_and_nothing_else(pair, tmp_path):
    graph, int8, x = pair
    half = weights_only(graph, int8)
    onnx.checker.check_model(half)
    ops = Counter(n.op_type for n in half.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    exact, rounded = weights(graph), weights(half)
    for name in LAYERS:  # on an int8 grid per output channel, within half a step of the fp32 weight
        live = np.abs(exact[name]).reshape(len(exact[name]), -1).max(axis=1) > 0  # not the zero channels of padding
        w, q = exact[name][live], rounded[name][live]
        step = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
        err = np.abs(q - w).reshape(len(w), -1).max(axis=1)
        assert 0 < err.max() and np.all(err <= step / 2 + 1e-7)
        levels = q.reshape(len(q), -1) / step[:, None]
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    fp32_out, half_out, int8_out = run(graph, x), run(half, x), run(int8, x)
    assert 0 < np.abs(half_out - fp32_out).mean() < np.abs(int8_out - fp32_out).mean()


def test_activations_only_keeps_fp32_weights_and_every_activation_quantizer(pair, tmp_path):
    graph, int8, x = pair
    half = activations_only(graph, int8)
    onnx.checker.check_model(half)
    assert all(w.dtype == np.float32 for w in weights(half).values())
    assert not [n for n in half.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    q_int8 = Counter(n.op_type for n in int8.graph.node)["QuantizeLinear"]
    assert Counter(n.op_type for n in half.graph.node)["QuantizeLinear"] == q_int8
    optimized = tmp_path / "optimized.onnx"
    make_session(half.SerializeToString(), optimized_model_path=optimized)
    assert not [n for n in onnx.load(str(optimized)).graph.node if n.op_type == "QLinearConv"]
    # ONNX Runtime computes what the graph says (it did not quantize the float weights on its own)
    np.testing.assert_allclose(run(half, x), run(half, x, level="disable"), rtol=1e-4, atol=1e-4)
    fp32_out, half_out, int8_out = run(graph, x), run(half, x), run(int8, x)
    assert 0 < np.abs(half_out - fp32_out).mean() < np.abs(int8_out - fp32_out).mean()


def test_a_graph_other_than_the_quantized_one_is_refused(pair):
    graph, int8, _ = pair
    other = onnx.ModelProto()
    other.CopyFrom(graph)
    next(n for n in other.graph.node if n.name == "conv2").name = "renamed"
    for build in (weights_only, activations_only):
        with pytest.raises(ModelError, match="conv2"):
            build(other, int8)
    with pytest.raises(ModelError, match="no layer reads quantized weights"):
        weights_only(graph, graph)


def test_groups_of_activation_quantizers_rebuild_the_activations_only_model(pair, tmp_path):
    from quantize.accuracy.partial_quant import activation_groups, with_activations

    graph, int8, x = pair
    groups = activation_groups(graph, int8)
    assert groups["input"] == ["x"] and groups["output"] == ["out"]
    every = [t for tensors in groups.values() for t in tensors]
    assert len(every) == len(set(every)) == Counter(n.op_type for n in int8.graph.node)["QuantizeLinear"]
    rebuilt = with_activations(graph, int8, every)
    onnx.checker.check_model(rebuilt)
    # all quantizers on the fp32 graph: the activations-only model (fp32 weights read through Cast in both)
    np.testing.assert_allclose(run(rebuilt, x), run(activations_only(graph, int8), x), rtol=1e-4, atol=1e-4)
    optimized = tmp_path / "optimized.onnx"
    make_session(rebuilt.SerializeToString(), optimized_model_path=optimized)
    assert not [n for n in onnx.load(str(optimized)).graph.node if n.op_type == "QLinearConv"]
    fp32_out, every_out = run(graph, x), run(rebuilt, x)
    for tensors in groups.values():  # each group alone: a part of the error, never none of it for the input
        alone = run(with_activations(graph, int8, tensors), x)
        assert np.abs(alone - fp32_out).mean() <= np.abs(every_out - fp32_out).mean() * 1.5
    assert np.abs(run(with_activations(graph, int8, ["x"]), x) - fp32_out).max() > 0
    assert np.array_equal(run(with_activations(graph, int8, []), x), fp32_out)


def test_quantizers_joined_by_moves_on_one_range_are_left_out_together():
    from onnx import TensorProto, helper

    from quantize.accuracy.partial_quant import joined_quantizers, left_out_one_at_a_time

    graph = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("Split", ["a"], ["a0", "a1"], name="split", axis=1),
         helper.make_node("Concat", ["a1", "a0"], ["out"], name="concat", axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])]))

    def int8_with(out_scale: float) -> onnx.ModelProto:
        params = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 0.1), ("s_out", out_scale))]
        params.append(numpy_helper.from_array(np.array(0, np.uint8), "z"))
        quantizers = [helper.make_node("QuantizeLinear", [t, "s_out" if t.startswith("out") else "s", "z"], [f"{t}_q"],
                                       name=f"{t}_q") for t in ("x", "a", "a0", "a1", "out_QuantizeLinear_Input")]
        return helper.make_model(helper.make_graph(quantizers, "q", [], [], params))

    # the Split's parts are on the tensor's range; the Concat on another range rounds anew
    assert left_out_one_at_a_time(graph, int8_with(0.2)) == {"x": ["a", "a0", "a1", "out"], "a": ["x", "out"],
                                                             "out": ["x", "a", "a0", "a1"]}
    # on the same range the Concat's output only copies rounded values: one quantizer with the Split and its input
    assert left_out_one_at_a_time(graph, int8_with(0.1)) == {"x": ["a", "a0", "a1", "out"], "a": ["x"]}
    assert joined_quantizers(graph, int8_with(0.1)) == {"x": ["x"], "a": ["a", "a0", "a1", "out"]}
    assert joined_quantizers(graph, int8_with(0.2)) == {"x": ["x"], "a": ["a", "a0", "a1"], "out": ["out"]}
    # the input is on that range too, but the Relu between them is not a move: still its own quantizer


def test_without_moves_every_quantizer_is_left_out_alone(pair):
    from quantize.accuracy.partial_quant import activation_groups, left_out_one_at_a_time

    graph, int8, _ = pair  # conv_net: only the Flatten after the global pool moves values
    every = [t for tensors in activation_groups(graph, int8).values() for t in tensors]
    left_out = left_out_one_at_a_time(graph, int8)
    assert set(left_out) == set(every) - {"out"}
    assert left_out["p"] == [t for t in every if t not in ("p", "out")]
    assert all(left_out[t] == [o for o in every if o != t] for t in left_out if t != "p")


def test_a_wider_quantizer_keeps_the_range_on_a_finer_grid():
    from onnx import TensorProto, helper

    from quantize.accuracy.partial_quant import finer_quantizer

    model = helper.make_model(helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [400])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [400])]))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(20, np.uint8), "z")
    model.graph.node.extend(finer_quantizer(model, "x", "y", scale, zero, 10, {"x", "y"}))
    onnx.checker.check_model(model)
    x = np.linspace(-5, 30, 400, dtype=np.float32)
    y = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    step = np.float32(0.1) / 4
    np.testing.assert_allclose(y, np.clip(np.round(x / step), -80, 1023 - 80) * step, rtol=0, atol=1e-6)
    assert y.min() == pytest.approx(-2.0) and y.max() == pytest.approx((255 - 20) * 0.1 + 3 * 0.025)
    inside = (x > -2) & (x < 23.5)
    assert np.abs(y - x)[inside].max() <= step / 2 + 1e-6  # a quarter of the uint8 quantizer's rounding error
    with pytest.raises(ModelError, match="uint8"):
        finer_quantizer(model, "x", "y2", scale, numpy_helper.from_array(np.array(0, np.int8), "z8"), 10, set())


def test_wider_activations_come_closer_to_the_fp32_model_and_to_its_weights_only_half(pair):
    from quantize.accuracy.partial_quant import activation_groups, with_activations

    graph, int8, x = pair
    every = [t for tensors in activation_groups(graph, int8).values() for t in tensors]
    fp32_out, with_int8_weights = run(graph, x), weights_only(graph, int8)
    error = {bits: np.abs(run(with_activations(graph, int8, every, bits), x) - fp32_out).mean()
             for bits in (8, 9, 10, 12, 16)}
    assert error[8] > error[9] > error[10] > error[12] > error[16]
    assert error[16] < error[8] / 100  # minmax ranges clip nothing here: at 16 bits nearly the fp32 model
    weights_error = np.abs(run(with_int8_weights, x) - fp32_out).mean()
    both = np.abs(run(with_activations(with_int8_weights, int8, every, 16), x) - fp32_out).mean()
    assert both == pytest.approx(weights_error, rel=0.05)
    with pytest.raises(ModelError, match="8 to 24"):
        with_activations(graph, int8, every, 7)
