"""Reading weight files safely and loading them into a model with readable, one-line errors.

Everything here goes through ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary
Python objects to unpickle is refused instead of executed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from quantize.core.errors import ModelError, examples, one_line
from quantize.models.pdparams import is_pdparams, load_pdparams_tensors

__all__ = ["extract_state_dict", "load_into", "load_state_dict_file"]

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model")
_MAX_LISTED = 5


def unpickler_detail(message: str) -> str | None:
    """The one informative sentence of torch's multi-paragraph weights_only refusal, or None if it is not one."""
    if "Weights only load failed" not in message and "WeightsUnpickler" not in message:
        return None
    match = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?:\s|$)", message)
    return one_line(match.group(1) if match else "weights_only load failed", limit=160)


def extract_state_dict(obj: object, source_desc: str) -> dict[str, torch.Tensor]:
    """Return the ``{name: tensor}`` mapping held by a loaded checkpoint object.

    Accepts a plain state dict, or a dict holding one under ``state_dict`` or ``model``
    (as written by many training scripts, next to optimizer state, epoch counters etc.).
    """
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source_desc} does not hold a state dict (found {type(obj).__name__})")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if not obj:
        raise ModelError(f"{source_desc} holds an empty state dict")
    keys = ", ".join(str(k) for k in list(obj)[:_MAX_LISTED])
    raise ModelError(
        f"{source_desc} is not a state dict of tensors and has no 'state_dict' or 'model' entry holding one "
        f"(top-level keys: {keys})"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file from disk without executing pickled code.

    Raises :class:`ModelError` (one line) when the file is missing, is not a torch checkpoint,
    needs unsafe unpickling, or does not contain a state dict.
    """
    p = Path(path).expanduser()
    desc = f"checkpoint {p}"
    if not p.exists():
        raise ModelError(f"{desc} does not exist")
    if not p.is_file():
        raise ModelError(f"{desc} is not a file")
    if is_pdparams(p):  # PaddlePaddle weights: a numpy pickle, read by a loader that admits numpy arrays only
        return load_pdparams_tensors(p, desc)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refusals come through here (and also some plain corruptions).
        detail = unpickler_detail(str(exc))
        if detail is not None:
            raise ModelError(
                f"refusing to load {desc}: it holds Python objects other than tensors, which weights_only loading "
                f"does not execute ({detail}); re-save it as a plain state dict (torch.save(model.state_dict(), path))"
            ) from None
        raise ModelError(f"cannot read {desc}: not a valid torch checkpoint ({one_line(exc)})") from None
    except PermissionError as exc:
        raise ModelError(f"cannot read {desc}: {one_line(exc.strerror or exc)}") from None
    except Exception as exc:  # noqa: BLE001 - anything else means "not a readable checkpoint" (nothing was executed)
        raise ModelError(
            f"cannot read {desc}: not a valid torch checkpoint ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    return extract_state_dict(obj, desc)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """``3 missing keys (a, b, c), 1 unexpected key (d)``: the first few of each, for a one-line error."""
    parts = []
    if missing:
        parts.append(f"{_plural(len(missing), 'missing key')} ({examples(missing, _MAX_LISTED)})")
    if unexpected:
        parts.append(f"{_plural(len(unexpected), 'unexpected key')} ({examples(unexpected, _MAX_LISTED)})")
    return ", ".join(parts)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Suggest a fix when the checkpoint's keys are the model's keys with a common prefix added."""
    if not missing or len(missing) != len(unexpected):
        return ""
    first = unexpected[0]
    for candidate in missing:
        if first.endswith("." + candidate):
            prefix = first[: len(first) - len(candidate)]
            if all(k.startswith(prefix) for k in unexpected) and {k[len(prefix) :] for k in unexpected} == set(missing):
                return f"; the checkpoint's keys carry an extra prefix '{prefix}' (strip it when saving)"
            break
    return ""


def _harmless_missing(model: nn.Module, key: str) -> bool:
    """A missing BatchNorm ``num_batches_tracked`` counter is harmless when the layer uses a fixed momentum:
    the counter is then never read (it only matters for cumulative averaging, i.e. ``momentum=None``)."""
    if not key.endswith("num_batches_tracked"):
        return False
    module_name = key.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_desc: str,
    *,
    target_desc: str | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``model`` with strict key and shape matching.

    On mismatch raises a one-line :class:`ModelError` naming the first offending keys, e.g.
    ``checkpoint x.pth does not match shufflenet_v2_x1_0: 3 missing keys (...), 2 unexpected keys (...)``.
    Only a missing ``num_batches_tracked`` counter of a fixed-momentum BatchNorm is tolerated.
    """
    target = target_desc or type(model).__name__
    expected = model.state_dict()
    given = dict(state_dict)

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    # Tolerance only applies to a checkpoint that otherwise has exactly the model's keys; when the key sets
    # differ anyway (e.g. a prefix), every missing key is reported so the counts stay comparable.
    tolerated = [] if unexpected else [k for k in missing if _harmless_missing(model, k)]
    missing = [k for k in missing if k not in tolerated]
    if missing or unexpected:
        raise ModelError(f"{source_desc} does not match {target}: {describe_key_mismatch(missing, unexpected)}"
                         f"{_prefix_hint(missing, unexpected)}")

    bad_shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        shown = "; ".join(bad_shapes[:_MAX_LISTED]) + ("; ..." if len(bad_shapes) > _MAX_LISTED else "")
        raise ModelError(
            f"{source_desc} does not match {target}: {_plural(len(bad_shapes), 'tensor')} with the wrong shape ({shown})"
        )

    for k in tolerated:
        given[k] = expected[k].clone()
    try:
        model.load_state_dict(given, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; shapes and keys were checked above
        raise ModelError(f"{source_desc} cannot be loaded into {target}: {one_line(exc)}") from None
    return model
