"""Parity with the published table: params and compute of every zoo entry, counted by quantize.models.complexity."""

import pytest
import torchvision
from torch import nn

from quantize.models.complexity import count_ops, count_parameters
from quantize.models.zoo import Row, entries, main


def test_every_zoo_entry_matches_the_published_table(capsys):
    assert main([]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(entries()) >= 18
    assert all(line.rstrip().endswith("| yes |") for line in rows), table


def test_counting_conventions_on_a_known_network():
    model = torchvision.models.shufflenet_v2_x1_0()
    assert count_parameters(model) == 2_278_604
    macs = count_ops(model, "macs")
    assert macs == pytest.approx(146e6, rel=0.01)  # the ShuffleNetV2 paper's 146M "FLOPs" are MACs
    assert count_ops(model, "macs") < count_ops(model, "paddle_flops") < count_ops(model, "flops")


def test_flops_count_elementwise_work_that_macs_ignore():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    pixels = 8 * 8
    assert count_ops(model, "macs", input_size=8) == 4 * 3 * pixels
    # + conv bias (4 per pixel) + BatchNorm (2 x 4 per pixel) + ReLU (4 per pixel) + pooling input (4 per pixel)
    assert count_ops(model, "flops", input_size=8) == 4 * 3 * pixels + (4 + 8 + 4 + 4) * pixels
    # paddle: + conv bias + BatchNorm + average-pool outputs (4), nothing for ReLU
    assert count_ops(model, "paddle_flops", input_size=8) == 4 * 3 * pixels + (4 + 8) * pixels + 4


def test_a_row_off_the_table_is_flagged_but_published_rounding_is_not():
    assert Row("a", "s", 1.366, 1.4, 40.5, 41.0, "macs").ok  # Megvii publishes 1.4 M for 1.366 M
    assert not Row("a", "s", 1.30, 1.4, 40.5, 41.0, "macs").ok
    assert not Row("a", "s", 2.279, 2.28, 160.0, 149.0, "flops").ok
