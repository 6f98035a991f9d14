"""The sweep table's accuracy columns (methods, fp32 nodes, speedup, sampling error) and its drop-vs-speed plot."""

import copy
import json

from PIL import Image

from quantize.jobs.sweep import COLUMNS, collect, row, write_summary


def report(calib="percentile", percentile=99.999, label="ort", speedup=None, fp32_nodes=None, sha="a", drop=1.0):
    r = {"model": "efficientnet_lite0", "calib": {"method": calib, "percentile": percentile if calib == "percentile"
                                                  else None, "seconds": 10.0, "peak_rss_mb": 500.0},
         "quant": {"format": "qdq", "activation_type": "uint8", "weight_type": "int8", "per_channel": True},
         "fp32": {"top1": 80.5, "top5": 95.0}, "int8": {"top1": 80.5 - drop, "top5": 95.0}, "drop_top1": drop,
         "agreement_top1": 97.5, "eval": {"num_images": 200, "root": "/data"}, "onnx": {"int8_sha256": sha},
         "methods": {"label": label}, "budget": None, "speed": None}
    if speedup is not None:
        r["speed"] = {"int8_speedup": speedup}
    if fp32_nodes is not None:
        r["budget"] = {"fp32_nodes": fp32_nodes}
    return r


def test_new_columns_are_filled():
    assert {"methods", "±1 image", "fp32 nodes", "speedup"} <= set(COLUMNS)
    values = dict(zip(COLUMNS, row(report(label="gptq+bc+budget0.3", speedup=2.134, fp32_nodes=["a", "b"]))))
    assert values["methods"] == "gptq+bc+budget0.3"
    assert values["speedup"] == "2.13" and values["fp32 nodes"] == "2" and values["±1 image"] == "0.50"
    old = report()  # a report written before these fields existed still renders
    del old["methods"], old["budget"], old["speed"]
    values = dict(zip(COLUMNS, row(old)))
    assert (values["methods"], values["speedup"], values["fp32 nodes"]) == ("ort", "—", "0")


def test_summary_table_and_plot_from_a_sweep_folder(tmp_path):
    runs = [report(sha="1", speedup=2.1, drop=2.0), report(label="gptq+bc", sha="2", speedup=2.0, drop=-0.5),
            report(calib="minmax", sha="3", speedup=2.2, drop=2.5),
            report(calib="minmax", sha="3", speedup=2.2, drop=2.5)]  # the same model twice: counted once
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps(r))
    assert len(collect(tmp_path)) == 3
    summary = write_summary(tmp_path)
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("| model | calib | quant | methods |") and "speedup" in lines[0]
    assert sum(line.startswith("| efficientnet_lite0") for line in lines) == 3
    assert any("gptq+bc" in line and "| -0.50 |" in line for line in lines)
    assert "summary.png" in summary.read_text()
    with Image.open(tmp_path / "summary.png") as image:
        assert image.format == "PNG"
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(r["speedup"] for r in rows) == ["2.00", "2.10", "2.20"]


def test_one_int8_model_evaluated_in_two_runtimes_is_two_rows(tmp_path):
    runtimes = [{"name": "onnxruntime", "version": "1.32.0"}, {"name": "openvino", "version": "2026.4.1"}]
    for i, runtime in enumerate(runtimes):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps({**report(sha="same"), "runtime": runtime}))
    assert len(collect(tmp_path)) == 2
    rows = json.loads(write_summary(tmp_path).with_suffix(".json").read_text())
    assert sorted(r["runtime"] for r in rows) == ["onnxruntime 1.32.0", "openvino 2026.4.1"]
    old = report()  # written before eval.runtime existed: ONNX Runtime, at the version the report lists
    old["versions"] = {"onnxruntime": "1.31.0"}
    assert dict(zip(COLUMNS, row(old)))["runtime"] == "onnxruntime 1.31.0"


def test_no_plot_without_speed(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "report.json").write_text(json.dumps(copy.deepcopy(report())))
    write_summary(tmp_path)
    assert not (tmp_path / "summary.png").exists()
