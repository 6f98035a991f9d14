"""The single image preprocessing used by every stage (calibration, evaluation, export checks).

It reproduces torchvision's ``Resize(resize) -> CenterCrop(crop) -> ToTensor() -> Normalize(mean, std)``
on PIL images, but with PIL and numpy only, and split in two halves: a uint8 crop (cacheable) and the
float normalization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from quantize.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Preprocess:
    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        # Configs hand us lists (or OmegaConf ListConfig): store plain tuples of floats so instances
        # stay hashable and compare equal whatever they were built from.
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"preprocess {name} needs 3 values (R, G, B), got {len(value)}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        if self.crop < 1 or self.resize < self.crop:
            raise ConfigError(f"preprocess needs 0 < crop <= resize, got resize={self.resize} crop={self.crop}")
        if min(self.std) <= 0:
            raise ConfigError(f"preprocess std values must be > 0, got {list(self.std)}")

    def key(self) -> dict:
        """Plain JSON-friendly values identifying this preprocessing (for cache keys)."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}


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


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: short side -> size, long side -> int(size * long / short) (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_uint8(img: Image.Image, p: Preprocess = Preprocess()) -> np.ndarray:
    """Resize (bilinear, shorter side = p.resize) and center-crop to a (p.crop, p.crop, 3) uint8 array."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = _resized_size(img.width, img.height, p.resize)
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    # torchvision's CenterCrop offset: Python round(), i.e. halves go to the even integer.
    top = int(round((height - p.crop) / 2.0))
    left = int(round((width - p.crop) / 2.0))
    return np.asarray(img, dtype=np.uint8)[top : top + p.crop, left : left + p.crop].copy()


def normalize_batch(crops: np.ndarray, p: Preprocess = Preprocess()) -> np.ndarray:
    """uint8 NHWC crops -> float32 NCHW, (x / 255 - mean) / std, computed in float32 like torchvision."""
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"expected uint8 NHWC crops with 3 channels, got {crops.dtype} {crops.shape}")
    x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(255)
    x -= np.asarray(p.mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(p.std, dtype=np.float32)[:, None, None]
    return x


def normalize(crop: np.ndarray, p: Preprocess = Preprocess()) -> np.ndarray:
    """One uint8 HWC crop -> float32 CHW."""
    return normalize_batch(crop[None], p)[0]


def preprocess(img: Image.Image, p: Preprocess = Preprocess()) -> np.ndarray:
    """PIL RGB image -> float32 CHW network input."""
    return normalize(crop_uint8(img, p), p)
