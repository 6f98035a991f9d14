"""Model registry: an architecture name resolves to a builder, and ``build_model`` adds the weights.

Builders take ``num_classes`` and return a randomly initialised ``nn.Module``; builder modules register them with
``@register("name")`` (``quantize.models.spec``). Weights come, in order of priority, from a local checkpoint, from
the pretrained source (an explicit ``weights_url`` or the builder's default source), or nowhere (reproducible
random init).
"""

from __future__ import annotations

import logging
import os
import pickle
import urllib.error
import urllib.parse

import torch
from torch import nn

# Importing the builder modules fills the registry.
from quantize.models import efficientnet_lite, megvii_shufflenet, mmcls_shufflenet, ppcls_shufflenet  # noqa: F401
from quantize.models import torchvision_models
from quantize.core.errors import ModelError, one_line
from quantize.models.checkpoint import extract_state_dict, load_into, load_state_dict_file, unpickler_detail
from quantize.models.pdparams import is_pdparams, load_pdparams_tensors
from quantize.models.spec import ARCHS, TORCHVISION_PREFIX, ArchSpec

__all__ = ["ArchSpec", "available_archs", "build_model", "get_arch"]

log = logging.getLogger(__name__)

# Seed used for random initialisation, so that two builds of an arch give identical weights.
RANDOM_INIT_SEED = 0


def available_archs() -> list[str]:
    """Sorted names of every registered architecture."""
    return sorted(ARCHS)


def get_arch(arch: str) -> ArchSpec:
    """The registry entry for ``arch``; unknown names raise a one-line :class:`ModelError`."""
    if isinstance(arch, str) and arch.startswith(TORCHVISION_PREFIX):
        return torchvision_models.any_torchvision_classifier(arch[len(TORCHVISION_PREFIX):])
    try:
        return ARCHS[arch]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model arch {arch!r}; available: {', '.join(available_archs())}") from None


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme.lower() in ("http", "https", "ftp", "file")


def _download_state_dict(url: str, *, check_hash: bool) -> dict[str, torch.Tensor]:
    """Fetch a state dict through torch.hub's cache (``<torch hub dir>/checkpoints``), safely unpickled."""
    try:
        if is_pdparams(url):  # a PaddlePaddle pickle: fetched into the same cache, read by the numpy-only loader
            pdparams_file = _download_to_hub_cache(url, check_hash=check_hash)
        else:
            # Looked up at call time so tests (and callers) can substitute the downloader.
            obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=check_hash)
    except urllib.error.URLError as exc:
        reason = exc.reason if getattr(exc, "reason", None) is not None else exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        raise ModelError(
            f"cannot download weights from URL: {one_line(reason)} ({url}); "
            "pass model.checkpoint=PATH or model.pretrained=false"
        ) from None
    except pickle.UnpicklingError as exc:
        detail = unpickler_detail(str(exc)) or one_line(exc, 200)
        raise ModelError(
            f"refusing to load weights downloaded from {url}: not loadable with weights_only=True ({detail})"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        # OSError: sockets, timeouts, disk; ValueError: malformed URL; RuntimeError: hash mismatch, corrupt file.
        raise ModelError(
            f"cannot download weights from URL: {type(exc).__name__}: {one_line(exc)} ({url}); "
            "pass model.checkpoint=PATH or model.pretrained=false"
        ) from None
    if is_pdparams(url):
        return load_pdparams_tensors(pdparams_file, f"weights downloaded from {url}")
    return extract_state_dict(obj, f"weights from {url}")


def _download_to_hub_cache(url: str, *, check_hash: bool) -> str:
    """Path of ``url``'s file in ``<torch hub dir>/checkpoints``, downloaded unless already there (as torch.hub does,
    including the ``name-<sha256 prefix>.ext`` check when ``check_hash``)."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        match = torch.hub.HASH_REGEX.search(filename) if check_hash else None
        torch.hub.download_url_to_file(url, cached, match.group(1) if match else None, progress=False)
    return cached


def _converted(spec: ArchSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return spec.convert(state) if spec.convert is not None else state


def _random_init(spec: ArchSpec, num_classes: int) -> nn.Module:
    # fork_rng keeps the caller's global RNG state untouched; devices=[] avoids touching CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return spec.builder(num_classes=num_classes)


def build_model(
    arch: str,
    *,
    pretrained: bool,
    weights_url: str | None = None,
    checkpoint: str | None = None,
    num_classes: int = 1000,
    check_hash: bool | None = None,
) -> nn.Module:
    """Build ``arch`` in eval mode, with weights from (in priority order):

    1. ``checkpoint``: a local state-dict file (plain, or wrapped under ``state_dict``/``model``);
    2. if ``pretrained``: ``weights_url`` when given, else the arch's default source
       (the official torchvision URL, or the packaged EfficientNet-Lite0 file);
    3. otherwise a random init seeded with a fixed seed (reproducible).

    ``check_hash`` verifies the ``name-<sha256 prefix>.pth`` convention of downloaded files; by default it is on
    for an arch's official URL and off for a user-supplied ``weights_url``.
    All failures are raised as one-line :class:`ModelError`.
    """
    spec = get_arch(arch)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = _random_init(spec, num_classes)

    if checkpoint:
        log.info("loading %s weights from checkpoint %s", arch, checkpoint)
        state = load_state_dict_file(checkpoint)
        load_into(model, _converted(spec, state), f"checkpoint {checkpoint}", target_desc=arch)
    elif pretrained:
        if weights_url:
            source, official = weights_url, False
        elif spec.default_weights is not None:
            source, official = spec.default_weights(), True
        else:
            raise ModelError(
                f"no pretrained weights are known for {arch}; pass model.weights_url=URL, "
                "model.checkpoint=PATH or model.pretrained=false"
            )
        if _is_url(source):
            log.info("loading %s weights from %s", arch, source)
            state = _download_state_dict(source, check_hash=official if check_hash is None else check_hash)
            load_into(model, _converted(spec, state), f"weights from {source}", target_desc=arch)
        else:
            log.info("loading %s weights from file %s", arch, source)
            state = load_state_dict_file(source)
            load_into(model, _converted(spec, state), f"weights file {source}", target_desc=arch)
    else:
        log.info("built %s with random init (seed %d)", arch, RANDOM_INIT_SEED)

    return model.eval()
