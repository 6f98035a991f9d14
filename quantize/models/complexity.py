"""Parameter and compute counts of a PyTorch model, in the two conventions the published tables use.

- ``macs``: multiply-accumulates of convolutions and fully connected layers only (the papers' "FLOPs", e.g.
  ShuffleNetV2's 146M for x1.0, and Megvii's table).
- ``flops``: what mmcv-style counters report (mmcls, the torchvision column of our table): ``macs`` plus one
  operation per output element for each bias add, two per BatchNorm output element (scale and shift), one per
  activation output element and one per pooling input element.
- ``paddle_flops``: what ``paddle.flops`` reports (PaddleClas): ``macs`` plus bias adds, two per BatchNorm
  element and one per average-pooling output element; activations and max pooling count nothing.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("macs", "flops", "paddle_flops")
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.PReLU, nn.LeakyReLU,
                nn.GELU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


PARAM_KINDS = ("trainable", "paddle")


def count_parameters(model: nn.Module, kind: str = "trainable") -> int:
    """Learned parameters; ``paddle`` also counts BatchNorm running statistics, which Paddle stores (and
    PaddleClas's tables count) as parameters."""
    if kind not in PARAM_KINDS:
        raise ValueError(f"kind must be one of {PARAM_KINDS}, got {kind!r}")
    total = sum(p.numel() for p in model.parameters())
    if kind == "paddle":
        total += sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                     if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None)
    return total


def count_ops(model: nn.Module, kind: str = "macs", input_size: int = 224) -> int:
    """Operations for one image of ``input_size`` x ``input_size``, counted as ``kind`` says."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        elementwise = kind != "macs"
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
            if elementwise and module.bias is not None:
                total += output.numel()
        elif isinstance(module, nn.Linear):
            total += output.numel() // output.shape[-1] * module.in_features * module.out_features
            if elementwise and module.bias is not None:
                total += output.numel()
        elif elementwise and isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        elif kind == "flops" and isinstance(module, _ACTIVATIONS):
            total += output.numel()
        elif kind == "flops" and isinstance(module, _POOLS):
            total += inputs[0].numel()
        elif kind == "paddle_flops" and isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return total
