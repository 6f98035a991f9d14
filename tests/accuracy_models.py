"""Tiny ONNX models with known answers for the accuracy tests (sensitivity, bias correction, GPTQ, equalization)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantize.graph.optimize import optimize
from quantize.stages.calibrate import Calibration, save_ranges
from quantize.accuracy.sensitivity import expose
from quantize.core.runtime import make_session

OPSET = [helper.make_opsetid("", 13)]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def relu_then_qdq(scale: float) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32: x -> Relu -> y -> Identity -> out; int8: the same with y quantized (uint8, zero point 0, ``scale``)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4, 8, 8])
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Identity", ["y"], ["out"], name="id")],
        "fp32", [x], [out]), opset_imports=OPSET)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "y_zero_point")]
    int8 = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu"),
         helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero_point"], ["y_QuantizeLinear_Output"], name="q"),
         helper.make_node("DequantizeLinear", ["y_QuantizeLinear_Output", "y_scale", "y_zero_point"],
                          ["y_DequantizeLinear_Output"], name="dq"),
         helper.make_node("Identity", ["y_DequantizeLinear_Output"], ["out"], name="id")],
        "int8", [x], [out], inits), opset_imports=OPSET)
    return fp32, int8


def conv_net(seed: int = 0, channels: int = 8, relu6: bool = True, depthwise: bool = True,
             bias_offset: float = 0.0, size: int | None = 16) -> onnx.ModelProto:
    """x(3ch) -> Conv 3x3 -> Clip(0,6)|Relu -> [depthwise 3x3 | Conv 1x1] -> Conv 1x1 -> GlobalAveragePool -> out.
    Channels of the first conv get very different gains, as trained networks have."""
    rng = np.random.default_rng(seed)
    c = channels
    gains = np.geomspace(0.05, 2.0, c).astype(np.float32)
    w1 = (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32) * gains[:, None, None, None]
    b1 = (rng.standard_normal(c) * 0.1 + bias_offset).astype(np.float32)
    if depthwise:
        w2 = (rng.standard_normal((c, 1, 3, 3)) * 0.5).astype(np.float32)
    else:
        w2 = (rng.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32)
    b2 = (rng.standard_normal(c) * 0.1).astype(np.float32)
    w3 = (rng.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32)
    b3 = (rng.standard_normal(c) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"),
                                                        (b3, "b3"))]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    act = helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act1") if relu6 else \
        helper.make_node("Relu", ["c1"], ["a1"], name="act1")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        act,
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2",
                         kernel_shape=[3, 3] if depthwise else [1, 1], pads=[1, 1, 1, 1] if depthwise else [0, 0, 0, 0],
                         group=c if depthwise else 1),
        helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["out"], name="flatten"),
    ]
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, c])], inits)
    return helper.make_model(graph, opset_imports=OPSET)


def images(n: int, seed: int = 1, batch: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    return [data[i:i + batch] for i in range(0, n, batch)]


def minmax_ranges(model: onnx.ModelProto, batches: list[np.ndarray], path: Path, widen: float = 1.0) -> Path:
    """MinMax ranges of every float tensor of the graph ``quantize_model`` quantizes (``graph.optimize``'s), optionally
    widened ``widen`` times (a deliberately coarse quantization), in ONNX Runtime's calibration-cache format."""
    model = optimize(model)[0]
    names = ["x"] + [o for n in model.graph.node for o in n.output]
    session = make_session(expose(model, names), level="disable")
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for b in batches:
        for n, v in zip(names, session.run(names, {"x": b})):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    ranges = {n: (lo[n] * widen, hi[n] * widen) for n in names}
    save_ranges(Calibration(ranges, "minmax", sum(len(b) for b in batches), 0.0, 0.0), path)
    return path
