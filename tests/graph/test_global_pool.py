"""global_pool: a spatial mean (ReduceMean over H, W) becomes GlobalAveragePool, Flatten when dims are dropped."""

import numpy as np
import torch
from torch import nn

from quantize.graph.optimize import optimize
from zoo_models import assert_exact, exported, ops


class Means(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        dropped = y.mean([2, 3])                       # torchvision ShuffleNetV2's pool
        kept = y.mean([-2, -1], keepdim=True).flatten(1)
        over_channels = y.mean(1)                      # not a spatial mean: left alone
        return torch.cat((dropped, kept, over_channels.flatten(1)), 1)


def test_spatial_means_become_global_pools(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 3, 12, 12)).astype(np.float32)
    original = exported(Means(), tmp_path / "means.onnx", x)
    assert ops(original)["ReduceMean"] == 3
    optimized, report = optimize(original)
    assert report.as_dict()["mean_as_global_pool"] == 2
    assert ops(optimized)["ReduceMean"] == 1 and ops(optimized)["GlobalAveragePool"] == 2
    assert ops(optimized)["Flatten"] == ops(original).get("Flatten", 0) + 1
    for batch in (1, 3):
        assert_exact(original, optimized, x[:batch])
