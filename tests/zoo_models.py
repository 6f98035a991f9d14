"""Small networks for the tests: the zoo's structures (ShuffleNetV1 units, Megvii's strided split) for the rewrite
tests, and a tiny classifier for the stage and runtime tests."""

import numpy as np
import onnx
import torch
from torch import nn

from quantize.core.runtime import make_session
from quantize.models.mmcls_shufflenet import channel_shuffle


def randomize_bn(model: nn.Module) -> nn.Module:
    """BN statistics that are not the identity, so folding leaves real biases."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def conv_bn(cin, cout, k=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class V1Unit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1, depthwise 3x3, channel shuffle, grouped 1x1; add, or concat with a 3x3/2
    average pool of the input (padding counted, as mmcls)."""

    def __init__(self, cin, cout, groups=3, stride=1):
        super().__init__()
        self.groups, self.stride = groups, stride
        mid = cout // 4
        branch_out = cout - cin if stride == 2 else cout
        self.compress = conv_bn(cin, mid, groups=groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.expand = conv_bn(mid, branch_out, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        out = self.expand(channel_shuffle(self.dw(self.compress(x)), self.groups))
        if self.pool is not None:
            return torch.cat((self.pool(x), torch.relu(out)), 1)
        return torch.relu(x + out)


class TinyV1(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = conv_bn(3, 24, 3, 2)
        self.units = nn.Sequential(V1Unit(24, 48, stride=2), V1Unit(48, 48), V1Unit(48, 48))
        self.fc = nn.Linear(48, 10)
        randomize_bn(self)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class MegviiBlock(nn.Module):
    """Megvii's ShuffleNetV2 stride-1 block: even channels pass, odd ones go through the branch."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half), conv_bn(half, half, 3, groups=half, relu=False),
                                    conv_bn(half, half))

    def forward(self, x):
        return torch.cat((x[:, 0::2], self.branch(x[:, 1::2])), 1)


class TinyMegvii(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(*[MegviiBlock(16) for _ in range(4)])
        self.last = conv_bn(16, 32)
        self.fc = nn.Linear(32, 10)
        randomize_bn(self)

    def forward(self, x):
        return self.fc(self.last(self.blocks(self.stem(x))).mean((2, 3)))


def outputs(model, x):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return make_session(source, level="disable").run(None, {"input": x})[0]


def exported(module: nn.Module, path, x: np.ndarray) -> onnx.ModelProto:
    """``module`` exported as the export stage does (checked on two images of ``x``), loaded back."""
    from quantize.stages.export import export_onnx

    export_onnx(module.eval(), path, x[:2])
    return onnx.load(str(path))


def assert_exact(original, rewritten, x):
    """The rewritten graph's fp32 output is the original's within 1e-5 (relative to the output's magnitude)."""
    want, got = outputs(original, x), outputs(rewritten, x)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def ops(model):
    from collections import Counter
    return Counter(n.op_type for n in model.graph.node)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Pooled(nn.Module):
    """ShuffleNet's first layers in small: a 24-channel stem, its pool read by a depthwise convolution (then a
    pointwise one) and by a pointwise convolution."""

    def __init__(self, activation: nn.Module | None = None, pool: bool = True, shortcut: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = conv_bn(3, 24, 3, 2)
        if activation is not None:
            self.stem[-1] = activation
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()
        self.dw = nn.Conv2d(24, 24, 3, 1, 1, groups=24)
        self.pw_dw = conv_bn(24, 16)
        self.pw = conv_bn(24, 16)
        self.shortcut = shortcut  # the pool's output also in the Concat, as ShuffleNetV1's first unit has it
        randomize_bn(self)

    def forward(self, x):
        y = self.pool(self.stem(x))
        return torch.cat((self.pw_dw(self.dw(y)), self.pw(y), *([y] if self.shortcut else [])), 1).mean((2, 3))
