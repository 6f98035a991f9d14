"""The accuracy stages inside the pipeline: off by default, and every report field when switched on."""

import json
from collections import Counter

import onnx
import pytest
from PIL import Image

from quantize.graph.pixel_input import pixel_quantization
from quantize.pipeline.runner import Pipeline

from conftest import write_tiny_imagenet
from test_pipeline import compose_config, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    data = write_tiny_imagenet(root / "val", classes=(3, 250, 999, 5, 7, 9), per_class=2)
    return root, data


def test_plain_recipe_leaves_the_pipeline_unchanged(tiny):
    root, data = tiny
    cfg = compose_config(tiny_overrides(data, root / "work"))
    q, a = cfg.quant, cfg.analysis
    assert (q.equalize, q.weight_rounding, q.bias_correction, q.max_drop) == (False, "nearest", False, None)
    assert (q.balance, q.shared_concat_ranges, q.weight_scales, q.pixel_input) == (False, False, "max", False)
    assert (a.sensitivity, a.speed) == (False, False)
    pipeline = Pipeline(cfg, root / "run-plain")
    report = pipeline.run()
    assert set(pipeline.records) == {"export", "optimize", "calibrate", "quantize", "evaluate"}
    assert report["onnx"]["int8_path"] == report["onnx"]["int8_quantizer_path"]
    assert report["eval"]["num_images"] == 12
    assert report["methods"]["label"] == "ort"
    assert report["budget"] is None and report["sensitivity"] is None and report["speed"] is None
    assert not (root / "run-plain" / "sensitivity.png").exists()


def test_default_recipe_runs_its_stages(tiny):
    """No quant/calib override: MSE ranges, range balancing, shared Concat ranges, weight-scale search, GPTQ, the stem
    in fp32."""
    root, data = tiny
    cfg = compose_config(tiny_overrides(data, root / "work", plain=False))
    q = cfg.quant
    assert cfg.calib.method == "mse"
    assert (q.balance, q.shared_concat_ranges, q.weight_scales, q.weight_rounding) == (True, True, "search", "gptq")
    assert (q.equalize, q.bias_correction, q.max_drop, q.pixel_input) == (False, False, None, False)
    pipeline = Pipeline(cfg, root / "run-default")
    report = pipeline.run()
    assert set(pipeline.records) == {"export", "balance", "optimize", "calibrate", "quantize", "refine", "evaluate"}
    assert report["methods"]["label"] == "balance+concat+wscale+gptq+fp32stem"
    assert report["methods"]["float_stem_details"] == {"stem": "/conv1/conv1.0/Conv"}
    int8 = onnx.load(report["onnx"]["int8_path"])
    stem = next(n for n in int8.graph.node if n.op_type == "Conv")
    assert stem.input[0] == "input" and stem.input[1] in {i.name for i in int8.graph.initializer}  # fp32, unquantized
    m = report["methods"]
    # every int8 layer is refined, the pool's padded readers too: refine reads the graph the quantizer read
    dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    int8_layers = Counter(n.op_type for n in int8.graph.node if n.op_type in ("Conv", "Gemm")
                          and n.input[1] in dequantized)
    assert m["weight_scales_details"]["layers"] == int8_layers["Conv"] + int8_layers["Gemm"]
    assert m["weight_rounding_details"]["layers"] == int8_layers["Conv"]  # GPTQ rounds convolutions
    assert m["balance_details"]["chains"] > 0  # ShuffleNetV2's stem and branch convolutions
    assert m["shared_ranges_details"]["groups"] > 0
    assert m["weight_scales_details"]["layers"] > 0
    assert m["weight_scales_details"]["error_searched"] <= m["weight_scales_details"]["error_max_scale"]
    assert m["weight_rounding_details"]["layers"] > 0
    assert report["onnx"]["int8_path"] != report["onnx"]["int8_quantizer_path"]
    assert report["eval"]["num_images"] == 12
    # the plain run is not disturbed by the default's artifacts, and the export is shared
    assert report["stages"]["export"]["cached"]


