"""Sensitivity analysis: SQNR of quantized activations against fp32, on models whose answer is known."""

import json
import math

import numpy as np
import onnx
import pytest

from quantize.pipeline.plots import sqnr_bars
from quantize.accuracy.sensitivity import analyze, match_activations, render_table
from quantize.graph.optimize import optimize
from quantize.stages.static_quant import quantize_model

from accuracy_models import conv_net, images, minmax_ranges, relu_then_qdq, save


def uniform_batches(n=64, seed=0, grid=None):
    rng = np.random.default_rng(seed)
    data = rng.uniform(0.0, 1.0, (n, 4, 8, 8)).astype(np.float32)
    if grid is not None:  # values exactly on the quantization grid: quantization is lossless
        data = np.round(data / grid) * grid
    return [data[i:i + 16] for i in range(0, n, 16)]


@pytest.mark.parametrize("levels", [255, 15])
def test_sqnr_of_uniform_data_matches_theory(tmp_path, levels):
    """Uniform [0, 1] values rounded with step 1/levels: noise power step^2/12, signal power 1/3, so
    SQNR = 10 log10(4 levels^2): 54.2 dB at 8 bits, 29.5 dB for a deliberately coarse 4-bit step."""
    fp32, int8 = relu_then_qdq(scale=1.0 / levels)
    result = analyze(save(fp32, tmp_path / "f.onnx"), save(int8, tmp_path / "q.onnx"), uniform_batches())
    (y,) = result.tensors
    assert (y.tensor, y.int8_tensor, y.producer, y.op_type, y.consumers) == (
        "y", "y_DequantizeLinear_Output", "relu", "Relu", ["id"])
    assert y.count == 64 * 4 * 8 * 8
    assert y.sqnr_db == pytest.approx(10 * math.log10(4 * levels ** 2), abs=0.3)
    assert result.output_sqnr_db == pytest.approx(y.sqnr_db, abs=1e-6)


def test_lossless_quantization_has_infinite_sqnr(tmp_path):
    fp32, int8 = relu_then_qdq(scale=1.0 / 255)
    result = analyze(save(fp32, tmp_path / "f.onnx"), save(int8, tmp_path / "q.onnx"),
                     uniform_batches(grid=1.0 / 255))
    assert result.tensors[0].noise == 0 and math.isinf(result.tensors[0].sqnr_db)
    row = result.as_json()["tensors"][0]
    assert row["sqnr_db"] is None  # JSON has no infinity
    json.dumps(result.as_json(), allow_nan=False)
    assert "| inf |" in "\n".join(render_table(result))


def test_real_quantizer_output_coarse_ranges_rank_lower(tmp_path):
    """The ONNX Runtime quantizer's QDQ model: every activation is matched to its fp32 tensor, and ranges made
    20x too wide (a deliberately coarse quantization) cost well over 10 dB everywhere."""
    model = conv_net()
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = images(32)
    results = {}
    for name, widen in (("fine", 1.0), ("coarse", 20.0)):
        ranges = minmax_ranges(model, data, tmp_path / f"{name}.json", widen=widen)
        int8 = quantize_model(fp32, ranges, tmp_path / f"{name}.int8.onnx", method="minmax").path
        results[name] = analyze(fp32, int8, data)
    fine, coarse = results["fine"], results["coarse"]
    pairs = match_activations(onnx.load(str(fp32)), onnx.load(str(tmp_path / "fine.int8.onnx")))
    assert [p.fp32 for p in pairs] == [t.tensor for t in fine.tensors]
    assert {"a1", "a2", "c3"} <= {t.tensor for t in fine.tensors}
    # the stem reads the quantized input through graph.stem_channels' Gather, a tensor of the rewritten graph
    # (the pipeline compares against that graph, accuracy_stages.quantized_graph): matched there
    rewritten = tmp_path / "fp32.rewritten.onnx"
    onnx.save(optimize(model)[0], str(rewritten))
    widened = next(n.output[0] for n in onnx.load(str(rewritten)).graph.node if n.op_type == "Gather")
    rewritten_pairs = match_activations(onnx.load(str(rewritten)), onnx.load(str(tmp_path / "fine.int8.onnx")))
    assert {widened, "a1", "a2", "c3"} <= {p.fp32 for p in rewritten_pairs}
    assert all(t.count > 0 for t in fine.tensors)
    assert fine.output_sqnr_db > 25
    assert coarse.output_sqnr_db < fine.output_sqnr_db - 10
    by_name = {t.tensor: t for t in fine.tensors}
    for t in coarse.tensors:
        assert t.sqnr_db < by_name[t.tensor].sqnr_db
    ranked = fine.ranked()
    assert [t.sqnr_db for t in ranked] == sorted(t.sqnr_db for t in ranked)
    rewritten_fine = analyze(rewritten, tmp_path / "fine.int8.onnx", data)
    stem_input = {t.tensor: t for t in rewritten_fine.tensors}[widened]
    # the (widened) graph input inherits nothing: what it loses is what its own rounding adds
    assert stem_input.added_db == pytest.approx(math.inf) or stem_input.inputs == []


def test_sqnr_plot_is_a_png(tmp_path):
    from PIL import Image

    path = sqnr_bars(tmp_path / "s.png", ["a", "b", "c"], [30.0, math.inf, 12.5], "title", highlight=1)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_command_line_report_for_any_pair(tmp_path, capsys):
    from quantize.accuracy.sensitivity import main

    from conftest import write_tiny_imagenet

    model = conv_net(size=None)  # any image size: the command line feeds 224x224 crops
    fp32 = save(model, tmp_path / "fp32.onnx")
    ranges = minmax_ranges(model, images(16), tmp_path / "r.json")
    int8 = quantize_model(fp32, ranges, tmp_path / "int8.onnx", method="minmax").path
    photos = write_tiny_imagenet(tmp_path / "val", classes=(1, 2), per_class=2)
    assert main([str(fp32), str(int8), "--data", str(photos), "--images", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "over 3 images" in printed and "| rank | tensor |" in printed
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert data["num_images"] == 3 and len(data["tensors"]) >= 4
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    assert main([str(fp32), str(tmp_path / "missing.onnx"), "--data", str(photos)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
