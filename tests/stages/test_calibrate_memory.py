"""Calibration: which tensors are measured, exactness of chunked statistics, and the evaluation workers."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quantize.graph import optimize as graph_opt
from quantize.stages.calibrate import EXPOSED_BATCH, _run_in_thread, activation_tensors, calibrate, range_plan
from quantize.stages.evaluate import evaluate
from quantize.stages.export import export_onnx
from quantize.stages.histogram import StreamingHistogram
from quantize.core.runtime import make_session


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), nn.ReLU6())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(13, 3, 24, 24)).astype(np.float32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("net") / "model.onnx"
    export_onnx(Net().eval(), path, images[:2])
    return path


def _exposed(model_path, images):
    """Every activation of the rewritten graph on ``images``, from a plain session that exposes them."""
    model, _ = graph_opt.optimize(onnx.load(str(model_path)))
    names = activation_tensors(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present and name != "input":
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(model.SerializeToString(), level="disable")
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images})))
    values["input"] = images
    return model, values


def test_plan_measures_only_tensors_whose_range_is_their_own(model_path):
    model, _ = graph_opt.optimize(onnx.load(str(model_path)))
    tensors = activation_tensors(model)
    plan = range_plan(model, tensors)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    for name, source in plan.derived.items():
        assert source in plan.measured
        # a conv output read only by its activation takes the activation's range; a Flatten output its input's, and
        # so does the widened stem input (a Gather repeating an input channel, graph.stem_channels)
        assert readers.get(name) in (["Relu"], ["Clip"]) or producers.get(name) in ("Flatten", "Reshape", "Gather")
    assert set(plan.measured) | set(plan.derived) == set(tensors)


def test_minmax_is_exact(model_path, images):
    _, values = _exposed(model_path, images)
    result = calibrate(model_path, [images[:5], images[5:]], method="minmax")
    plan = range_plan(*(lambda m: (m, activation_tensors(m)))(graph_opt.optimize(onnx.load(str(model_path)))[0]))
    for name in plan.measured:
        lo, hi = result.ranges[name]
        scale = max(1.0, float(np.abs(values[name]).max()))
        assert abs(lo - values[name].min()) <= 1e-5 * scale and abs(hi - values[name].max()) <= 1e-5 * scale


@pytest.mark.parametrize("percentile", [99.0, 99.99])
def test_chunked_percentiles_equal_a_single_pass_within_two_bins(model_path, images, percentile):
    """Batches of 1, 5 and 7 images (cut again into chunks of EXPOSED_BATCH) against one histogram of all values."""
    _, values = _exposed(model_path, images)
    result = calibrate(model_path, [images[:1], images[1:6], images[6:]], method="percentile", percentile=percentile,
                       num_bins=1024)
    plan = range_plan(*(lambda m: (m, activation_tensors(m)))(graph_opt.optimize(onnx.load(str(model_path)))[0]))
    for name in plan.measured:
        single = StreamingHistogram(1024)
        single.add(values[name])
        want = single.percentile_range(percentile)
        got = result.ranges[name]
        tolerance = 2 * single.width + 1e-5 * max(1.0, float(np.abs(values[name]).max()))
        assert abs(got[0] - want[0]) <= tolerance and abs(got[1] - want[1]) <= tolerance, name
    for name, source in plan.derived.items():
        assert result.ranges[name] == result.ranges[source]


def test_binning_threads_do_not_change_the_result(model_path, images):
    model, _ = graph_opt.optimize(onnx.load(str(model_path)))
    from quantize.stages.calibrate import _calibration_graph, _per_image_shapes
    plan = range_plan(model, activation_tensors(model))
    calib, mins, maxs = _calibration_graph(model, plan.measured, True)
    shapes = _per_image_shapes(calib, plan.measured)
    results = []
    for workers in (1, 2):
        session = make_session(calib.SerializeToString(), memory_pattern=False)
        ranges, count = _run_in_thread(session, plan.measured, mins, maxs, shapes, [images], "percentile",
                                          99.9, 512, workers=workers)
        assert count == len(images)
        results.append(ranges)
    assert results[0] == results[1]
    assert EXPOSED_BATCH < len(images)  # the batch was really cut into chunks


def test_nan_in_an_activation_is_a_model_error(model_path, images):
    from quantize.core.errors import ModelError
    broken = images.copy()
    broken[3, 0, 0, 0] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        calibrate(model_path, [broken], method="percentile")


def test_evaluation_workers_agree(model_path, images):
    labels = np.arange(len(images)) % 10
    batches = [(images[:4], labels[:4]), (images[4:9], labels[4:9]), (images[9:], labels[9:])]
    one = evaluate({"a": model_path, "b": model_path}, batches, workers=1)
    two = evaluate({"a": model_path, "b": model_path}, batches, threads=2, workers=2)
    assert one.num_images == two.num_images == len(images)
    assert one.top1 == two.top1 and one.top5 == two.top5 and two.agreement_top1 == 100.0
    assert set(two.stage_images_per_second) == {"input", "a", "b"}


def test_evaluation_reports_decoding_as_a_stage(model_path, tmp_path):
    from conftest import write_tiny_imagenet
    from quantize.data.samples import iter_batches, list_samples
    from quantize.data.preprocess import Preprocess

    root = write_tiny_imagenet(tmp_path / "val", per_class=2)
    samples = list_samples(root)
    p = Preprocess(resize=28, crop=24)
    batches = iter_batches(samples, 4, p, workers=2)
    result = evaluate({"fp32": model_path, "int8": model_path}, batches, threads=2)
    assert batches.stats.images == len(samples) and batches.stats.decode_seconds > 0
    assert set(result.stage_images_per_second) == {"decode", "input", "fp32", "int8"}
    assert all(rate > 0 for rate in result.stage_images_per_second.values())


def test_stages_after_export_do_not_load_torch():
    """torch holds ~470 MiB resident once imported: a run whose export is cached (or a BYO ONNX model) must not
    import it, so calibration and evaluation run in the memory they need."""
    code = ("import sys; import quantize.__main__, quantize.pipeline.runner, quantize.jobs.release, quantize.jobs.sweep; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_weight_passed_through_identity_is_not_an_activation(tmp_path):
    """The TorchScript exporter writes a shared weight as Identity(weight): a constant, never measured."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_shared"]),
         helper.make_node("Conv", ["input", "w_shared"], ["features"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["features"], ["logits"])],
        "shared", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    assert activation_tensors(model) == ["input", "features", "logits"]
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    images = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    calibration = calibrate(path, [images], method="percentile", optimize_graph=False)
    assert set(calibration.ranges) == {"input", "features", "logits"}
