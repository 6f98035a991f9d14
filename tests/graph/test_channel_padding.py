"""channel_padding: depthwise convolutions of a channel count off the multiple of 16 get zero channels, exactly."""

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from quantize.graph.optimize import optimize
from zoo_models import assert_exact, exported


class Branches(nn.Module):
    """stem -> relu -> maxpool read by a 12-channel depthwise conv (through the MaxPool: left alone) and a
    pointwise conv, whose relu output feeds a 12-channel depthwise conv and a dense conv; pointwise -> relu ->
    20-channel depthwise -> clip -> pointwise; a 32-channel depthwise reading a Concat (a multiple of 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 12, 3, 2, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.dw_pool = nn.Conv2d(12, 12, 3, 1, 1, groups=12)
        self.pw_pool = nn.Conv2d(12, 8, 1)
        self.pw0 = nn.Conv2d(12, 12, 1)
        self.dw1 = nn.Conv2d(12, 12, 3, 1, 1, groups=12)
        self.pw_left = nn.Conv2d(12, 8, 1)
        self.pw1 = nn.Conv2d(12, 20, 1)
        self.dw2 = nn.Conv2d(20, 20, 3, 1, 1, groups=20)
        self.pw_right = nn.Conv2d(20, 16, 1)
        self.dw3 = nn.Conv2d(32, 32, 3, 1, 1, groups=32)

    def forward(self, x):
        y = self.pool(torch.relu(self.stem(x)))
        t = torch.relu(self.pw0(y))
        left = self.pw_left(self.dw1(t))
        right = self.pw_right(torch.clamp(self.dw2(torch.relu(self.pw1(t))), 0, 6))
        z = torch.cat((left, right, self.pw_pool(self.dw_pool(y))), 1)
        return torch.cat((self.dw3(z), z), 1)


def widths(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return sorted((n.name, inits[n.input[1]].shape) for n in model.graph.node if n.op_type == "Conv")


def test_depthwise_channels_padded_to_16_and_outputs_unchanged(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    original = exported(Branches(), tmp_path / "branches.onnx", x)
    padded, report = optimize(original, skip=("stem_channels",))
    counts = report.as_dict()
    assert counts["depthwise_channels_padded"] == 2 and counts["zero_channels_added"] == 4 + 12
    weights = {name: shape for name, shape in widths(padded)}
    by_layer = {name.split("/")[1] if "/" in name else name: shape for name, shape in weights.items()}
    assert by_layer["pw0"][0] == 16                                     # zero filters
    assert by_layer["dw1"][0] == 16 and by_layer["dw2"][0] == 32 and by_layer["dw3"][0] == 32
    assert by_layer["pw_left"][1] == 16 and by_layer["pw1"][1] == 16     # zero input weights
    assert by_layer["pw1"][0] == 32 and by_layer["pw_right"][1] == 32
    # not through the MaxPool: the stem and the depthwise conv reading the pool keep their width
    assert by_layer["stem"][0] == 12 and by_layer["dw_pool"][0] == 12 and by_layer["pw0"][1] == 12
    for batch in (1, 3):
        assert_exact(original, padded, x[:batch])
