"""make bench-zoo: the profile it reads, the table it writes, and (slow) one entry end to end."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SHARED_IMAGENET, needs_shared_imagenet
from quantize.bench import zoo
from quantize.stages.export import export_onnx


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_profile_gives_kernel_milliseconds_per_operator_type(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "small.onnx"
    export_onnx(Small().eval(), path, x)
    ops = zoo.profile(path, x, runs=3, threads=1, scratch=tmp_path)
    assert ops and all(ms >= 0 for ms in ops.values())
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    assert any("Conv" in op for op in ops) and "MaxPool" in ops
    shares = zoo.top(ops, n=len(ops))
    assert abs(sum(share for _, _, share in shares) - 100) < 1
    assert not list(tmp_path.glob("profile*.json"))  # traces are removed once read


def _row(name, fp32, int8):
    where = {"b1": [["QLinearConv", 1.0, 80.0]], "b32": [["QLinearConv", 9.0, 75.0], ["Split", 1.0, 8.0]]}
    ms = {"fp32": {"b1": fp32, "b32": 30 * fp32}, "fp32_rewritten": {"b1": 0.75 * fp32, "b32": 40 * fp32},
          "int8": {"b1": int8, "b32": 30 * int8}, "before": {"b1": fp32, "b32": 30 * fp32}}
    faster = {k: min(ms["fp32"][k], ms["fp32_rewritten"][k]) / ms["int8"][k] for k in ("b1", "b32")}
    return {"entry": name, "ms": ms, "ratio": {k: ms["fp32"][k] / ms["int8"][k] for k in ("b1", "b32")},
            "ratio_best_fp32": faster, "ratio_before": {"b1": 1.0, "b32": 1.0},
            "where": {"fp32": where, "int8": where}, "load": [1.5, 2.0]}


def test_table_has_one_row_per_entry_with_ratios_load_and_top_operators():
    result = {"machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "1"}, "graph_version": 2,
              "settings": {"batch": 32, "before": True, "threads": 2, "calib_images": 50},
              "entries": [_row("a", 4.0, 2.0), _row("b", 3.0, 2.0)]}
    lines = zoo.table(result).splitlines()
    rows = [line for line in lines if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2
    # fp32, rewritten fp32 and int8 ms at both batches, the ratios, against the faster fp32 graph, before, load
    assert rows[0].startswith("| a | 4.00 | 3.00 | 2.00 | 120.0 | 160.0 | 60.0 | 2.00 | 2.00 | 1.50 · 2.00 | 1.00 · 1.00 |")
    assert "| 1.5–2.0 | QLinearConv 75%, Split 8% |" in rows[0]
    assert "| 1.50 | 1.50 | 1.12 · 1.50 |" in rows[1]


@pytest.mark.slow
@needs_shared_imagenet()
def test_bench_zoo_times_an_entry_end_to_end(tmp_path):
    root = SHARED_IMAGENET / "sample"
    code = zoo.main(["--models", "ppcls_shufflenet_v2_x0_25", "--calib-root", str(root), "--calib-images", "10",
                     "--iterations", "4", "--batch", "2", "--batch-iterations", "2", "--blocks", "2",
                     "--profile-runs", "1", "--runs", "2", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "zoo.json").read_text())
    assert result["schema"] == zoo.SCHEMA and [r["entry"] for r in result["entries"]] == ["ppcls_shufflenet_v2_x0_25"]
    row = result["entries"][0]
    assert row["rewrites"]["stem_conv_widened"] == 1
    assert len(row["ratios"]) == 2
    for key in ("b1", "b2"):  # the median of two runs
        assert row["ratio"][key] == pytest.approx(sum(r[key] for r in row["ratios"]) / 2)
    assert "ppcls_shufflenet_v2_x0_25" in (tmp_path / "zoo.md").read_text()
