"""What a registered architecture is, and the decorator builder modules use to register one.

Kept apart from the registry so builder modules and the registry do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    Builder = Callable[..., nn.Module]

TORCHVISION_PREFIX = "torchvision/"  # "torchvision/<name>": any torchvision classification model, built by name


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    ``default_weights`` returns the source used for ``pretrained=True`` when no URL is given:
    either an http(s) URL (downloaded through torch.hub's cache) or a local file path.
    """

    name: str
    builder: Builder
    default_weights: Callable[[], str] | None = None
    # The source's checkpoint key layout -> this module's (prefixes, renamed or transposed tensors); must accept
    # a state dict already in our layout unchanged.
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


ARCHS: dict[str, ArchSpec] = {}


def register(arch: str, *, default_weights: Callable[[], str] | None = None,
             convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
             ) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes: int = 1000) -> nn.Module`` under ``arch``."""

    def decorator(builder: Builder) -> Builder:
        if arch in ARCHS:
            raise ValueError(f"architecture {arch!r} is already registered")
        ARCHS[arch] = ArchSpec(arch, builder, default_weights, convert)
        return builder

    return decorator
