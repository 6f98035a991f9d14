"""make bench-accuracy: cross-validated fidelity with held-out views and standard errors."""

import json
from pathlib import Path

import numpy as np
import onnx
from omegaconf import OmegaConf
import pytest
from PIL import Image

from quantize.bench.accuracy import fold_metrics, folds_of, main, views_of
from quantize.core.errors import QuantizeError
from quantize.data.samples import list_samples

from conftest import write_tiny_imagenet


def test_folds_are_disjoint_class_balanced_and_cover_everything(tmp_path):
    samples = list_samples(write_tiny_imagenet(tmp_path / "val", classes=(3, 250, 999), per_class=2))
    parts = folds_of(samples, 2)
    assert sorted(s.path for p in parts for s in p) == sorted(s.path for s in samples)
    assert not {s.path for s in parts[0]} & {s.path for s in parts[1]}
    assert [sorted(s.label for s in p) for p in parts] == [[3, 250, 999]] * 2
    with pytest.raises(QuantizeError):
        folds_of(samples, 1)


def test_views_are_the_photo_its_mirror_and_crops():
    pixels = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)
    image = Image.fromarray(pixels)
    views = views_of(image, 12)
    assert np.array_equal(np.asarray(views[0]), pixels)
    assert np.array_equal(np.asarray(views[1]), pixels[:, ::-1])
    assert views[2].size == (34, 26) and np.array_equal(np.asarray(views[2]), pixels[:26, :34])
    assert len({np.asarray(v).tobytes() for v in views}) == 12
    with pytest.raises(QuantizeError):
        views_of(image, 13)


def test_metrics_pair_the_drop_and_cluster_agreement_by_photo():
    labels = np.array([0, 1, 2, 3])
    pred = {"fp32": np.array([[0, 0], [1, 1], [2, 2], [9, 9]]),
            "int8": np.array([[0, 0], [1, 5], [7, 7], [3, 9]])}
    m = fold_metrics(pred, labels)
    assert (m["fp32_top1"], m["int8_top1"], m["drop"]) == (75.0, 75.0, 0.0)
    diff = np.array([0, 0, 1, -1])
    assert m["drop_se"] == pytest.approx(100 * diff.std(ddof=1) / 2)
    per_photo = np.array([1, 0.5, 0, 0.5])
    assert m["agreement"] == pytest.approx(50.0)
    assert m["agreement_se"] == pytest.approx(100 * per_photo.std(ddof=1) / 2)
    assert m["photo_agreement"] == 50.0 and m["views"] == 8


