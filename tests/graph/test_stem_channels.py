"""stem_channels: the stem convolution reads a 4th, zero-weighted copy of an input channel; the int8 model quantizes
the input before copying it."""

import numpy as np
import onnx
import torch
from torch import nn

from quantize.core.runtime import make_session
from quantize.graph.optimize import optimize
from quantize.stages.calibrate import calibrate, save_ranges
from quantize.stages.export import export_onnx
from quantize.stages.static_quant import quantize_model
from zoo_models import Pooled, assert_exact, conv_bn, exported, ops, randomize_bn


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = conv_bn(3, 8, 3, 2)
        self.head = conv_bn(8, 16)
        randomize_bn(self)

    def forward(self, x):
        return self.head(nn.functional.max_pool2d(self.stem(x), 3, 2, 1)).mean((2, 3))


def _int8(tmp_path, model, name, images):
    """Calibrate and quantize an already rewritten graph (optimize_graph=False on both sides)."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    ranges = tmp_path / f"{name}.ranges.json"
    save_ranges(calibrate(path, [images], method="minmax", optimize_graph=False), ranges)
    out = tmp_path / f"{name}.int8.onnx"
    quantize_model(path, ranges, out, method="minmax", optimize_graph=False)
    return out


def test_stem_reads_four_channels_exactly(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "stem.onnx"
    export_onnx(Stem().eval(), path, x[:2])
    original = onnx.load(str(path))
    widened, report = optimize(original)
    assert report.as_dict()["stem_conv_widened"] == 1
    gather = next(n for n in widened.graph.node if n.op_type == "Gather")
    stem = next(n for n in widened.graph.node if n.op_type == "Conv" and n.input[0] == gather.output[0])
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in widened.graph.initializer}
    assert weights[stem.input[1]].shape[1] == 4 and not weights[stem.input[1]][:, 3].any()
    for batch in (1, 4):
        assert_exact(original, widened, x[:batch])
    again, report = optimize(widened)
    assert "stem_conv_widened" not in report.as_dict() and ops(again) == ops(widened)

    # int8: the input is quantized, then copied; the integers are those of the unwidened model
    narrow, _ = optimize(original, skip=("stem_channels",))
    wide_int8, narrow_int8 = _int8(tmp_path, widened, "wide", x), _int8(tmp_path, narrow, "narrow", x)
    nodes = list(onnx.load(str(wide_int8)).graph.node)
    quant = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert any(n.op_type == "Gather" and n.input[0] == quant.output[0] for n in nodes)
    got = make_session(wide_int8).run(None, {"input": x})[0]
    want = make_session(narrow_int8).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)


def test_the_stem_before_a_max_pool_is_found_and_padded_exactly_through_it(tmp_path):
    from quantize.graph.stem_channels import pad_float_stem, pooled_stem

    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    original = exported(Pooled(), tmp_path / "pooled.onnx", x)
    rewritten, report = optimize(original)
    assert "zero_channels_added" not in report.as_dict()  # the int8 stem is not padded through its pool
    stem = pooled_stem(rewritten)
    assert stem is not None and stem == pooled_stem(original)  # read through the widening Gather too
    padded, added = pad_float_stem(rewritten, stem)
    assert added == 8
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in padded.graph.initializer}
    shapes = {n.name.split("/")[1]: weights[n.input[1]].shape for n in padded.graph.node if n.op_type == "Conv"}
    assert shapes["stem"][0] == 32 and shapes["dw"] == (32, 1, 3, 3)
    assert shapes["pw"][1] == 32 and shapes["pw_dw"][1] == 32
    for batch in (1, 3):
        assert_exact(original, padded, x[:batch])


def test_a_stem_whose_pool_feeds_a_concat_cannot_fill_the_blocks(tmp_path):
    from quantize.graph.stem_channels import fills_blocks, pad_float_stem, pooled_stem

    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    plain = exported(Pooled(), tmp_path / "a.onnx", x)
    assert fills_blocks(plain, pooled_stem(plain))
    shortcut = exported(Pooled(shortcut=True), tmp_path / "b.onnx", x)
    stem = pooled_stem(shortcut)
    assert stem is not None and pad_float_stem(shortcut, stem)[1] == 0 and not fills_blocks(shortcut, stem)

    # so quant.float_stem leaves that stem in int8
    path = tmp_path / "b.rewritten.onnx"
    onnx.save(optimize(shortcut)[0], str(path))
    ranges = tmp_path / "ranges.json"
    save_ranges(calibrate(path, [x], method="minmax", optimize_graph=False), ranges)
    int8 = quantize_model(path, ranges, tmp_path / "b.int8.onnx", method="minmax", optimize_graph=False,
                          float_stem=True)
    first = next(n for n in onnx.load(str(int8.path)).graph.node if n.op_type == "Conv")
    assert int8.fp32_path is None and first.input[1].endswith("DequantizeLinear_Output")


def test_no_pooled_stem_without_a_max_pool_or_behind_another_activation(tmp_path):
    from quantize.graph.stem_channels import pooled_stem

    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert pooled_stem(exported(Pooled(pool=False), tmp_path / "a.onnx", x)) is None
    assert pooled_stem(exported(Pooled(activation=nn.SiLU()), tmp_path / "b.onnx", x)) is None
    assert pooled_stem(exported(Pooled(activation=nn.ReLU6()), tmp_path / "c.onnx", x)) is not None
