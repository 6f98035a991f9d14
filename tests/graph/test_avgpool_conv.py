"""avgpool_conv: average pools that count padding become depthwise convolutions with weights 1 / window."""

import numpy as np
import torch
from torch import nn

from quantize.graph.optimize import optimize
from zoo_models import assert_exact, exported, ops


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.counted = nn.AvgPool2d(3, 2, 1)                            # mmcls ShuffleNetV1's shortcut
        self.unpadded = nn.AvgPool2d(2, 2)                              # no padding: same either way
        self.uncounted = nn.AvgPool2d(3, 1, 1, count_include_pad=False)  # varying window: left alone

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.cat((self.counted(y), self.unpadded(y), self.uncounted(self.counted(y))), 1)


def test_counting_pools_become_depthwise_convs(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    original = exported(Pools(), tmp_path / "pools.onnx", x)
    assert ops(original)["AveragePool"] == 3
    optimized, report = optimize(original)
    assert report.as_dict()["avgpool_as_depthwise_conv"] == 2
    assert ops(optimized)["AveragePool"] == 1 and ops(optimized)["Conv"] == ops(original)["Conv"] + 2
    for batch in (1, 3):
        assert_exact(original, optimized, x[:batch])
