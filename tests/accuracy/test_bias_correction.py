"""Post-training methods on tiny conv models: bias correction, GPTQ weight rounding, equalization, transfer."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantize.accuracy.bias_correction import channel_means, correct_biases
from quantize.accuracy.equalize import channel_max, equalize, find_pairs
from quantize.accuracy.refine import transfer
from quantize.core.runtime import make_session
from quantize.stages.static_quant import quantize_model
from quantize.accuracy.weight_rounding import round_weights

from accuracy_models import conv_net, images, minmax_ranges, save
from quantize.graph.optimize import optimize

CONVS = ["conv1", "conv2", "conv3"]


@pytest.fixture()
def quantized(tmp_path):
    """A conv net quantized with ranges 4x too wide, so rounding visibly shifts channel means."""
    model = conv_net(seed=3)
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = images(48)
    ranges = minmax_ranges(model, data, tmp_path / "ranges.json", widen=4.0)
    int8 = quantize_model(fp32, ranges, tmp_path / "int8.onnx", method="minmax").path
    # the fp32 graph quantize_model quantizes (as accuracy_stages.quantized_graph gives the pipeline)
    return optimize(model)[0], onnx.load(str(int8)), data


def _outputs(model, names):
    return [n.output[0] for n in model.graph.node if n.name in names]


def _mean_error(fp32, int8, data):
    ref, _ = channel_means(fp32, _outputs(fp32, CONVS), data)
    got, _ = channel_means(int8, _outputs(int8, CONVS), data)
    return [float(np.mean(np.abs(r - g))) for r, g in zip(ref, got)]


def _int_initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if numpy_helper.to_array(i).dtype in (np.int8, np.uint8, np.int32)}


def test_bias_correction_shrinks_the_mean_output_error_per_channel(quantized):
    fp32, int8, data = quantized
    before_ints = _int_initializers(int8)
    before = _mean_error(fp32, int8, data)
    result = correct_biases(fp32, int8, lambda: iter(data))
    after = _mean_error(fp32, int8, data)
    assert result.nodes == CONVS and result.num_images == 48
    assert sum(after) < 0.1 * sum(before)
    assert all(a <= b for a, b in zip(after, before))
    assert result.mean_abs_error_after < 0.1 * result.mean_abs_error_before
    assert result.mean_abs_error_before == pytest.approx(np.mean(before), rel=1e-6)
    # only int32 biases moved: weights, scales and zero points are untouched, and the model still loads
    changed = {n for n, v in _int_initializers(int8).items() if not np.array_equal(v, before_ints[n])}
    assert changed and all(before_ints[n].dtype == np.int32 for n in changed)
    onnx.checker.check_model(int8)
    make_session(int8.SerializeToString(), level="all")


def test_bias_correction_on_held_out_images_still_helps(quantized):
    fp32, int8, data = quantized
    held_out = images(48, seed=7)
    before = sum(_mean_error(fp32, int8, held_out))
    correct_biases(fp32, int8, lambda: iter(data))
    assert sum(_mean_error(fp32, int8, held_out)) < 0.5 * before


def _logits(model, data):
    session = make_session(model.SerializeToString(), level="all")
    return np.concatenate([session.run(None, {"x": b})[0] for b in data])


def test_gptq_rounding_lowers_each_layer_output_error(quantized):
    fp32, int8, data = quantized
    nearest = _int_initializers(int8)
    result = round_weights(fp32, int8, iter(data))
    assert result.layers == 3 and not result.skipped
    for layer in result.per_layer.values():
        assert layer["gptq_db"] >= layer["nearest_db"]
    assert result.output_error_gptq_db > result.output_error_nearest_db + 0.5
    assert 0 < result.changed_fraction < 0.6
    moved = {n for n, v in _int_initializers(int8).items() if not np.array_equal(v, nearest[n])}
    assert moved and all(nearest[n].dtype == np.int8 for n in moved)
    for name in moved:  # every weight stays within one level of nearest rounding... or the int8 range
        assert np.abs(_int_initializers(int8)[name].astype(int)).max() <= 127
    # what GPTQ optimizes: each layer's output on fp32 inputs. With only the weights quantized, the network's
    # output gets closer to fp32 than with nearest rounding, on the calibration images and on others
    for batches in (data, images(48, seed=9)):
        ref = _logits(fp32, batches)
        gptq_err = float(np.mean((_logits(_weights_only(fp32, int8), batches) - ref) ** 2))
        nearest_err = float(np.mean((_logits(_weights_only(fp32, int8, nearest), batches) - ref) ** 2))
        assert gptq_err < 0.8 * nearest_err


def _weights_only(fp32, int8, ints=None):
    """``fp32`` with each conv's weights replaced by the int8 model's dequantized weights (``ints`` overriding the
    integer values): weight quantization alone."""
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    if ints:
        inits.update(ints)
    dq = {n.output[0]: n for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    weights = {i.name: i for i in model.graph.initializer}
    for q_node, f_node in zip([n for n in int8.graph.node if n.op_type == "Conv"],
                              [n for n in model.graph.node if n.op_type == "Conv"]):
        d = dq[q_node.input[1]]
        scale = inits[d.input[1]].reshape(-1, 1, 1, 1)
        value = (inits[d.input[0]].astype(np.float32) - inits[d.input[2]].reshape(-1, 1, 1, 1)) * scale
        weights[f_node.input[1]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), f_node.input[1]))
    return model


def test_gptq_leaves_a_layer_alone_when_the_int8_weights_are_not_this_model_rounded(quantized):
    fp32, int8, data = quantized
    other = conv_net(seed=11)  # same graph, different weights: not what int8 was quantized from
    result = round_weights(other, int8, iter(data))
    assert result.layers == 0 and sorted(result.skipped) == CONVS


@pytest.mark.parametrize("relu6", [True, False], ids=["relu6", "relu"])
def test_equalization_keeps_the_function_and_fills_the_range(tmp_path, relu6):
    model = conv_net(seed=5, relu6=relu6, bias_offset=0.5)
    path = save(model, tmp_path / "fp32.onnx")
    data = images(32)
    pairs = find_pairs(model)
    assert [(p.a, p.b, p.depthwise_b) for p in pairs][0] == ("conv1", "conv2", True)
    result = equalize(path, tmp_path / "eq.onnx", iter(data))
    assert result.pairs[0]["scaled"] > 0
    equalized = onnx.load(str(tmp_path / "eq.onnx"))
    a, b = _logits(model, data), _logits(equalized, data)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # the first conv's channels now reach nearly the same maximum (the clip value, or the largest channel's)
    peaks = channel_max(equalized, ["a1"], iter(data))[0][0]
    before = channel_max(model, ["a1"], iter(data))[0][0]
    assert peaks.max() / peaks.min() < 1.5 < before.max() / before.min()
    if relu6:
        assert peaks.max() <= 6.0


def test_transfer_carries_refined_integers_to_another_quantization(tmp_path, quantized):
    fp32, int8, data = quantized
    base = onnx.ModelProto()
    base.CopyFrom(int8)
    correct_biases(fp32, int8, lambda: iter(data))
    assert transfer(int8, base) > 0
    assert _int_initializers(base).keys() == _int_initializers(int8).keys()
    for name, value in _int_initializers(int8).items():
        assert np.array_equal(_int_initializers(base)[name], value)


def test_gptq_ignores_inputs_that_are_always_zero():
    """A layer given zero-weighted inputs that never fire (the padding of ``channel_padding``, a dead channel) rounds
    its other weights exactly as without them: the damping scales with the live inputs' statistics only."""
    from quantize.accuracy.weight_rounding import _gptq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)) * np.geomspace(0.05, 3, 24)
    w = rng.standard_normal((16, 24))
    scale = np.abs(w).max(axis=1) / 127
    zero = np.zeros(16)
    alone = _gptq(w, x.T @ x, scale, zero, -127, 127, damp=0.01)
    padded_x = np.concatenate([x, np.zeros((500, 8))], axis=1)
    padded = _gptq(np.concatenate([w, np.zeros((16, 8))], axis=1), padded_x.T @ padded_x, scale, zero, -127, 127,
                   damp=0.01)
    np.testing.assert_array_equal(padded[:, :24], alone)
    assert not padded[:, 24:].any()
