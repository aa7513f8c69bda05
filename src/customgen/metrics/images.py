"""Image inputs for metrics: load, convert, resize, hash, and detect degenerate (black/NaN) outputs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from customgen.errors import UserError

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]

BLACK_LEVEL = 1.0 / 255  # max pixel value at or below which an image counts as all-black
CONSTANT_RANGE = 1.0 / 255  # max - min at or below which an image counts as constant


def load_image(x: ImageLike) -> Image.Image:
    """Any ImageLike → RGB PIL image (EXIF orientation applied for files)."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.is_file():
            raise UserError(f"image not found: {path} (check the path)")
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    arr = to_array(x)
    if not np.isfinite(arr).all():
        raise UserError("image contains NaN/inf: check is_degenerate() before encoding it")
    return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8))


def to_array(x: ImageLike) -> np.ndarray:
    """Any ImageLike → float64 (H, W, 3) in [0, 1]; NaN kept (arrays: uint8 or float in [0, 1])."""
    if isinstance(x, (Image.Image, str, os.PathLike)):
        return np.asarray(load_image(x), dtype=np.float64) / 255.0
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (C, H, W) → (H, W, C)
        x = t.float().numpy()
    arr = np.asarray(x)
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise UserError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 3) or (3, H, W)")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def resize_to(arr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) float image to (h, w) with antialiased bilinear interpolation."""
    if arr.shape[:2] == tuple(size_hw):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    t = F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def image_digest(x: ImageLike) -> str:
    """sha1 of a file's bytes, or of the pixel data (mode, size, dtype, shape) for in-memory images."""
    h = hashlib.sha1()
    if isinstance(x, (str, os.PathLike)):
        with open(x, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif isinstance(x, Image.Image):
        h.update(f"pil:{x.mode}:{x.size}".encode())
        h.update(x.tobytes())
    else:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        h.update(f"array:{arr.dtype}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def is_degenerate(image: ImageLike) -> str | None:
    """Why an output must not be averaged in ("nan", "black", "constant"), or None if it is fine."""
    arr = to_array(image)
    if not np.isfinite(arr).all():
        return "nan"
    hi, lo = float(arr.max()), float(arr.min())
    if hi <= BLACK_LEVEL:
        return "black"  # e.g. the SD safety checker's replacement image
    if hi - lo <= CONSTANT_RANGE:
        return "constant"
    return None
