"""Image plumbing for inference: load contents, working size, masks, pixel-space compositing, PNG metadata."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

from customgen.data import read_selection
from customgen.data.io import DEFAULT_MAX_PIXELS, is_hidden, is_image_name, load_image, to_rgb
from customgen.errors import Notice, UserError
from customgen.request import SIZE_MULTIPLE

METADATA_KEY = "customgen"  # PNG text chunk holding the settings as JSON


def load_content(x, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One content image (path or PIL) → RGB with EXIF orientation applied (CMYK, 16-bit, RGBA handled)."""
    if isinstance(x, Image.Image):
        return to_rgb(ImageOps.exif_transpose(x))
    path = Path(x)
    if not path.is_file():
        raise UserError(f"content image {path} does not exist (check the path)")
    img = load_image(path, max_pixels=max_pixels)
    img.info["source"] = str(path)
    return img


def content_paths(x) -> list:
    """Expand a folder, a selection JSON (content_paths.json) or a list into image paths / PIL images."""
    if isinstance(x, (list, tuple)):
        return [p for item in x for p in content_paths(item)]
    if isinstance(x, Image.Image):
        return [x]
    if not str(x).strip():
        raise UserError("empty content path: name an image file, a folder of images or a content_paths.json")
    path = Path(x)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p.name) and not is_hidden(p.name))
        if not found:
            raise UserError(f"content folder {path} holds no images (.jpg, .png, .webp, ...)")
        return found
    if path.suffix.lower() == ".json":
        return list(read_selection(path)["paths"])
    return [path]


def load_contents(x, *, limit: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """Content image(s): a path, PIL image, folder, selection JSON or a list of them → RGB images."""
    items = content_paths(x)[:limit]
    if not items:
        raise UserError("no content image given")
    images = [load_content(item, max_pixels=max_pixels) for item in items]
    for item, img in zip(items, images):  # remember where each came from (output names, metadata)
        img.info["source"] = item.info.get("source", "") if isinstance(item, Image.Image) else str(item)
    return images


def working_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(W, H) with the short side = `short` and the long side rounded to a multiple of 8, aspect kept."""
    scale = short / min(width, height)
    snap = lambda v: max(SIZE_MULTIPLE, int(round(v * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)  # noqa: E731
    return (short, snap(height)) if width <= height else (snap(width), short)


def to_working(img: Image.Image, short: int) -> Image.Image:
    """Resize to the working resolution (a no-op when the image is already there)."""
    size = working_size(*img.size, short)
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def to_original(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bring an output back to the content's size and aspect."""
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


def load_mask(mask, size: tuple[int, int]) -> Image.Image:
    """Mask (path, PIL or array; white = stylize) → binary L image at `size` (resized with a Notice)."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask.astype(np.uint8) if mask.dtype != np.uint8 else mask)
    img = load_content(mask) if not isinstance(mask, Image.Image) else ImageOps.exif_transpose(mask)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        img = img.convert("RGBA").getchannel("A")  # painted strokes on a transparent layer
    img = img.convert("L")
    if img.size != size:
        warnings.warn(f"mask is {img.size[0]}x{img.size[1]}, content is {size[0]}x{size[1]}: mask resized to the content",
                      Notice, stacklevel=2)
        img = img.resize(size, Image.Resampling.NEAREST)
    return img.point(lambda v: 255 if v >= 128 else 0)


def default_feather(size: tuple[int, int]) -> int:
    """Feather radius in pixels: ~1/64 of the short side, at least 1."""
    return max(1, min(size) // 64)


def feather_mask(mask: Image.Image, radius: int) -> np.ndarray:
    """Binary L mask → weights in [0, 1] with a Gaussian-blurred edge; exactly 0 far from white pixels."""
    blurred = mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask
    return np.asarray(blurred, dtype=np.float32) / 255.0  # (H, W)


def composite(content: Image.Image, styled: Image.Image, weights: np.ndarray) -> Image.Image:
    """Pixel-space blend: content where weight 0 (exactly its pixels), styled where 1."""
    c = np.asarray(content, dtype=np.float32)  # (H, W, 3)
    s = np.asarray(styled, dtype=np.float32)
    w = weights[..., None]
    out = c * (1.0 - w) + s * w  # w == 0 gives c exactly: integer-valued floats, ×1 and +0 are exact
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def canny_edges(img: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edge map (OpenCV, Canny 1986) as a 3-channel image, the input lllyasviel's canny ControlNet expects."""
    import cv2  # lazy: OpenCV is only needed for canny structure guidance

    edges = cv2.Canny(np.asarray(img.convert("L")), low, high)  # (H, W) uint8 {0, 255}
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def with_settings(img: Image.Image, settings: dict) -> Image.Image:
    """Attach the settings to an image's info (saved as PNG text by `save_image`)."""
    img.info[METADATA_KEY] = json.dumps(settings, sort_keys=True, default=str)
    img.info["parameters"] = a1111_parameters(settings)
    return img


def a1111_parameters(s: dict) -> str:
    """The settings in the WebUI's `parameters` text form, so other tools show them too."""
    styles = ", ".join(f"{x['name']}:{x['scale']}" for x in s.get("styles", [])) or "none"
    fields = [f"Steps: {s.get('steps')}", f"Sampler: {s.get('scheduler')}", f"CFG scale: {s.get('guidance')}",
              f"Seed: {s.get('seed')}", f"Model: {s.get('model')}", f"Styles: {styles}"]
    if s.get("strength") is not None:
        fields.insert(4, f"Denoising strength: {s['strength']}")
    return f"{s.get('prompt', '')}\nNegative prompt: {s.get('negative_prompt', '')}\n" + ", ".join(fields)


def read_settings(path_or_image) -> dict:
    """The customgen settings stored in a PNG (empty dict when there are none)."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    raw = img.info.get(METADATA_KEY) or getattr(img, "text", {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def check_writable(path: str | Path, *, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless `overwrite`; outputs are PNG (the settings live in it)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: outputs are written as .png (the settings are stored in its text chunks)")
    return writable_target(path, overwrite=overwrite)


def writable_target(path: str | Path, *, overwrite: bool, option: str = "--out") -> Path:
    """The one check of an output path (a file or a folder a command will write; stylize, generate, export, bench),
    before any work: refused in one line when it exists without --overwrite or its folder cannot be made or
    written (writable_folder). Missing parent folders are fine: the writer creates them, as save_pretrained does."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it or choose another {option}")
    writable_folder(path.parent, option)
    return path


def writable_folder(folder: str | Path, option: str = "--out") -> Path:
    """Refuse (one line) a folder that cannot be created or written, before any work: a file in the way, a
    read-only file system, no permission. Probed with an unnamed temporary file in the nearest folder that
    exists, so nothing is left behind (the folders below it are created when the output is written)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"cannot write outputs to {folder}: {existing} is a file, not a folder; "
                        f"choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"cannot write outputs to {folder}: {existing} refuses new files ({err.strerror or err}); "
                        f"choose another {option}") from None
    return folder


def save_image(img: Image.Image, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save as PNG with the settings in PNG text metadata; never replaces a file unless `overwrite`."""
    path = check_writable(path, overwrite=overwrite)
    info = PngInfo()
    for key in (METADATA_KEY, "parameters"):
        if key in img.info:
            info.add_text(key, img.info[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)  # atomic: a crash never leaves half an image under the final name
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no partial file
    return path
