"""Robust image I/O: refuse decompression bombs from the header, classify broken files, convert any mode to RGB."""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from customgen.errors import UserError

# Extensions we try to decode; anything else is ignored (never opened).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Folders that hold OS / tool debris, never data (dot-folders are skipped as well).
HIDDEN_NAMES = frozenset({"__MACOSX", ".ipynb_checkpoints", ".DS_Store", "Thumbs.db"})
# Same default as PIL's own bomb warning (~89.5 MP, 9459x9459): larger images are refused unread.
DEFAULT_MAX_PIXELS = 89_478_485
# Why a file was skipped; the report groups skipped files by these codes.
REASONS = ("empty", "not_an_image", "truncated", "corrupt", "too_large", "unreadable", "unsupported_mode")
_EXIF_ORIENTATION = 0x0112


class ImageRejected(UserError):
    """An image file that cannot be used; `reason` is one of REASONS, `detail` says why."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"cannot use image {path}: {reason} ({detail}); remove or re-export the file")


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of a usable image: size after EXIF orientation, original mode and format."""

    width: int
    height: int
    mode: str
    format: str | None


def is_hidden(name: str) -> bool:
    """True for dot-files/folders and OS debris such as __MACOSX."""
    return name.startswith(".") or name in HIDDEN_NAMES


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension we decode (by name only, never opened)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def pixel_cap(max_pixels: int | None) -> float:
    """Effective pixel cap: the smaller of ours and PIL's bomb-warning limit, so a PIL warning is always a refusal."""
    caps = [c for c in (max_pixels, Image.MAX_IMAGE_PIXELS) if c]
    return float(min(caps)) if caps else float("inf")


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """Open lazily and refuse from the header alone: empty, unidentified, or over the pixel cap."""
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise ImageRejected(path, "unreadable", err.strerror or str(err)) from None
    if nbytes == 0:
        raise ImageRejected(path, "empty", "0 bytes")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageRejected(path, "too_large", str(err)) from None
    except UnidentifiedImageError:
        raise ImageRejected(path, "not_an_image", "PIL cannot identify the format") from None
    except PermissionError as err:
        raise ImageRejected(path, "unreadable", err.strerror or str(err)) from None
    except Exception as err:  # decoders raise anything on hostile bytes (OSError, SyntaxError, zlib.error...)
        raise ImageRejected(path, "corrupt", str(err) or type(err).__name__) from None
    width, height = img.size
    if width * height > pixel_cap(max_pixels):
        img.close()
        raise ImageRejected(path, "too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    return img


def _decode(img: Image.Image, path: Path, draft_size: tuple[int, int] | None) -> None:
    """Decode pixel data (JPEG draft mode when a small size suffices); classify decoder failures."""
    if draft_size is not None:
        img.draft(img.mode, draft_size)  # JPEG only: DCT scaling, still reads every byte
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageRejected(path, "too_large", str(err)) from None
    except Exception as err:  # same: any decoder failure means the file is unusable
        reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
        raise ImageRejected(path, reason, str(err) or type(err).__name__) from None


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the axes."""
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def probe_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                decode: bool = True) -> tuple[ImageInfo, Image.Image | None]:
    """Check one file: header size/mode and, with decode, a full (draft-scaled) decode; returns the RGB draft."""
    path = Path(path)
    with _open_checked(path, max_pixels) as img:
        width, height = oriented_size(img)
        info = ImageInfo(width, height, img.mode, img.format)
        if not decode:
            return info, None
        _decode(img, path, (64, 64))
        return info, _rgb(img, path)


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Load an image as RGB with EXIF orientation applied; raises ImageRejected for unusable files."""
    path = Path(path)
    with _open_checked(path, max_pixels) as img:
        _decode(img, path, draft_size)
        return _rgb(img, path)


def _rgb(img: Image.Image, path: Path) -> Image.Image:
    """EXIF-oriented RGB copy of a decoded image; modes PIL cannot convert (e.g. LAB) are refused."""
    try:
        return to_rgb(_exif_transpose(img))
    except (ValueError, OSError) as err:
        raise ImageRejected(path, "unsupported_mode", f"cannot convert mode {img.mode} to RGB: {err}") from None


def _exif_transpose(img: Image.Image) -> Image.Image:
    """PIL's exif_transpose, keeping the image as is when its EXIF block is broken."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # corrupt EXIF: the pixels are still fine
        return img


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8-bit L (PIL's own convert clips at 255)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    elif img.mode.startswith("I;16") or float(arr.max(initial=0)) > 255:
        arr = np.clip(arr.astype(np.float64), 0, 65535) * (255.0 / 65535.0)  # 16-bit full range
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK → RGB through the embedded ICC profile when there is one, else PIL's plain formula."""
    icc = img.info.get("icc_profile")
    if icc:
        with contextlib.suppress(Exception):  # an unusable profile: fall back to the naive conversion
            return ImageCms.profileToProfile(img, io.BytesIO(icc), ImageCms.createProfile("sRGB"), outputMode="RGB")
    return img.convert("RGB")


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode → RGB: alpha composited on `background`, 16-bit scaled, CMYK via ICC."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_to_l(img).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode == "LAB":  # PIL's plain convert() reinterprets the channels; go through littlecms instead
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(base, img).convert("RGB")
    return img.convert("RGB")
