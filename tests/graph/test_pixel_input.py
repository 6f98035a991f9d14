"""pixel_input: the graph maps its normalized input back to 8-bit pixels and its stem convolution reads them; the
int8 model quantizes those pixels with scale 1, so every pixel-derived input is exact in int8."""

import numpy as np
import onnx
import pytest
from onnx import helper

from quantize.core.runtime import make_session
from quantize.data.preprocess import Preprocess, normalize_batch
from quantize.graph.optimize import optimize
from quantize.graph.pixel_input import pixel_quantization
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.export import export_onnx
from quantize.stages.static_quant import quantize_model
from test_stem_channels import Stem
from zoo_models import assert_exact, ops

TORCHVISION = Preprocess()  # pixel / 255, ImageNet mean and std
MEGVII = Preprocess(color="bgr", scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))  # raw BGR pixels
LITE0 = Preprocess(scale=1.0, mean=(127, 127, 127), std=(128, 128, 128))  # one grid, a pixel level at zero


def _pixels(n=4, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def stem_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("pixels") / "stem.onnx"
    export_onnx(Stem().eval(), path, normalize_batch(_pixels(2), TORCHVISION))
    return onnx.load(str(path))


def test_normalized_input_becomes_pixels_exactly(stem_onnx):
    rewritten, report = optimize(stem_onnx, pixels=TORCHVISION.pixel_mapping())
    assert report.as_dict()["input_as_pixels"] == 1
    first = list(rewritten.graph.node)[:2]
    assert [n.op_type for n in first] == ["Conv", "Gather"]  # the mapping, then the stem's channel copy
    mapping, stem = first[0], next(n for n in rewritten.graph.node if n.op_type == "Conv" and n is not first[0])
    assert mapping.input[0] == "input" and first[1].input[0] == mapping.output[0]
    assert list(next(a.ints for a in stem.attribute if a.name == "pads")) == [0, 0, 0, 0]  # the mapping pads
    tensors, nodes, _ = pixel_quantization(rewritten)
    assert tensors == [mapping.output[0], first[1].output[0]] and nodes == [mapping.name]
    tensor = tensors[0]
    x = normalize_batch(_pixels(4), TORCHVISION)
    for batch in (1, 4):
        assert_exact(stem_onnx, rewritten, x[:batch])
    # the mapped tensor holds the pixels themselves (the padding ring: the mean, 0.485 * 255 for red)
    pixels = _outputs(rewritten, [tensor], x)[0]
    np.testing.assert_allclose(pixels[:, :, 1:-1, 1:-1], _pixels(4).transpose(0, 3, 1, 2), atol=1e-3)
    np.testing.assert_allclose(pixels[:, 0, 0, :], 0.485 * 255, atol=1e-3)


@pytest.mark.parametrize("preprocess, bounds", [(MEGVII, (0.0, 255.0)), (LITE0, (-127 / 128, 1.0))])
def test_input_on_one_pixel_grid_needs_no_mapping(stem_onnx, preprocess, bounds):
    rewritten, report = optimize(stem_onnx, pixels=preprocess.pixel_mapping())
    assert report.as_dict()["input_on_pixel_grid"] == 1
    assert ops(rewritten) == ops(optimize(stem_onnx)[0])  # nothing added: the input is exact on its own grid
    gather = next(n for n in rewritten.graph.node if n.op_type == "Gather")
    assert pixel_quantization(rewritten) == (["input", gather.output[0]], [], bounds)
    assert pixel_quantization(optimize(stem_onnx)[0]) is None


def test_input_read_by_anything_but_convolutions_is_left_alone(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten, report = optimize(model, pixels=TORCHVISION.pixel_mapping())
    assert report.as_dict().get("pixel_input_skipped") == 1
    assert ops(rewritten) == ops(model) and pixel_quantization(rewritten) is None


def _int8(stem_onnx, preprocess, tmp_path):
    """The rewritten graph and its int8 model, calibrated on dark images (a range far from the pixels')."""
    rewritten, _ = optimize(stem_onnx, pixels=preprocess.pixel_mapping())
    path = tmp_path / "pixels.onnx"
    onnx.save(rewritten, str(path))
    dark = normalize_batch(_pixels(4, seed=1) // 4, preprocess)
    ranges = tmp_path / "ranges.json"
    save_ranges(calibrate(path, [dark], method="minmax", optimize_graph=False), ranges)
    out = tmp_path / "pixels.int8.onnx"
    quantize_model(path, ranges, out, method="minmax", optimize_graph=False)
    return rewritten, onnx.load(str(out))


def test_int8_model_quantizes_pixels_exactly(stem_onnx, tmp_path):
    """The mapping stays fp32; its output is quantized with scale 1 and zero point 0 before the stem's channel copy:
    the integers are the pixels, whatever range the calibration images gave them."""
    rewritten, int8 = _int8(stem_onnx, TORCHVISION, tmp_path)
    (tensor, _), mapping, bounds = pixel_quantization(rewritten)
    assert bounds == (0.0, 255.0)
    assert [n.name for n in int8.graph.node if n.op_type == "Conv" and n.input[0] == "input"] == mapping  # fp32
    quant = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    assert any(n.op_type == "Gather" and n.input[0] == quant.output[0] for n in int8.graph.node)
    x = normalize_batch(_pixels(4, seed=2), TORCHVISION)
    quantized = _outputs(int8, [quant.output[0]], x)[0]
    np.testing.assert_array_equal(quantized[:, :, 1:-1, 1:-1], _pixels(4, seed=2).transpose(0, 3, 1, 2))
    assert set(np.unique(quantized[:, :, 0, :])) == {124, 116, 104}  # the ring: the mean, rounded


def test_int8_input_on_one_grid_holds_the_pixels(stem_onnx, tmp_path):
    """(pixel - 127) / 128 quantized with scale 1/128 and zero point 127: the integers are the pixels."""
    _, int8 = _int8(stem_onnx, LITE0, tmp_path)
    quant = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    x = normalize_batch(_pixels(4, seed=2), LITE0)
    np.testing.assert_array_equal(_outputs(int8, [quant.output[0]], x)[0], _pixels(4, seed=2).transpose(0, 3, 1, 2))


def _outputs(model, names, x):
    """The values of the tensors ``names`` of ``model`` for input ``x``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = make_session(exposed.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})
