"""make bench-islands: the islands it finds, that an island really stays fp32 in the int8 model, its table and its
merged results, and (slow) one entry end to end."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import SHARED_IMAGENET, needs_shared_imagenet
from quantize.bench import islands, zoo
from quantize.bench.zoo import merged_entries
from quantize.stages.export import export_onnx


class SwishNet(nn.Module):
    """A stem (conv, ReLU, max pool), a unit of two convolutions reading it (one with swish), a global pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        a = self.pointwise(x)
        y = torch.cat([a * torch.sigmoid(a), self.depthwise(x)], 1)
        return self.fc(torch.flatten(self.gap(y), 1))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """SwishNet exported, rewritten and calibrated as bench-zoo does."""
    work = tmp_path_factory.mktemp("islands")
    images = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    fp32 = work / "model.onnx"
    export_onnx(SwishNet().eval(), fp32, images[:2])
    graph, ranges, _ = zoo.calibrated(fp32, images, work)
    return work, fp32, graph, ranges


def _ops(model, names):
    by_name = {n.name: n.op_type for n in model.graph.node}
    return [by_name[n] for n in names]


def test_islands_are_found_by_structure(built):
    _, _, graph, _ = built
    model = onnx.load(str(graph))
    # the max pool after an fp32 stem stays in fp32 with it (fp32_nodes.with_pools): stem and stem_pool coincide here
    assert _ops(model, islands.island_nodes(model, "stem")) == ["Conv", "Relu", "MaxPool"]
    assert _ops(model, islands.island_nodes(model, "stem_pool")) == ["Conv", "Relu", "MaxPool"]
    block = _ops(model, islands.island_nodes(model, "stem_block"))
    assert block[:3] == ["Conv", "Relu", "MaxPool"] and sorted(block[3:]) == ["Conv", "Conv", "Mul", "Sigmoid"]
    assert sorted(_ops(model, islands.island_nodes(model, "swish"))) == ["Mul", "Sigmoid"]
    assert _ops(model, islands.island_nodes(model, "global_pool")) == ["GlobalAveragePool"]
    assert islands.holds_stem(model, islands.island_nodes(model, "stem_pool"))
    assert not islands.holds_stem(model, islands.island_nodes(model, "swish"))


def test_a_model_without_the_part_has_no_such_island(built):
    _, _, graph, _ = built
    model = onnx.load(str(graph))
    for node in model.graph.node:  # no max pool after the stem: no stem_pool island
        if node.op_type == "MaxPool":
            node.op_type = "AveragePool"
    assert islands.island_nodes(model, "stem_pool") == []


def test_island_stays_fp32_in_the_int8_model_which_validates(built):
    work, _, graph, ranges = built
    model = onnx.load(str(graph))
    names = islands.island_nodes(model, "stem_block")
    out = islands.quantize_with_island(graph, ranges, names, work / "island.onnx")  # quantize_model validates it
    int8 = onnx.load(str(out))
    onnx.checker.check_model(int8)
    nodes = {n.name: n for n in int8.graph.node}
    made_by = {o: n.op_type for n in int8.graph.node for o in n.output}
    constants = {i.name for i in int8.graph.initializer}
    for name in names:  # the island is there, as float ops reading float constants, not dequantized weights
        assert name in nodes and nodes[name].op_type == _ops(model, [name])[0]
        for tensor in nodes[name].input[1:]:
            if nodes[name].op_type == "Conv":
                assert tensor in constants, (name, tensor)
    # the stem reads the float input: no QuantizeLinear feeds it
    stem = nodes[names[0]]
    assert made_by.get(stem.input[0]) != "DequantizeLinear"
    # the rest is quantized
    rest = [n for n in int8.graph.node if n.op_type in ("Conv", "Gemm") and n.name not in names]
    assert rest and all(made_by.get(n.input[0]) == "DequantizeLinear" for n in rest)


def _row(name, plain, island):
    ratio = {"fp32": {"b1": 1.0, "b32": 1.0}, "int8": {"b1": plain, "b32": plain},
             "stem": {"b1": island, "b32": island}}
    return {"entry": name, "islands": {"stem": ["a", "b"]}, "ratio": ratio, "load": [1.2, 1.5]}


def test_table_has_one_row_per_island_beside_the_plain_int8_ratios():
    result = {"machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "1"}, "graph_version": 5,
              "settings": {"batch": 32, "threads": 2, "runs": 3}, "entries": [_row("a", 2.0, 1.5)]}
    rows = [line for line in islands.table(result).splitlines() if line.startswith("| a ")]
    assert rows == ["| a | stem | 2 | 1.50 | 1.50 | 2.00 · 2.00 | 1.2–1.5 |"]


def test_results_are_merged_entry_by_entry(tmp_path):
    old = {"schema": islands.SCHEMA, "entries": [_row("ppcls_shufflenet_v2_swish", 1.4, 1.0),
                                                 _row("efficientnet_lite0", 2.0, 1.9)]}
    (tmp_path / "islands.json").write_text(json.dumps(old))
    merged = merged_entries(tmp_path / "islands.json", islands.SCHEMA,
                            [_row("efficientnet_lite0", 2.1, 2.0), _row("megvii_shufflenet_v2_x0_5", 1, 1)],
                            list(islands.SHORT_ENTRIES))
    assert [r["entry"] for r in merged] == ["efficientnet_lite0", "megvii_shufflenet_v2_x0_5",
                                            "ppcls_shufflenet_v2_swish"]
    assert merged[0]["ratio"]["int8"]["b1"] == 2.1  # the new measurement replaces the old one


def test_unknown_island_is_one_line(capsys):
    assert islands.main(["--islands", "stem,head"]) == 1
    assert "unknown islands head" in capsys.readouterr().err


@pytest.mark.slow
@needs_shared_imagenet()
def test_bench_islands_times_an_entry_end_to_end(tmp_path):
    code = islands.main(["--models", "ppcls_shufflenet_v2_x0_25", "--islands", "stem_pool,global_pool",
                         "--calib-root", str(SHARED_IMAGENET / "sample"), "--calib-images", "10", "--iterations", "4",
                         "--batch", "2", "--batch-iterations", "2", "--blocks", "2", "--runs", "1",
                         "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "islands.json").read_text())
    row = result["entries"][0]
    assert result["schema"] == islands.SCHEMA and row["entry"] == "ppcls_shufflenet_v2_x0_25"
    assert set(row["islands"]) == {"stem_pool", "global_pool"}
    assert set(row["ratio"]) == {"fp32", "int8", "stem_pool", "global_pool"}
    assert "stem_pool" in (tmp_path / "islands.md").read_text()
