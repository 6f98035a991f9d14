"""Per-model image preprocessing: the one implementation behind calibration, evaluation, the crop cache, the export
check, the accuracy methods and the benchmarks.

Every model entry carries a :class:`Preprocess` (``model.preprocess`` in its config): the eval transform its
weights were trained and published with. The steps, in order:

1. decode the file to 8-bit RGB with Pillow (grayscale, CMYK, palette and 16-bit images included);
2. resize so the shorter side is ``resize`` pixels, with ``backend`` (Pillow's antialiased filters, or
   ``cv2.resize``, which samples without antialiasing) and ``interpolation``; the longer side is
   ``resize * long / short`` rounded as ``resize_rounding`` says (the sources disagree);
3. center-crop ``crop`` x ``crop``; the offset ``(side - crop) / 2`` is rounded as ``crop_rounding`` says;
4. order the channels (``color``: rgb or bgr) and compute ``(pixel * scale - mean[c]) / std[c]`` in float32,
   with ``mean``/``std`` given in the network's channel order and in the units after ``scale``.

Steps 1-3 give a uint8 RGB crop that depends only on the geometry (:meth:`Preprocess.crop_key`), which is what the
crop cache stores; step 4 is applied when batches are read, through a 256-entry table per channel.

Pillow and OpenCV decode JPEGs alike (both use libjpeg-turbo; equal on all 200 sample photos), so the OpenCV
sources (mmcls and PaddleClas decode with ``cv2.imdecode``) are reproduced with Pillow decoding; they would differ
only on CMYK JPEGs and on files with an EXIF orientation, which OpenCV applies and Pillow does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from quantize.core.errors import ConfigError, DataError

__all__ = [
    "Backend", "ColorOrder", "Interpolation", "Preprocess", "Rounding", "crop_uint8", "load_rgb", "normalize",
    "normalize_batch", "preprocess", "resized_size",
]


class Backend(str, Enum):
    """Who resizes: Pillow (``Image.resize``: its filters widen with the scale factor, i.e. antialias, as
    torchvision does on PIL images) or OpenCV (``cv2.resize``: fixed-support filters, no antialiasing)."""
    pillow = "pillow"
    opencv = "opencv"


class Interpolation(str, Enum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"
    box = "box"          # Pillow only
    hamming = "hamming"  # Pillow only
    area = "area"        # OpenCV only


class ColorOrder(str, Enum):
    rgb = "rgb"
    bgr = "bgr"


class Rounding(str, Enum):
    """How a fractional size or offset becomes a pixel count.

    ``floor``: ``int(x)`` (torchvision/mmcls long side, PaddleClas crop offset ``//``); ``round``: Python's
    ``round``, halves to even (torchvision's CenterCrop offset, PaddleClas's long side); ``half_up``:
    ``int(x + 0.5)`` (Megvii's long side)."""
    floor = "floor"
    round = "round"
    half_up = "half_up"


_PILLOW_FILTERS = {
    Interpolation.nearest: Image.Resampling.NEAREST,
    Interpolation.bilinear: Image.Resampling.BILINEAR,
    Interpolation.bicubic: Image.Resampling.BICUBIC,
    Interpolation.lanczos: Image.Resampling.LANCZOS,
    Interpolation.box: Image.Resampling.BOX,
    Interpolation.hamming: Image.Resampling.HAMMING,
}
_OPENCV_FLAGS = {  # cv2.INTER_* values, so that importing this module does not import cv2
    Interpolation.nearest: 0,   # INTER_NEAREST
    Interpolation.bilinear: 1,  # INTER_LINEAR
    Interpolation.bicubic: 2,   # INTER_CUBIC
    Interpolation.area: 3,      # INTER_AREA
    Interpolation.lanczos: 4,   # INTER_LANCZOS4
}
_SUPPORTED = {Backend.pillow: _PILLOW_FILTERS, Backend.opencv: _OPENCV_FLAGS}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _choice(enum: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, enum):
        return value
    raw = getattr(value, "value", value)  # another Enum (e.g. torchvision's InterpolationMode) or a string
    try:
        return enum(str(raw).lower())
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise ConfigError(f"model.preprocess.{name}: unknown value {raw!r}; choose one of {choices}") from None


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"model.preprocess.{name} needs 3 numbers (one per channel), got {value!r}") from None
    if len(values) != 3:
        raise ConfigError(f"model.preprocess.{name} needs 3 values (one per channel), got {len(values)}: "
                          f"{list(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"model.preprocess.{name} values must be finite, got {list(values)}")
    return values


def _size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or int(value) != value:
        raise ConfigError(f"model.preprocess.{name} must be a whole number of pixels, got {value!r}")
    if value < 1:
        raise ConfigError(f"model.preprocess.{name} must be a positive number of pixels, got {int(value)}")
    return int(value)


@dataclass(frozen=True)
class Preprocess:
    """One model's eval transform, validated on construction (every problem is a one-line ConfigError).

    The defaults are the usual ImageNet transform (torchvision's ``ImageClassification(crop_size=224)``).
    """

    resize: int = 256                          # shorter side after resizing, pixels
    crop: int = 224                            # center crop, pixels (square)
    interpolation: Interpolation = Interpolation.bilinear
    backend: Backend = Backend.pillow
    resize_rounding: Rounding = Rounding.floor  # longer side = resize * long / short, rounded so
    crop_rounding: Rounding = Rounding.round    # crop offset = (side - crop) / 2, rounded so
    color: ColorOrder = ColorOrder.rgb          # channel order the network takes
    scale: float = 1 / 255                      # pixel (0..255) multiplier before mean/std
    mean: tuple[float, float, float] = IMAGENET_MEAN  # in the network's channel order, units after scale
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Configs hand us strings and lists (or OmegaConf nodes): store Enums and tuples so instances are hashable
        # and compare equal whatever they were built from.
        set_ = object.__setattr__
        set_(self, "resize", _size(self.resize, "resize"))
        set_(self, "crop", _size(self.crop, "crop"))
        if self.crop > self.resize:
            raise ConfigError(f"model.preprocess.crop ({self.crop}) is larger than model.preprocess.resize "
                              f"({self.resize}): the center crop must fit in the resized image")
        set_(self, "interpolation", _choice(Interpolation, self.interpolation, "interpolation"))
        set_(self, "backend", _choice(Backend, self.backend, "backend"))
        set_(self, "resize_rounding", _choice(Rounding, self.resize_rounding, "resize_rounding"))
        set_(self, "crop_rounding", _choice(Rounding, self.crop_rounding, "crop_rounding"))
        set_(self, "color", _choice(ColorOrder, self.color, "color"))
        if self.interpolation not in _SUPPORTED[self.backend]:
            offered = ", ".join(i.value for i in _SUPPORTED[self.backend])
            raise ConfigError(f"model.preprocess.interpolation={self.interpolation.value} is not available with "
                              f"backend={self.backend.value}; it offers {offered}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise ConfigError(f"model.preprocess.scale must be a number, got {self.scale!r}") from None
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"model.preprocess.scale must be > 0, got {self.scale!r}")
        set_(self, "scale", scale)
        set_(self, "mean", _triple(self.mean, "mean"))
        set_(self, "std", _triple(self.std, "std"))
        if min(self.std) <= 0:
            raise ConfigError(f"model.preprocess.std values must be > 0, got {list(self.std)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "Preprocess":
        """From a config block (``model.preprocess``); unknown keys are a ConfigError, missing ones take defaults."""
        if cfg is None:
            return cls()
        items = asdict(cfg) if is_dataclass(cfg) else dict(cfg.items())
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ConfigError(f"model.preprocess: unknown key(s) {', '.join(unknown)}; keys are "
                              f"{', '.join(f.name for f in fields(cls))}")
        return cls(**items)

    # --- identity -------------------------------------------------------------------------------------------
    def key(self) -> dict[str, Any]:
        """Every setting, as plain JSON values (cache keys, reports)."""
        return {**self.crop_key(), "color": self.color.value, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std)}

    def crop_key(self) -> dict[str, Any]:
        """The settings the uint8 crop depends on (what a crop cache must match); color/scale/mean/std are not."""
        return {"resize": self.resize, "resize_rounding": self.resize_rounding.value,
                "interpolation": self.interpolation.value, "backend": self.backend.value, "crop": self.crop,
                "crop_rounding": self.crop_rounding.value}

    @property
    def divides_by_255(self) -> bool:
        """``scale`` is 1/255: pixels are divided by 255 (as torchvision's ToTensor does) rather than multiplied."""
        return math.isclose(self.scale, 1 / 255, rel_tol=1e-9)

    def pixel_mapping(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(gain, offset)`` per network input channel with ``pixel = input * gain + offset``: the inverse of the
        normalization, for graphs that take pixels back (``quantize.graph.pixel_input``)."""
        return (tuple(s / self.scale for s in self.std), tuple(m / self.scale for m in self.mean))

    def describe(self) -> dict[str, Any]:
        """A self-contained description for whoever feeds the model outside this project (release manifest,
        report): the settings, the exact rules behind them, and the steps in words."""
        size = self.resize
        long_rule = {  # long, short: the image's sides before resizing
            Rounding.floor: f"floor({size} * long / short)",
            Rounding.round: f"round_half_even(long * ({size} / short))",
            Rounding.half_up: f"floor({size} / short * long + 0.5)",
        }[self.resize_rounding]
        offset_rule = {
            Rounding.floor: f"floor((side - {self.crop}) / 2)",
            Rounding.round: f"round_half_even((side - {self.crop}) / 2)",
            Rounding.half_up: f"floor((side - {self.crop}) / 2 + 0.5)",
        }[self.crop_rounding]
        resizer = (f"Pillow Image.resize({self.interpolation.value}; antialiased when shrinking)"
                   if self.backend is Backend.pillow else
                   f"cv2.resize(INTER_{self._opencv_name()}; no antialiasing) on the uint8 image")
        scale_text = "pixel / 255" if self.divides_by_255 else "pixel" if self.scale == 1 else f"pixel * {self.scale!r}"
        return {
            "settings": self.key(),  # model.preprocess as this project reads it (Preprocess.from_config)
            "input": {"layout": "NCHW", "dtype": "float32", "channels": self.color.value.upper(),
                      "height": self.crop, "width": self.crop},
            "decode": "8-bit RGB (grayscale, CMYK and palette images converted to RGB)",
            "resize": {"shorter_side": self.resize, "longer_side": long_rule,
                       "interpolation": self.interpolation.value, "backend": self.backend.value},
            "center_crop": {"size": [self.crop, self.crop], "offset": offset_rule},
            "color_order": self.color.value,
            "normalize": {"formula": "(pixel * scale - mean[c]) / std[c], float32, per output channel c",
                          "scale": self.scale, "mean": list(self.mean), "std": list(self.std)},
            "steps": [
                "decode the image to 8-bit RGB",
                f"resize so the shorter side is {self.resize} px (longer side {long_rule}) with {resizer}",
                f"center-crop {self.crop}x{self.crop} (offset {offset_rule})",
                f"channels in {self.color.value.upper()} order, layout NCHW",
                f"float32: ({scale_text} - mean[c]) / std[c] with mean={list(self.mean)} std={list(self.std)}",
            ],
        }

    def _opencv_name(self) -> str:
        return {0: "NEAREST", 1: "LINEAR", 2: "CUBIC", 3: "AREA", 4: "LANCZOS4"}[_OPENCV_FLAGS[self.interpolation]]


# --- decoding --------------------------------------------------------------------------------------------------

def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; any failure becomes a one-line DataError.

    ``.load()`` forces the whole file to be decoded here, so a truncated JPEG fails now rather than
    silently later (this relies on PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` staying False).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(_load_error(path, exc)) from None


def _load_error(path: Path, exc: Exception) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return f"cannot decode image {path}: not a recognized image format"
    if isinstance(exc, OSError) and exc.strerror:  # file system: missing, permissions, a directory...
        return f"cannot read image {path}: {exc.strerror}"
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot decode image {path}: {cause}"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I"):
        # 16-bit grayscale (I;16*, or I from 16-bit PNGs): PIL's convert would clip at 255, so scale instead.
        a = np.asarray(img, dtype=np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is then dropped like for RGBA
    return img.convert("RGB")


# --- geometry --------------------------------------------------------------------------------------------------

def _rounded(x: float, rounding: Rounding) -> int:
    if rounding is Rounding.floor:
        return int(x)
    if rounding is Rounding.round:
        return int(round(x))
    return int(x + 0.5)


def resized_size(width: int, height: int, p: Preprocess = Preprocess()) -> tuple[int, int]:
    """(width, height) after resizing: the shorter side becomes ``p.resize``, the longer one follows the source's
    own arithmetic (the float expressions are the sources', so that ties and float error round the same way)."""
    short, long = (width, height) if width <= height else (height, width)
    size = p.resize
    if p.resize_rounding is Rounding.floor:      # torchvision, mmcls: int(size * long / short)
        new_long = int(size * long / short)
    elif p.resize_rounding is Rounding.round:    # PaddleClas: percent = size / short; round(long * percent)
        new_long = int(round(long * (size / short)))
    else:                                        # Megvii: int(size / short * long + 0.5)
        new_long = int(size / short * long + 0.5)
    return (size, new_long) if width <= height else (new_long, size)


def _cv2():
    """OpenCV, imported on first use, with its own thread pool off: images are already resized in parallel by the
    decoding threads (calibration, evaluation, cache building), and a second pool would only oversubscribe."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def _offset(side: int, crop: int, rounding: Rounding) -> int:
    if rounding is Rounding.floor:
        return (side - crop) // 2
    return _rounded((side - crop) / 2.0, rounding)


def crop_uint8(img: Image.Image, p: Preprocess = Preprocess()) -> np.ndarray:
    """Resize and center-crop an image to a (p.crop, p.crop, 3) uint8 RGB array (channel order is applied later)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = resized_size(img.width, img.height, p)
    if p.backend is Backend.pillow:
        pixels = np.asarray(img.resize((width, height), _PILLOW_FILTERS[p.interpolation]), dtype=np.uint8)
    else:
        pixels = _cv2().resize(np.asarray(img, dtype=np.uint8), (width, height),
                               interpolation=_OPENCV_FLAGS[p.interpolation])
    top, left = _offset(height, p.crop, p.crop_rounding), _offset(width, p.crop, p.crop_rounding)
    return np.ascontiguousarray(pixels[top: top + p.crop, left: left + p.crop])


# --- normalization ---------------------------------------------------------------------------------------------

_TABLES: dict[tuple, np.ndarray] = {}


def _table(p: Preprocess) -> np.ndarray:
    """float32 (3, 256): output channel c of pixel value v, computed with the float32 operations of the sources
    (torchvision: v / 255 - mean, / std; PaddleClas: v * scale - mean, / std)."""
    key = (p.scale, p.mean, p.std)
    table = _TABLES.get(key)
    if table is None:
        v = np.arange(256, dtype=np.float32)
        x = v / np.float32(255) if p.divides_by_255 else v * np.float32(p.scale)
        mean = np.asarray(p.mean, dtype=np.float32)[:, None]
        std = np.asarray(p.std, dtype=np.float32)[:, None]
        table = (x[None, :] - mean) / std
        table.flags.writeable = False
        _TABLES[key] = table
    return table


def normalize_batch(crops: np.ndarray, p: Preprocess = Preprocess()) -> np.ndarray:
    """uint8 NHWC RGB crops -> float32 NCHW network input in ``p.color`` order, ``(v * scale - mean) / std``."""
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"expected uint8 NHWC crops with 3 channels, got {crops.dtype} {crops.shape}")
    table = _table(p)
    sources = (2, 1, 0) if p.color is ColorOrder.bgr else (0, 1, 2)
    out = np.empty((crops.shape[0], 3, crops.shape[1], crops.shape[2]), dtype=np.float32)
    for channel, source in enumerate(sources):
        np.take(table[channel], crops[..., source], out=out[:, channel])
    return out


def normalize(crop: np.ndarray, p: Preprocess = Preprocess()) -> np.ndarray:
    """One uint8 HWC crop -> float32 CHW."""
    return normalize_batch(crop[None], p)[0]


def preprocess(img: Image.Image, p: Preprocess = Preprocess()) -> np.ndarray:
    """PIL image -> float32 CHW network input."""
    return normalize(crop_uint8(img, p), p)
