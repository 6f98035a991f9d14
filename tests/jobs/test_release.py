"""make release: per-model artifacts and manifest, a summary table, and reruns that change nothing."""

import json
import logging
import os

import pytest

from quantize.jobs.release import main as release_main

from conftest import torchvision_metrics, write_tiny_imagenet


def tree(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_release_writes_each_model_then_a_rerun_changes_no_byte(tmp_path, caplog):
    data = write_tiny_imagenet(tmp_path / "val")
    out = tmp_path / "release"
    args = ["--models", "shufflenet_v2_x0_5", "--out", str(out), "model.pretrained=false", f"data.root={data}",
            "calib.num_images=4", "export.check_images=2", f"work_dir={tmp_path / 'work'}", "analysis.speed_runs=10"]
    assert release_main(args) == 0
    model_dir = out / "shufflenet_v2_x0_5"
    assert sorted(p.name for p in model_dir.iterdir()) == ["manifest.json", "model.int8.onnx", "model.onnx",
                                                           "preprocess.json", "report.json"]
    # how to feed the models, for a deployer without this project: beside them, and in the manifest
    feed = json.loads((model_dir / "preprocess.json").read_text())
    assert feed["model"] == "shufflenet_v2_x0_5" and feed["input"]["name"] == "input"
    assert feed["settings"]["resize"] == 256 and feed["resize"]["backend"] == "pillow" and len(feed["steps"]) == 5
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["outputs"]["model.int8.onnx"] == json.loads((model_dir / "report.json").read_text())[
        "onnx"]["int8_sha256"]
    assert manifest["config"]["model"]["name"] == "shufflenet_v2_x0_5"
    assert manifest["versions"]["onnxruntime"] and manifest["inputs"]["calibration_images_digest"]
    # the default recipe: range balancing before the graph rewrite, weight-scale search and GPTQ after quantizing
    assert set(manifest["stage_seconds"]) == {"export", "balance", "optimize", "calibrate", "quantize", "refine",
                                              "evaluate", "speed"}
    assert manifest["preprocess"] == {k: v for k, v in feed.items() if k != "model"}
    assert manifest["outputs"]["preprocess.json"] and manifest["inputs"]["preprocess"] == feed["settings"]
    summary = (out / "SUMMARY.md").read_text()
    published = torchvision_metrics("shufflenet_v2_x0_5")
    assert "| shufflenet_v2_x0_5 | torchvision |" in summary
    assert f"{published['acc@1']} / {published['acc@5']}" in summary
    speed = json.loads((model_dir / "report.json").read_text())["speed"]
    assert speed["int8_speedup"] == pytest.approx(speed["ms"]["fp32"] / speed["ms"]["int8"])
    assert summary.rstrip().endswith(f"| {speed['int8_speedup']:.2f}× (b{speed['batch_size']}) |")
    assert oct(os.stat(model_dir / "model.onnx").st_mode & 0o077) != "0o0"  # readable by others (umask)

    before = tree(out)
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert release_main(args) == 0
    assert tree(out) == before
    assert "running" not in caplog.text and "release shufflenet_v2_x0_5: unchanged" in caplog.text


def test_release_lists_a_failing_model_and_exits_1(tmp_path):
    data = write_tiny_imagenet(tmp_path / "val")
    out = tmp_path / "release"
    code = release_main(["--models", "shufflenet_v2_x0_5", "--out", str(out), f"data.root={data}",
                         "model.checkpoint=/no/such/weights.pth", f"work_dir={tmp_path / 'work'}"])
    assert code == 1
    assert "| shufflenet_v2_x0_5 | failed: model.checkpoint=/no/such/weights.pth does not exist" in \
        (out / "SUMMARY.md").read_text()


def test_release_refuses_unknown_models(tmp_path, capsys):
    assert release_main(["--models", "resnet9000", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown models resnet9000; available: ")
