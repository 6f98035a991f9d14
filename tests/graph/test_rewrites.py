"""graph_opt: fp32-exact rewrites (shape arithmetic, Pad into Conv, channel shuffles), and what ONNX Runtime then
makes of the int8 model."""

import collections

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

from quantize.graph import optimize as graph_opt
from quantize.stages.calibrate import activation_tensors, calibrate, save_ranges
from quantize.stages.export import export_onnx
from quantize.core.runtime import make_session
from quantize.stages.static_quant import quantize_model


class Unit(nn.Module):
    """A ShuffleNetV2 stride-1 unit: split, branch on one half, concat, shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
                                    nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleTiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU6())
        self.units = nn.Sequential(Unit(16), Unit(16), Unit(16))
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)
        for m in self.modules():  # BN statistics that are not the identity, so folding leaves real biases
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(F.pad(x, (0, 1, 0, 1)))  # TensorFlow-style "same" padding, exported as Pad
        x = self.units(x)
        x = self.head(self.down(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("shuffle") / "model.onnx"
    export_onnx(ShuffleTiny().eval(), path, images[:2])
    return path


def _only_stem_gather(model):
    """The one Gather left is stem_channels' copy of an input channel for the stem convolution."""
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    return len(gathers) == 1 and gathers[0].input[0] == model.graph.input[0].name


def _outputs(model, x, level="disable"):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return make_session(source, level=level).run(None, {"input": x})[0]


def test_rewrites_keep_the_fp32_function(exported, images):
    original = onnx.load(str(exported))
    ops_before = collections.Counter(n.op_type for n in original.graph.node)
    assert {"Shape", "Pad", "Transpose", "Slice"} <= set(ops_before)  # what the exporter left
    optimized, report = graph_opt.optimize(original)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    assert not {"Shape", "Pad", "Transpose", "Reshape", "Slice", "Unsqueeze", "Constant"} & set(ops)
    assert _only_stem_gather(optimized)
    assert ops["Split"] and ops["Concat"] and ops["Conv"] == ops_before["Conv"]
    counts = report.as_dict()
    assert counts["pad_folded_into_conv"] == 1 and counts["channel_shuffle_rewritten"] == 3
    for batch in (1, 6):  # the dynamic batch survives
        want = _outputs(original, images[:batch])
        got = _outputs(optimized, images[:batch])
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def test_rewrite_leaves_its_input_alone_and_does_not_grow_when_repeated(exported, images):
    original = onnx.load(str(exported))
    before = original.SerializeToString()
    once, _ = graph_opt.optimize(original)
    assert original.SerializeToString() == before
    twice, _ = graph_opt.optimize(once)
    assert collections.Counter(n.op_type for n in twice.graph.node) == \
        collections.Counter(n.op_type for n in once.graph.node)
    np.testing.assert_allclose(_outputs(twice, images), _outputs(once, images), rtol=0, atol=1e-5)


def test_int8_model_runs_without_layout_transposes_or_float_islands(tmp_path, exported, images):
    calibration = calibrate(exported, [images[:4], images[4:]], method="minmax")
    ranges = tmp_path / "ranges.json"
    save_ranges(calibration, ranges)
    out = tmp_path / "model.int8.onnx"
    quantize_model(exported, ranges, out, method="minmax")
    make_session(out, optimized_model_path=tmp_path / "ort.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
    assert ops["QLinearConv"] == 12 and "Conv" not in ops and "Pad" not in ops
    assert ops["Transpose"] <= 2  # the network input into channels-last, the pooled output back
    fp32 = _outputs(onnx.load(str(exported)), images, level="all")
    int8 = make_session(out).run(None, {"input": images})[0]
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.98


def test_calibration_names_the_tensors_of_the_rewritten_graph(exported, images):
    calibration = calibrate(exported, [images], method="percentile", percentile=99.9)
    optimized, _ = graph_opt.optimize(onnx.load(str(exported)))
    assert set(calibration.ranges) == set(activation_tensors(optimized))
    assert calibration.measured < len(calibration.ranges)  # activation inputs and split chunks derive their range


def test_stale_ranges_are_a_clear_error(tmp_path, exported, images):
    calibration = calibrate(exported, [images], method="minmax", optimize_graph=False)
    ranges = tmp_path / "ranges.json"
    save_ranges(calibration, ranges)
    from quantize.core.errors import ModelError
    with pytest.raises(ModelError, match="rerun the calibrate stage"):
        quantize_model(exported, ranges, tmp_path / "x.onnx", method="minmax")


def _torchvision_shufflenet(tmp_path):
    """torchvision's ShuffleNetV2 x0.5 (random init) as exported, and an input for it."""
    from torchvision.models import shufflenet_v2_x0_5

    torch.manual_seed(0)
    model = shufflenet_v2_x0_5(weights=None).eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    path = tmp_path / "shufflenet.onnx"
    export_onnx(model, path, x)
    return onnx.load(str(path)), x


def test_torchvision_shufflenet_rewrite_is_exact(tmp_path):
    original, x = _torchvision_shufflenet(tmp_path)
    optimized, report = graph_opt.optimize(original)
    assert report.as_dict()["channel_shuffle_rewritten"] == 16
    ops = {n.op_type for n in optimized.graph.node}
    assert not {"Shape", "Transpose", "Reshape", "Slice", "Identity"} & ops
    assert _only_stem_gather(optimized)
    want, got = _outputs(original, x), _outputs(optimized, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def test_the_fp32_baseline_of_the_speed_benchmarks_takes_the_layout_rewrites_only(tmp_path):
    """``exact_fp32`` (what bench-zoo and make bench time int8 against besides the export): the shuffle as Split and
    Concat, no shape arithmetic, and none of the widenings that only help int8 kernels; the same outputs."""
    original, x = _torchvision_shufflenet(tmp_path)
    baseline = graph_opt.exact_fp32(original)
    ops = collections.Counter(n.op_type for n in baseline.graph.node)
    assert not {"Shape", "Transpose", "Reshape", "Slice", "Gather"} & set(ops) and ops["Split"] and ops["Concat"]
    def conv_shapes(m):
        shapes = {i.name: numpy_helper.to_array(i).shape for i in m.graph.initializer}
        return sorted(shapes[n.input[1]] for n in m.graph.node if n.op_type == "Conv" and n.input[1] in shapes)

    assert conv_shapes(baseline) == conv_shapes(original)  # no zero channels, no 4th stem input channel
    assert conv_shapes(graph_opt.optimize(original)[0]) != conv_shapes(original)  # which the int8 graph gets
    want, got = _outputs(original, x), _outputs(baseline, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


class StridedShuffle(nn.Module):
    """Megvii's formulation: even and odd channels by strided slicing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        even, odd = y[:, 0::2], y[:, 1::2]
        return self.c(torch.cat((even, torch.relu(self.b(odd))), dim=1)).mean((2, 3))


def test_strided_channel_slices_become_splits(tmp_path, images):
    path = tmp_path / "strided.onnx"
    export_onnx(StridedShuffle().eval(), path, images[:2])
    original = onnx.load(str(path))
    optimized, _ = graph_opt.optimize(original)
    assert "Slice" not in {n.op_type for n in optimized.graph.node}
    want, got = _outputs(original, images), _outputs(optimized, images)
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
