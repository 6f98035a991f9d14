"""Each source's eval transform, written out from its own code with cv2/Pillow/torchvision, for the pixel-for-pixel
tests of ``quantize.data.preprocess``. Each returns (uint8 HWC crop in RGB order, float32 CHW network input).

- mmcls v0.23.1: configs/_base_/datasets/imagenet_bs64_pil_resize.py, mmcls/datasets/pipelines/{loading,
  transforms}.py, mmcv's imfrombytes/imresize/imnormalize.
- PaddleClas v2.4.0: ppcls/configs/ImageNet/ShuffleNet/ShuffleNetV2_*.yaml (Eval), ppcls/data/preprocess/ops/
  operators.py (DecodeImage, ResizeImage, CropImage, NormalizeImage).
- Megvii ShuffleNet-Series: ShuffleNetV2/train.py (ImageFolder loader, OpencvResize, CenterCrop, ToBGRTensor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import cv2
from PIL import Image


def cv2_decode(path: Path) -> np.ndarray:
    """mmcv.imfrombytes(flag='color') and PaddleClas's DecodeImage: cv2.imdecode with IMREAD_COLOR, BGR."""
    return cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)


def mmcls(path: Path, size: int = 256, crop: int = 224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)):
    img = cv2_decode(path)  # LoadImageFromFile
    # Resize(size=(256, -1), backend='pillow', interpolation='bilinear'), adaptive side 'short'
    h, w = img.shape[:2]
    if min(h, w) != size:
        width, height = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
        img = np.array(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))  # mmcv, pillow
    # CenterCrop(crop_size=224)
    h, w = img.shape[:2]
    y1, x1 = max(0, int(round((h - crop) / 2.0))), max(0, int(round((w - crop) / 2.0)))
    img = img[y1: min(h, y1 + crop), x1: min(w, x1 + crop)]
    # Normalize(to_rgb=True): mmcv.imnormalize = float32 copy, BGR->RGB, subtract mean, multiply by 1 / std
    x = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2RGB)
    cv2.subtract(x, np.float64(np.array(mean).reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(np.array(std).reshape(1, -1)), x)
    return np.ascontiguousarray(img[..., ::-1]), x.transpose(2, 0, 1)


def ppcls(path: Path, resize_short: int = 256, crop: int = 224, scale: float = 1.0 / 255.0,
          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    img = cv2_decode(path)[:, :, ::-1]  # DecodeImage(to_rgb=True)
    # ResizeImage(resize_short=256): UnifiedResize with backend cv2, interpolation None -> INTER_LINEAR
    img_h, img_w = img.shape[:2]
    percent = float(resize_short) / min(img_w, img_h)
    w, h = int(round(img_w * percent)), int(round(img_h * percent))
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    # CropImage(size=224)
    img_h, img_w = img.shape[:2]
    w_start, h_start = (img_w - crop) // 2, (img_h - crop) // 2
    img = img[h_start: h_start + crop, w_start: w_start + crop, :]
    # NormalizeImage(scale=1/255, order='')
    x = (img.astype("float32") * np.float32(scale) - np.array(mean).reshape((1, 1, 3)).astype("float32")) \
        / np.array(std).reshape((1, 1, 3)).astype("float32")
    return np.ascontiguousarray(img), x.transpose(2, 0, 1)


def megvii(path: Path, size: int = 256, crop: int = 224):
    import torchvision.transforms.functional as F

    with open(path, "rb") as f:
        pil = Image.open(f).convert("RGB")  # torchvision's ImageFolder loader
    # OpencvResize(256): to BGR, cv2.resize INTER_LINEAR, back to RGB
    img = np.ascontiguousarray(np.asarray(pil)[:, :, ::-1])
    H, W, _ = img.shape
    target = (int(size / H * W + 0.5), size) if H < W else (size, int(size / W * H + 0.5))
    img = cv2.resize(img, target, interpolation=cv2.INTER_LINEAR)
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, ::-1]))
    crop_rgb = np.asarray(F.center_crop(pil, crop))  # transforms.CenterCrop(224)
    x = np.ascontiguousarray(np.transpose(crop_rgb[:, :, ::-1], [2, 0, 1])).astype(np.float32)  # ToBGRTensor
    return crop_rgb, x
