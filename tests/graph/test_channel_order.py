"""channel_order: convolutions compute their channels in the order their readers take them (Megvii's even/odd
split), so the dataflow pass cuts few chunks instead of single channels."""

import numpy as np
import onnx
import pytest

from quantize.graph.optimize import optimize
from quantize.stages.export import export_onnx
from zoo_models import TinyMegvii, assert_exact, ops


@pytest.fixture(scope="module")
def megvii(tmp_path_factory):
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("megvii") / "model.onnx"
    export_onnx(TinyMegvii().eval(), path, x[:2])
    return onnx.load(str(path)), x


def _concat_inputs(model):
    return sum(len(n.input) for n in model.graph.node if n.op_type == "Concat")


def test_strided_readers_get_contiguous_chunks(megvii):
    original, x = megvii
    optimized, report = optimize(original)
    unordered, _ = optimize(original, skip=("channel_order",))
    counts = report.as_dict()
    assert counts["conv_outputs_reordered"] >= 4  # the stem and each block's last conv
    assert counts["channel_chunks_saved"] > 0
    assert "Slice" not in ops(optimized) and "Gather" not in ops(optimized) - ops(unordered)
    assert _concat_inputs(optimized) * 2 <= _concat_inputs(unordered)
    for batch in (1, 4):
        assert_exact(original, optimized, x[:batch])
        assert_exact(original, unordered, x[:batch])


def test_reordering_is_stable_when_repeated(megvii):
    original, x = megvii
    once, _ = optimize(original)
    twice, report = optimize(once)
    assert "conv_outputs_reordered" not in report.as_dict()
    assert ops(twice) == ops(once)
    assert_exact(original, twice, x)
