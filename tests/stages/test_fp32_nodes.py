"""Layers an int8 QDQ model keeps in fp32 must run in fp32 in ONNX Runtime (stages/fp32_nodes.py)."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize.core.runtime import make_session
from quantize.stages.fp32_nodes import read_through_cast
from quantize.graph.optimize import optimize
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.static_quant import quantize_model

from accuracy_models import minmax_ranges, save
from zoo_models import Pooled, exported

OPSET = [helper.make_opsetid("", 13)]


def qdq_conv(zero_point: int, scale_shape=(), shared_weight: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv 3x3 (float weights, padded) -> Relu -> Q -> DQ -> out: the shape of a layer left in fp32
    inside an int8 network."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * np.geomspace(0.01, 1, 16).astype(np.float32)[:, None,
                                                                                                                None, None]
    b = rng.standard_normal(16).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.full(scale_shape, 0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.full(scale_shape, zero_point, np.uint8), "x_zero"),
             numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "y_zero")]
    axis = {"axis": 1} if scale_shape else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x", **axis),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"], name="dq_x", **axis),
             helper.make_node("Conv", ["xf", "w", "b"], ["c"], name="kept", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "y_scale", "y_zero"], ["rq"], name="q_r"),
             helper.make_node("DequantizeLinear", ["rq", "y_scale", "y_zero"], ["out"], name="dq_r")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 16, 12, 12])]
    if shared_weight:  # a second layer reads the same weight tensor
        nodes.append(helper.make_node("Conv", ["xf", "w"], ["other"], name="other", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [None, 16, 12, 12]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 12, 12])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=OPSET)


def optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    path = tmp_path / "optimized.onnx"
    make_session(model.SerializeToString(), optimized_model_path=path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(model: onnx.ModelProto, x: np.ndarray, level: str | None = None) -> np.ndarray:
    return make_session(model.SerializeToString(), level=level).run(None, {"x": x})[0]


@pytest.mark.parametrize("zero_point", [0, 128])
def test_a_float_layer_read_through_cast_stays_float_and_computes_the_same(zero_point, tmp_path):
    before = qdq_conv(zero_point)
    # the premise: ONNX Runtime quantizes a float layer between a DequantizeLinear and a QuantizeLinear itself
    assert optimized_ops(before, tmp_path)["QLinearConv"] == 1
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert read_through_cast(after, ["kept"]) == ["kept"]
    onnx.checker.check_model(after)
    ops = Counter(n.op_type for n in after.graph.node)
    assert ops["Cast"] == 1 and ops["Sub"] == (zero_point != 0) and ops["DequantizeLinear"] == 1  # only dq_r left
    assert optimized_ops(after, tmp_path)["QLinearConv"] == 0
    x = np.random.default_rng(1).standard_normal((2, 8, 12, 12)).astype(np.float32) * 2
    exact = run(before, x, level="disable")  # the QDQ graph as written: the layer in fp32
    np.testing.assert_allclose(run(after, x, level="disable"), exact, rtol=1e-5, atol=1e-5)
    # what ONNX Runtime runs: the same up to the output's rounding, where the unprotected layer is off by steps
    assert np.abs(run(after, x) - exact).max() <= 0.05 + 1e-6
    assert np.abs(run(before, x) - exact).max() > 0.05 * 2


def test_layers_read_through_cast_only_when_the_optimizer_would_match(tmp_path):
    per_axis = qdq_conv(0, scale_shape=(8,))
    assert read_through_cast(per_axis, ["kept"]) == []  # a per-channel DequantizeLinear is not matched
    shared = qdq_conv(0, shared_weight=True)
    assert read_through_cast(shared, ["kept"]) == []  # the weight is another layer's too: own_initializers first
    untouched = qdq_conv(0)
    assert read_through_cast(untouched, ["relu", "missing"]) == []
    assert [n.op_type for n in untouched.graph.node] == [n.op_type for n in qdq_conv(0).graph.node]


def chain() -> onnx.ModelProto:
    """x -> conv1 3x3 -> conv2 3x3 (reads a signed tensor) -> Relu -> conv3 1x1 -> Relu -> conv4 1x1 -> pool."""
    rng = np.random.default_rng(2)
    shapes = {"w1": (16, 3, 3, 3), "w2": (16, 16, 3, 3), "w3": (16, 16, 1, 1), "w4": (16, 16, 1, 1)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in shapes.items()]
    inits += [numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), f"b{k}") for k in range(1, 5)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c3"], ["a3"], name="act3"),
             helper.make_node("Conv", ["a3", "w4", "b4"], ["c4"], name="conv4", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c4"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["out"], name="flatten")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 16])], inits)
    return helper.make_model(graph, opset_imports=OPSET)


def test_quantize_model_keeps_excluded_layers_in_fp32_in_onnx_runtime(tmp_path):
    model = chain()
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = [np.random.default_rng(k).standard_normal((8, 3, 16, 16)).astype(np.float32) for k in range(3)]
    ranges = minmax_ranges(model, data, tmp_path / "ranges.json")
    all_int8 = onnx.load(str(quantize_model(fp32, ranges, tmp_path / "all.onnx", method="minmax").path))
    assert optimized_ops(all_int8, tmp_path)["QLinearConv"] == 4
    kept = onnx.load(str(quantize_model(fp32, ranges, tmp_path / "kept.onnx", method="minmax",
                                        nodes_to_exclude=["conv2", "conv4"]).path))
    producer = {o: n for n in kept.graph.node for o in n.output}
    layers = {n.name: n for n in kept.graph.node}
    assert producer[layers["conv2"].input[0]].op_type == "Sub"  # conv1's output is signed: zero point not 0
    assert producer[layers["conv4"].input[0]].op_type == "Cast"  # after a Relu: zero point 0
    assert optimized_ops(kept, tmp_path)["QLinearConv"] == 2  # conv1 and conv3
    # the excluded layers compute in fp32: closer to the fp32 model than the all-int8 model is
    x = np.random.default_rng(9).standard_normal((8, 3, 16, 16)).astype(np.float32)
    ref = run(model, x)
    assert np.abs(run(kept, x) - ref).mean() < np.abs(run(all_int8, x) - ref).mean()


def pooled() -> onnx.ModelProto:
    """x -> stem 3x3 s2 -> Relu -> MaxPool 3x3 s2 -> conv 1x1 -> Relu -> pool: ShuffleNet's first layers in small."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a1"], name="stem_relu"),
             helper.make_node("MaxPool", ["a1"], ["m"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Conv", ["m", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["out"], name="flatten")]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 16])], inits)
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.mark.parametrize("kept", [["stem", "stem_relu", "pool"], ["pool"], ["stem"]])
def test_a_max_pool_kept_in_fp32_stays_before_the_quantizer(kept, tmp_path):
    model = pooled()
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = [np.random.default_rng(k).standard_normal((4, 3, 32, 32)).astype(np.float32) for k in range(2)]
    ranges = minmax_ranges(model, data, tmp_path / "ranges.json")
    int8 = onnx.load(str(quantize_model(fp32, ranges, tmp_path / "kept.onnx", method="minmax",
                                        nodes_to_exclude=kept).path))
    path = tmp_path / "optimized.onnx"
    make_session(int8.SerializeToString(), optimized_model_path=path)
    optimized = onnx.load(str(path))
    producer = {o: n for n in optimized.graph.node for o in n.output}
    pool = next(n for n in optimized.graph.node if "MaxPool" in n.op_type)
    # a float pool: it reads no QuantizeLinear's bytes, and its output goes to the quantizer (through a layout change)
    assert pool.op_type == "MaxPool" and producer[pool.input[0]].op_type != "QuantizeLinear"
    assert {n.op_type for n in optimized.graph.node if pool.output[0] in n.input} <= {"QuantizeLinear", "ReorderOutput"}
    x = np.concatenate(data)
    np.testing.assert_allclose(run(int8, x), run(int8, x, level="disable"), rtol=1e-4, atol=1e-4)


def test_a_max_pool_after_a_layer_kept_in_fp32_joins_it():
    from quantize.stages.fp32_nodes import with_pools

    model = pooled()
    assert with_pools(model, ["stem"]) == ["stem", "stem_relu", "pool"]
    assert with_pools(model, ["stem", "stem_relu"]) == ["stem", "stem_relu", "pool"]
    assert with_pools(model, ["conv2"]) == ["conv2"]  # its Relu leads to no pool: left to the quantizer
    assert with_pools(model, []) == []


def test_a_stem_kept_in_fp32_reads_the_three_input_channels_again(tmp_path):
    model = pooled()
    assert any(n.op_type == "Gather" for n in optimize(model)[0].graph.node)  # widened for the int8 kernel
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = [np.random.default_rng(k).standard_normal((4, 3, 32, 32)).astype(np.float32) for k in range(2)]
    ranges = minmax_ranges(model, data, tmp_path / "ranges.json")
    int8 = onnx.load(str(quantize_model(fp32, ranges, tmp_path / "kept.onnx", method="minmax",
                                        nodes_to_exclude=["stem"]).path))
    stem = next(n for n in int8.graph.node if n.name == "stem")
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    assert stem.input[0] == "x" and inits[stem.input[1]].shape[1] == 3
    assert not [n for n in int8.graph.node if n.op_type == "Gather"]
    np.testing.assert_array_equal(inits[stem.input[1]], numpy_helper.to_array(model.graph.initializer[0]))


def test_a_float_gemm_is_read_through_cast_too(tmp_path):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(0.03, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s2"), numpy_helper.from_array(np.array(128, np.uint8), "z2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]),
             helper.make_node("Gemm", ["xf", "w", "b"], ["y"], name="fc", transB=1),
             helper.make_node("QuantizeLinear", ["y", "s2", "z2"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["out"])]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 10])], inits)
    before = helper.make_model(graph, opset_imports=OPSET)
    assert optimized_ops(before, tmp_path)["QGemm"] == 1  # ONNX Runtime would run the float Gemm in int8
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert read_through_cast(after, ["fc"]) == ["fc"]
    assert optimized_ops(after, tmp_path)["QGemm"] == 0
    x = np.random.default_rng(5).standard_normal((6, 32)).astype(np.float32)
    feed = {"x": x}
    exact = make_session(before.SerializeToString(), level="disable").run(None, feed)[0]
    np.testing.assert_allclose(make_session(after.SerializeToString(), level="disable").run(None, feed)[0], exact,
                               rtol=1e-5, atol=1e-5)


