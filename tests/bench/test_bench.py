"""make bench / make bench-calib: the JSON they write and the memory cap of the stock path (tiny inputs, no timings)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_tiny_imagenet
from quantize.bench import latency as bench
from quantize.bench import calibration as bench_calib
from quantize.bench import evaluation as bench_eval
from quantize.core import inference
from quantize.stages.export import export_onnx


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model.onnx"
    export_onnx(Small().eval(), path, np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32))
    return path


def test_bench_json_has_latency_percentiles_and_throughput(fp32, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--fp32", str(fp32), "--int8", str(fp32), "--batch", "2", "--iterations", "3",
                       "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == bench.SCHEMA and result["threads"] == 1
    for name in ("fp32", "int8"):
        latency = result["latency"]["models"][name]
        assert latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
        assert result["throughput"]["models"][name]["images_per_second"] > 0
    assert result["latency"]["batch"] == 1 and result["throughput"]["batch"] == 2
    assert set(result["latency"]["speedup_p50"]) == set(result["throughput"]["speedup"]) == {"int8"}
    assert "| int8 |" in bench.table(result)
    assert result["runtimes"] == {"onnxruntime": result["machine"]["onnxruntime"]}
    assert {m["runtime"] for m in result["models"].values()} == {"onnxruntime"}
    assert set(result["load_average_1min"]) == {"before", "after"} and "load average" in bench.table(result)


@pytest.mark.skipif(not inference.available("openvino"), reason="OpenVINO is not installed")
def test_bench_times_both_runtimes_in_one_process_against_onnxruntime_fp32(fp32, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--fp32", str(fp32), "--int8", str(fp32), "--batch", "2", "--iterations", "2",
                       "--warmup", "1", "--blocks", "2", "--threads", "1", "--runtimes", "onnxruntime,openvino",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = ["fp32", "int8", "openvino fp32", "openvino int8"]
    assert list(result["models"]) == list(result["latency"]["models"]) == names
    assert [result["models"][n]["runtime"] for n in names] == ["onnxruntime"] * 2 + ["openvino"] * 2
    assert set(result["runtimes"]) == {"onnxruntime", "openvino"} and result["reference"] == "fp32"
    assert set(result["latency"]["speedup_p50"]) == set(result["throughput"]["speedup"]) == set(names[1:])
    table = bench.table(result)
    assert f"openvino {result['runtimes']['openvino']}" in table and "| openvino int8 |" in table
    # openvino alone: ONNX Runtime's fp32 is still timed, as the reference of the ratios
    models, runtime_of = bench.in_runtimes({"fp32": fp32, "int8": fp32}, ["openvino"])
    assert runtime_of == {"fp32": "onnxruntime", "openvino fp32": "openvino", "openvino int8": "openvino"}


def test_bench_without_openvino_or_with_an_unknown_runtime_is_one_line(fp32, monkeypatch, capsys):
    args = ["--fp32", str(fp32), "--int8", str(fp32), "--iterations", "1"]
    assert bench.main([*args, "--runtimes", "onnxruntime,tflite"]) == 1
    assert capsys.readouterr().err.strip() == "error: --runtimes onnxruntime,tflite: choose from onnxruntime, openvino"
    monkeypatch.setitem(sys.modules, "openvino", None)  # as when it is not installed
    monkeypatch.setattr(inference, "_made", {})
    assert bench.main([*args, "--runtimes", "openvino"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'quantize[openvino]'" in err


def test_bench_finds_the_models_of_the_newest_run(fp32, tmp_path):
    run = tmp_path / "outputs" / "m" / "2026-01-01_00-00-00"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"onnx": {"fp32_path": str(fp32), "int8_path": str(fp32)}}))
    assert bench.models_of_run("m", tmp_path / "outputs") == {"fp32": fp32, "int8": fp32}
    assert bench.main(["--model", "other", "--outputs", str(tmp_path / "outputs")]) == 1  # one line, no traceback


def test_bench_times_the_run_it_is_given_rather_than_the_newest(fp32, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    other.write_bytes(fp32.read_bytes())
    runs = tmp_path / "outputs" / "m"
    for name, int8, label in (("older", fp32, "balance+gptq"), ("newer", other, "pixels+balance+gptq")):
        (runs / name).mkdir(parents=True)
        (runs / name / "report.json").write_text(json.dumps(
            {"onnx": {"fp32_path": str(fp32), "int8_path": str(int8)}, "methods": {"label": label}}))
    os.utime(runs / "older" / "report.json", (1_000_000, 1_000_000))
    assert bench.models_of_run("m", tmp_path / "outputs")["int8"] == other  # the newest by default
    assert bench.models_of_run("m", tmp_path / "outputs", runs / "older")["int8"] == fp32
    assert bench.recipe_of_run("m", fp32, tmp_path / "outputs", runs / "older")["methods"] == "balance+gptq"
    assert bench.main(["--model", "m", "--outputs", str(tmp_path / "outputs"), "--run", str(tmp_path)]) == 1
    assert "--run" in capsys.readouterr().err


def test_bench_calib_reports_both_paths_and_a_summary(fp32, tmp_path):
    root = write_tiny_imagenet(tmp_path / "images", per_class=2)
    result = bench_calib.run(fp32, root, sizes=[2, 4], methods=["minmax", "percentile"], stock_methods=["percentile"],
                             rss_cap_gb=8, timeout=300, threads=1, with_torch=False)
    assert result["schema"] == bench_calib.SCHEMA
    assert [(r["path"], r["method"], r["images"]) for r in result["runs"]] == [
        ("project", "minmax", 2), ("project", "percentile", 2), ("stock", "percentile", 2),
        ("project", "minmax", 4), ("project", "percentile", 4), ("stock", "percentile", 4)]
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 for r in result["runs"]), result["runs"]
    assert set(result["summary"]["percentile_over_minmax"]) == {"2", "4"}
    assert set(result["summary"]["rss_growth"]) == {"minmax", "percentile"}
    assert "stock | percentile | 4 | ok" in bench_calib.table(result)


def test_a_run_over_the_memory_cap_is_killed_and_reported(fp32, tmp_path):
    root = write_tiny_imagenet(tmp_path / "images", per_class=1)
    spec = {"path": "stock", "method": "percentile", "images": 3, "onnx": str(fp32), "root": str(root),
            "threads": 1, "with_torch": False}
    record = bench_calib.run_one(spec, rss_cap_gb=0.02, timeout=120)  # below what any Python process needs
    assert record["status"] == "killed" and "cap" in record["reason"]
    assert record["peak_rss_mb_seen"] > 0.02 * 1024


def test_a_failing_run_is_reported(tmp_path):
    spec = {"path": "project", "method": "minmax", "images": 1, "onnx": str(tmp_path / "missing.onnx"),
            "root": str(tmp_path / "nowhere"), "threads": 1, "with_torch": False}
    record = bench_calib.run_one(spec, rss_cap_gb=4, timeout=120)
    assert record["status"] == "failed" and record["reason"].startswith("exit code")


def test_bench_eval_times_jpeg_and_cache_with_and_without_fp32(fp32, tmp_path):
    root = write_tiny_imagenet(tmp_path / "images", per_class=2)
    out = tmp_path / "bench_eval.json"
    assert bench_eval.main(["--fp32", str(fp32), "--int8", str(fp32), "--root", str(root), "--repeat", "2",
                            "--batch", "3", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == bench_eval.SCHEMA
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["jpeg fp32+int8", "jpeg int8, fp32 reused", "cache fp32+int8", "cache int8, fp32 reused"]
    images = 2 * result["distinct_images"]
    assert all(r["images"] == images and r["minutes_for_50000"] > 0 for r in runs.values())
    assert set(runs["jpeg fp32+int8"]["stage_images_per_second"]) == {"decode", "input", "fp32", "int8"}
    assert set(runs["cache int8, fp32 reused"]["stage_images_per_second"]) == {"input", "int8"}
    # the same model on both sides: every run agrees fully, whether fp32 ran or was reused
    assert all(r["agreement_top1"] == 100.0 for r in runs.values())
    assert len({json.dumps(r["top1"], sort_keys=True) for r in runs.values()}) == 1
    assert any((tmp_path / "cache").iterdir())


def test_bench_runtimes_scores_each_runtime_on_images_and_views(fp32, tmp_path):
    from quantize.bench import runtimes as bench_runtimes

    root = write_tiny_imagenet(tmp_path / "images", per_class=2)
    names = ["onnxruntime", "openvino"] if inference.available("openvino") else ["onnxruntime"]
    out = tmp_path / "runtimes.json"
    assert bench_runtimes.main(["--fp32", str(fp32), "--int8", str(fp32), "--root", str(root), "--threads", "1",
                                "--runtimes", ",".join(names), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == bench_runtimes.SCHEMA and list(result["per_runtime"]) == names
    assert result["images"] == 6 and result["views_per_image"] == 12
    for r in result["per_runtime"].values():  # the same file on both sides: full agreement everywhere
        assert r["agreement_top1"] == r["views_agreement_top1"] == 100.0
        assert r["qdq_reference_agreement_top1"] == {"images": 100.0, "views": 100.0}
        assert r["fp32"] == r["int8"] and 0 <= r["fp32"]["top1"] <= r["fp32"]["top5"] <= 100
    for other, paired in result["paired"].items():
        assert paired["views"]["difference"] == 0.0 and paired["int8_runtimes_agree"]["views"] == 100.0
    assert "| onnxruntime |" in bench_runtimes.table(result)


def test_views_start_with_the_standard_crop_of_the_photo():
    from conftest import SHARED_IMAGENET
    from quantize.bench.runtimes import views
    from quantize.data.preprocess import load_rgb, preprocess

    photos = sorted((SHARED_IMAGENET / "sample").rglob("*.JPEG"))[:1]
    if not photos:
        pytest.skip("../shared/data/imagenet is absent")
    v = views(photos[0])
    assert v.shape == (12, 3, 224, 224) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], preprocess(load_rgb(photos[0])))
    assert len({x.tobytes() for x in v}) == 12


def test_several_runs_keep_the_median_run_and_every_speedup():
    def fake(b1, b32):
        return {"latency": {"speedup_p50": {"int8": b1}}, "throughput": {"speedup": {"int8": b32}},
                "load_average_1min": {"before": 1.0, "after": 1.0}}

    runs = [fake(2.4, 2.6), fake(2.0, 2.4), fake(2.3, 2.2)]
    chosen = bench.median_run(runs)
    assert chosen["latency"]["speedup_p50"]["int8"] == 2.3 and chosen["throughput"]["speedup"]["int8"] == 2.2
    assert [r["b1"]["int8"] for r in chosen["runs"]] == [2.4, 2.0, 2.3]
    assert "runs" not in runs[2]  # the run itself is left as it was
    assert bench.median_run(runs[:1]) is runs[0]


def test_int8_is_also_set_against_the_faster_of_the_two_fp32_graphs(fp32, tmp_path, monkeypatch):
    """--with-rewritten-fp32 times the layout-only rewrite of the fp32 model too; the extra speedup divides the
    faster fp32 time (per batch) by int8's."""
    seconds = {1: {"fp32": 4.0, bench.REWRITTEN: 3.0, "int8": 2.0},  # rewritten fp32 faster at batch 1
               2: {"fp32": 40.0, bench.REWRITTEN: 50.0, "int8": 20.0}}  # slower at batch 2

    def fake_blocks(models, batch, iterations, **kwargs):
        return {name: [seconds[len(batch)][name] / 1000] * 3 for name in models}

    monkeypatch.setattr(bench, "time_blocks", fake_blocks)
    out = tmp_path / "bench.json"
    assert bench.main(["--fp32", str(fp32), "--int8", str(fp32), "--batch", "2", "--iterations", "3",
                       "--with-rewritten-fp32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert bench.REWRITTEN in result["models"]
    assert result["latency"]["speedup_p50"]["int8"] == pytest.approx(2.0)
    assert result["latency"]["speedup_vs_faster_fp32"]["int8"] == pytest.approx(1.5)
    assert result["throughput"]["speedup_vs_faster_fp32"]["int8"] == pytest.approx(2.0)
