"""Reading PaddlePaddle ``.pdparams`` weight files without PaddlePaddle, and without executing pickled code.

A ``.pdparams`` file (``paddle.save(layer.state_dict(), path)``, or the older ``fluid.save_dygraph``) is a plain
pickle (protocol 2 to 4) of ``{name: numpy.ndarray}``. Paddle adds a ``"StructuredToParameterName@@"`` entry
(``{structured name: parameter name}``, both strings) and, only for arrays over 1 GiB saved with protocol 2/3, an
``"UnpackBigParamInfor@@"`` entry describing how such an array was cut into slices.

Unpickling such a file needs only numpy's array reconstruction (``numpy.core.multiarray._reconstruct`` as written
by numpy 1.x, ``numpy._core.multiarray._reconstruct`` by numpy 2.x, ``numpy.ndarray``, ``numpy.dtype``) and, for
protocol 2 written by Python 3, ``_codecs.encode`` (how protocol 2 spells a ``bytes`` object) and ``bytes`` (an
empty one). :class:`_RestrictedUnpickler` admits exactly those globals -- the two callables of the latter pair
wrapped so they can do nothing but build bytes -- and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from quantize.core.errors import ModelError, examples, one_line

__all__ = ["NAME_TABLE_KEY", "PDPARAMS_SUFFIX", "is_pdparams", "load_pdparams", "load_pdparams_tensors"]

PDPARAMS_SUFFIX = ".pdparams"
NAME_TABLE_KEY = "StructuredToParameterName@@"
_BIG_PARAM_KEY = "UnpackBigParamInfor@@"


def is_pdparams(path_or_url: str | Path) -> bool:
    """Whether a file name or URL path names a PaddlePaddle ``.pdparams`` file."""
    return str(path_or_url).split("?", 1)[0].split("#", 1)[0].lower().endswith(PDPARAMS_SUFFIX)


def _numpy_reconstruct():
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is None:  # pragma: no cover - numpy 1.x
        core = np.core
    return core.multiarray._reconstruct


def _latin1_encode(text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: a str holding bytes one per character, encoded latin-1."""
    if not isinstance(text, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as latin-1 text -> bytes (got {encoding!r})")
    return text.encode("latin-1")


def _plain_bytes(*args: object) -> bytes:
    """``bytes`` as protocol-2 pickles use it: ``bytes()`` for an empty bytes object (never ``bytes(n)``)."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes(...) is only allowed without arguments")


# (module, name) as written in the pickle -> the object handed to the unpickler. Nothing else is reachable.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _plain_bytes,
    ("builtins", "bytes"): _plain_bytes,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RefusedGlobal(Exception):
    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for numpy-array dicts: any global outside ``_ALLOWED_GLOBALS`` is refused, never imported."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not used by .pdparams files")


def _unpickle(data: bytes, desc: str) -> object:
    try:
        # latin1: how Python-2 pickles (old Paddle 1.x files) carry numpy's raw data; Paddle itself loads this way.
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise ModelError(
            f"refusing to load {desc}: its pickle calls {exc.qualified_name}, which a .pdparams weights file never "
            "needs (only numpy arrays are allowed); nothing in it was executed"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/not a pickle: nothing was executed
        raise ModelError(
            f"cannot read {desc}: not a valid .pdparams file ({type(exc).__name__}: {one_line(exc, 160)})"
        ) from None


def _join_big_params(obj: dict, desc: str) -> None:
    """Undo Paddle's slicing of >1 GiB arrays (protocol 2/3 saves): ``name@@.0``, ``name@@.1``, ... -> ``name``."""
    info = obj.pop(_BIG_PARAM_KEY, None)
    if not isinstance(info, dict):
        return
    for key, entry in info.items():
        try:
            parts = [obj.pop(part) for part in entry["slices"]]
            shape = tuple(int(d) for d in entry["OriginShape"])
            joined = np.concatenate([np.asarray(p).reshape(-1) for p in parts])
            if joined.size != math.prod(shape):
                raise ValueError(f"{joined.size} elements for shape {shape}")
            obj[key] = joined.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"cannot read {desc}: bad sliced parameter {key!r} ({one_line(exc, 120)})") from None


def load_pdparams(path: str | Path, desc: str | None = None) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``.pdparams`` file, read without executing any pickled code.

    Keys are whatever the file uses (Paddle's structured names, e.g. ``_conv1._conv.weight``, for
    ``paddle.save(layer.state_dict())``). Entries that are not arrays -- the ``StructuredToParameterName@@`` name
    table -- are dropped. Raises a one-line :class:`ModelError` on a missing/unreadable file, a refused global,
    non-numeric arrays, or a file holding no arrays.
    """
    p = Path(path).expanduser()
    desc = desc or f"checkpoint {p}"
    if not p.exists():
        raise ModelError(f"{desc} does not exist")
    if not p.is_file():
        raise ModelError(f"{desc} is not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {desc}: {one_line(exc.strerror or exc)}") from None
    obj = _unpickle(data, desc)
    if not isinstance(obj, dict):
        raise ModelError(f"{desc} does not hold a dict of parameters (found {type(obj).__name__})")
    obj = dict(obj)
    _join_big_params(obj, desc)
    arrays = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not arrays:
        keys = examples(str(k) for k in obj)
        raise ModelError(f"{desc} holds no parameter arrays" + (f" (keys: {keys})" if keys else ""))
    bad = [k for k, v in arrays.items() if v.dtype.kind not in "biuf"]
    if bad:
        raise ModelError(f"{desc} holds non-numeric arrays ({examples(bad)})")
    return arrays


def load_pdparams_tensors(path: str | Path, desc: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`load_pdparams` as torch tensors (native-byte-order copies that own writable memory)."""
    return {k: torch.from_numpy(v.astype(v.dtype.newbyteorder("="), copy=True))
            for k, v in load_pdparams(path, desc).items()}