def test_end_to_end_on_a_tiny_folder(tmp_path):
    data = write_tiny_imagenet(tmp_path / "val", classes=(3, 250, 999), per_class=2)
    out = tmp_path / "acc.json"
    code = main(["--model", "shufflenet_v2_x0_5", "--root", str(data), "--views", "2", "--threads", "1",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--decompose", "quantizers",
                 "--activation-bits", "10",
                 "model.pretrained=false",
                 "export.check_images=2", "calib.batch_size=3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert [f["calibration_images"] for f in result["folds"]] == [3, 3]
    assert result["all"]["photos"] == 6 and result["all"]["views"] == 12
    assert 0 <= result["all"]["agreement"] <= 100 and result["load_average"]
    assert "| all | 6 |" in out.with_suffix(".md").read_text()
    halves = result["half_quantized"]
    assert set(halves) == {"weights_only", "activations_only"}
    for half in halves.values():
        assert set(half["agreeing_views"]) == set(result["agreeing_views"])
        counts = np.array(list(half["agreeing_views"].values()))
        assert half["agreement"] == pytest.approx(100 * counts.mean() / 2) and counts.max() <= 2
    groups = result["activation_groups"]  # ShuffleNetV2's parts: the input, the stem, its stages, the head
    assert {"maxpool", "stage2", "stage3", "stage4", "output"} <= set(groups)
    assert not {"input", "conv1"} & set(groups)  # the default recipe's stem and its pool are fp32 (quant.float_stem)
    assert all(set(g["agreeing_views"]) == set(result["agreeing_views"]) for g in groups.values())
    wider = result["activation_bits"]  # every activation at 10 bits, with the int8 and with the fp32 weights
    assert set(wider) == {"w8a10", "w32a10"}
    assert all(set(w["agreeing_views"]) == set(result["agreeing_views"]) for w in wider.values())
    assert "Weights 8 bits, activations 10 bits" in out.with_suffix(".md").read_text()
    left_out = result["left_out_quantizers"]  # each quantizer as it acts: its first tensor, all it rounds
    joined = [t for m in left_out.values() for t in m["joined"]]
    assert all(m["joined"][0] == first for first, m in left_out.items()) and len(joined) == len(set(joined))
    trunk = left_out["/stage2/stage2.0/branch1/branch1.4/Relu_output_0"]["joined"]  # stage 2's units' outputs
    assert len(trunk) > 4 and any(t.startswith("/stage2/stage2.3/") for t in trunk)
    assert all(set(m["agreeing_views"]) == set(result["agreeing_views"]) for m in left_out.values())


def test_a_variant_adds_its_overrides_and_names_its_file(tmp_path, monkeypatch):
    from quantize.bench import accuracy

    seen = {}

    def fake_run(model, root, overrides, folds, views, work_dir, threads, decompose, activation_bits):
        seen["overrides"] = overrides
        row = {"photos": 2, "fp32_top1": 50.0, "int8_top1": 50.0, "drop": 0.0, "drop_se": 0.0, "agreement": 100.0,
               "agreement_se": 0.0, "views": 4, "photo_agreement": 100.0}
        return {"model": model, "folds": [{**row, "fold": 0}], "all": row, "views_per_photo": 2,
                "overrides": overrides, "load_average": [0.5], "cores": 2}

    monkeypatch.setattr(accuracy, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert accuracy.main(["--model", "m", "--root", str(tmp_path), "--variant", "no-balance", "x=1"]) == 0
    assert seen["overrides"] == ["x=1", *accuracy.VARIANTS["no-balance"]]
    assert json.loads((tmp_path / "benchmarks/results/m/accuracy-no-balance.json").read_text())["overrides"] == \
        ["x=1", "quant.balance=false"]
    with pytest.raises(SystemExit):
        accuracy.main(["--model", "m", "--root", str(tmp_path), "--variant", "no-such-variant"])


def test_every_variant_is_a_valid_config():
    from conftest import compose_config
    from quantize.bench.accuracy import VARIANTS

    for name, overrides in VARIANTS.items():
        cfg = compose_config(["+model=shufflenet_v2_x0_5", *overrides])
        for override in overrides:
            key, value = override.split("=")
            if "." in key:
                chosen = OmegaConf.select(cfg, key)
                assert str(getattr(chosen, "value", chosen)).lower() == value, (name, override)


def test_quantizers_decomposition_builds_one_model_per_quantizer_left_out(tmp_path):
    from types import SimpleNamespace

    from quantize.accuracy.partial_quant import activation_groups
    from quantize.bench.accuracy import DECOMPOSITIONS, half_quantized
    from quantize.core.runtime import make_session
    from quantize.graph.optimize import optimize
    from quantize.stages.static_quant import quantize_model

    from accuracy_models import conv_net, images, minmax_ranges, save

    model = conv_net(seed=5)
    fp32 = save(model, tmp_path / "fp32.onnx")
    data = images(16)
    int8 = quantize_model(fp32, minmax_ranges(model, data, tmp_path / "ranges.json"), tmp_path / "int8.onnx",
                          method="minmax").path
    graph = save(optimize(model)[0], tmp_path / "graph.onnx")
    pipeline = SimpleNamespace(accuracy=SimpleNamespace(quantizer_input=lambda: graph))
    built = {}
    for mode in DECOMPOSITIONS:
        into = tmp_path / mode
        into.mkdir()
        widths = (10,) if mode == "halves" else ()
        built[mode] = half_quantized(pipeline, Path(int8), into, mode, activation_bits=widths)
    groups = activation_groups(onnx.load(str(graph)), onnx.load(str(int8)))
    tensors = [t for g in groups.values() for t in g if t != "out"]  # "out" only flattens "p", on its range
    assert set(built["halves"]) == {"weights_only", "activations_only", "bits:w8a10", "bits:w32a10"}
    assert set(built["groups"]) - set(built["halves"]) == {f"group:{g}" for g in groups}
    assert set(built["quantizers"]) - set(built["groups"]) == {f"without:{t}" for t in tensors}
    x = np.concatenate(data)
    outputs = {name: make_session(path).run(None, {"x": x})[0] for name, path in built["quantizers"].items()}
    fp32_out = make_session(fp32).run(None, {"x": x})[0]
    error = {name: np.abs(out - fp32_out).mean() for name, out in outputs.items()}
    assert all(error[f"without:{t}"] <= error["activations_only"] * 1.5 for t in tensors)
    assert any(error[f"without:{t}"] < error["activations_only"] for t in tensors)
    wider = {name: np.abs(make_session(path).run(None, {"x": x})[0] - fp32_out).mean()
             for name, path in built["halves"].items()}
    assert wider["bits:w32a10"] < error["activations_only"] / 2
    # with the int8 weights: their rounding and a little of the activations'
    assert wider["weights_only"] < wider["bits:w8a10"] < wider["weights_only"] + error["activations_only"] / 2
