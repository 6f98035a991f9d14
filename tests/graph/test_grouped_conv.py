"""grouped_conv: grouped pointwise convolutions as dense block-diagonal ones; the V1 shuffle folds into them."""

import numpy as np
import onnx
import pytest

from quantize.graph.optimize import optimize
from quantize.graph.onnx_graph import attr
from quantize.stages.export import export_onnx
from zoo_models import TinyV1, assert_exact, ops


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def v1(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("v1") / "model.onnx"
    export_onnx(TinyV1().eval(), path, images[:2])
    return onnx.load(str(path))


def _grouped(model):
    """Convolutions with 1 < group < input channels (grouped, not depthwise)."""
    weights = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and attr(n, "group", 1) > 1
            and weights[n.input[1]].dims[1] > 1]


def test_grouped_convs_become_dense_and_the_shuffle_folds_into_them(v1, images):
    assert len(_grouped(v1)) == 6  # compress and expand of three units
    optimized, report = optimize(v1)
    assert report.as_dict()["grouped_conv_densified"] == 6
    assert not _grouped(optimized)
    assert report.as_dict()["shuffle_folded_into_conv"] == 3  # every shuffle went into an expand conv's weights
    assert "Transpose" not in ops(optimized) and "Reshape" not in ops(optimized)
    # without the rewrite the shuffle before a grouped conv is cut into single channels
    kept, _ = optimize(v1, skip=("grouped_conv",))
    widest = max(len(n.input) for n in kept.graph.node if n.op_type == "Concat")
    assert widest > 8 and max(len(n.input) for n in optimized.graph.node if n.op_type == "Concat") <= 2
    for batch in (1, 4):
        assert_exact(v1, optimized, images[:batch])