def test_float_stem_keeps_the_stem_and_its_pool_in_fp32_in_onnx_runtime_blocked_layout(tmp_path):
    """quant.float_stem: the stem before a MaxPool runs in fp32, padded from 24 to 32 channels so ONNX Runtime keeps
    the stem and the pool in its blocked (NCHWc) layout; 24 channels leave it for plain NCHW before the pool."""
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    fp32 = tmp_path / "pooled.onnx"
    exported(Pooled(), fp32, x)
    ranges = tmp_path / "ranges.json"
    save_ranges(calibrate(fp32, [x], method="minmax"), ranges)

    def optimized(path):
        out = tmp_path / f"{path.stem}.opt.onnx"
        make_session(path, optimized_model_path=out)
        return onnx.load(str(out))

    # the premise: ONNX Runtime leaves its blocked layout before a pool of 24 channels
    assert [n.op_type for n in optimized(fp32).graph.node][:3] == ["Conv", "ReorderOutput", "MaxPool"]
    int8 = quantize_model(fp32, ranges, tmp_path / "int8.onnx", method="minmax").path
    result = quantize_model(fp32, ranges, tmp_path / "kept.onnx", method="minmax", float_stem=True,
                            fp32_out=tmp_path / "quantizer_input.onnx")
    kept = result.path
    # the graph the quantizer read, layer for layer the int8 model's (what refine and the analyses compare with)
    reference = onnx.load(str(result.fp32_path))
    shapes = {i.name: tuple(i.dims) for i in reference.graph.initializer}
    assert [shapes[n.input[1]][:2] for n in reference.graph.node if n.op_type == "Conv"] == \
        [(32, 3), (32, 1), (16, 32), (16, 32)]
    nodes = {n.name: n for n in onnx.load(str(kept)).graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(kept)).graph.initializer}
    stem = next(n for n in nodes.values() if n.op_type == "Conv" and n.input[0] == "input")  # no quantizer before it
    assert inits[stem.input[1]].shape == (32, 3, 3, 3)  # float weights, 8 zero filters, the 3 channels read again
    ops = optimized(kept).graph.node
    assert [(n.op_type, n.domain) for n in ops][:2] == [("Conv", "com.microsoft.nchwc"), ("MaxPool", "com.microsoft.nchwc")]
    assert sum(n.op_type == "QLinearConv" for n in ops) == 3  # the other three convolutions are int8
    assert sum(n.op_type == "QLinearConv" for n in optimized(int8).graph.node) == 4
    # the zero channels change nothing: ONNX Runtime's output is the QDQ graph's, and closer to fp32 than all-int8's
    got = make_session(kept).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, make_session(kept, level="disable").run(None, {"input": x})[0], atol=1e-4)
    want = make_session(fp32).run(None, {"input": x})[0]
    assert np.abs(got - want).mean() < np.abs(make_session(int8).run(None, {"input": x})[0] - want).mean()