def test_pixel_input_option_reaches_the_int8_model(tiny):
    """quant.pixel_input=true on the default recipe: the optimized graph maps its input to pixels and the final int8
    model (after GPTQ) quantizes them with scale 1 and zero point 0."""
    root, data = tiny
    cfg = compose_config([*tiny_overrides(data, root / "work", plain=False), "quant.pixel_input=true"])
    pipeline = Pipeline(cfg, root / "run-pixels")
    report = pipeline.run()
    assert report["methods"]["label"] == "pixels+balance+concat+wscale+gptq"
    assert pipeline.records["optimize"].rewrites["input_as_pixels"] == 1
    (pixels, _), mapping, _ = pixel_quantization(onnx.load(pipeline.records["optimize"].path))
    int8 = onnx.load(report["onnx"]["int8_path"])
    values = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer}
    values.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in int8.graph.node
                   if n.op_type == "Constant"})
    quant = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pixels)
    assert float(values[quant.input[1]]) == 1.0 and int(values[quant.input[2]]) == 0
    assert [n.op_type for n in int8.graph.node if n.name in mapping] == ["Conv"]  # the mapping, in fp32


def test_accurate_preset_composes():
    cfg = compose_config(["+model=efficientnet_lite0", "quant=u8s8_accurate"])
    q = cfg.quant
    assert (q.format, q.activation_type, q.weight_type, q.per_channel) == ("qdq", "uint8", "int8", True)
    assert (q.weight_rounding, q.bias_correction, q.equalize, q.max_drop) == ("gptq", False, False, None)


def test_every_method_budget_sensitivity_and_speed_end_to_end(tiny):
    root, data = tiny
    overrides = tiny_overrides(data, root / "work", "quant.equalize=true", "quant.weight_rounding=gptq",
                               "quant.bias_correction=true", "quant.max_drop=-1", "quant.max_trials=2",
                               "quant.tune_images=4", "analysis.sensitivity_images=4", "analysis.speed_runs=3",
                               "analysis.sensitivity=true", "analysis.speed=true")
    pipeline = Pipeline(compose_config(overrides), root / "run-all")
    report = pipeline.run()
    assert {"equalize", "refine", "budget", "sensitivity", "speed"} <= set(pipeline.records)
    assert report["stages"]["export"]["cached"]  # shared with the default run: only the new stages ran

    # the tuning images are left out of the final evaluation
    assert report["budget"]["tune_images"] == 4 and report["eval"]["num_images"] == 12 - 4
    assert report["methods"]["label"] == "eq+gptq+bc+budget-1"
    assert report["methods"]["equalize_details"]["pairs"] > 0
    assert report["methods"]["weight_rounding_details"]["layers"] > 0
    b = report["methods"]["bias_correction_details"]
    assert b["mean_abs_error_after"] < b["mean_abs_error_before"]
    budget = report["budget"]
    assert not budget["met"]  # a negative budget cannot be met: every trial is spent
    assert len(budget["trials"]) == 1 + 2 and budget["trials"][0]["candidate"] is None
    assert budget["ranking"][:2] == [t["candidate"] for t in budget["trials"][1:]]
    assert report["sensitivity"]["num_tensors"] > 10 and report["sensitivity"]["worst"]
    speed = report["speed"]
    assert set(speed["ms"]) >= {"fp32", "int8"} and speed["int8_speedup"] == speed["speedup"]["int8"]
    assert speed["speedup"]["int8"] == pytest.approx(speed["ms"]["fp32"] / speed["ms"]["int8"])
    assert report["onnx"]["int8_path"].endswith("model.int8.onnx") and "budget-" in report["onnx"]["int8_path"]

    run = root / "run-all"
    with Image.open(run / "sensitivity.png") as image:
        assert image.format == "PNG"
    markdown = (run / "report.md").read_text()
    for heading in ("## Methods", "## Speed", "## Accuracy budget", "## Sensitivity: where int8 loses"):
        assert heading in markdown
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["budget"]["fp32_nodes"] == budget["fp32_nodes"]

    again = Pipeline(compose_config(overrides), root / "run-again").run()
    assert all(s["cached"] for s in again["stages"].values())
    assert again["speed"] == report["speed"]  # measured once per model pair: reruns are byte-stable
    assert again["int8"] == report["int8"]
