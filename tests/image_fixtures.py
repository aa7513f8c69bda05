"""Fixture images and data trees written with PIL, for tests and notebook smoke runs (no downloads)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_STYLES = {"Impressionism": 6, "Cubism": 5, "Baroque": 4}


def textured_image(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """A smooth random colour field: distinct per seed, stable under JPEG recompression (good for hashes)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    """Save `img` to `path`, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def make_wikiart_tree(root: Path, *, styles: dict[str, int] | None = None, size=(320, 288),
                      with_csv: bool = True, seed: int = 0) -> Path:
    """root/<Style>/<n>.jpg for each style (Kaggle WikiArt shape), plus classes.csv when with_csv."""
    styles = DEFAULT_STYLES if styles is None else styles
    rows = []
    for s_idx, (style, n) in enumerate(styles.items()):
        for i in range(n):
            name = f"{style.lower()}_{i:03d}.jpg"
            save(textured_image(seed + 1000 * s_idx + i, size), root / style / name, quality=92)
            rows.append([f"{style}/{name}", "artist", style])
    if with_csv:
        with (root / "classes.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["filename", "artist", "genre"], *rows])
    return root


def make_coco_folder(root: Path, *, n: int = 8, split: str = "val2017", size=(320, 256), seed: int = 500) -> Path:
    """root/<split>/000000xxxxxx.jpg like COCO 2017; returns root/<split>."""
    for i in range(n):
        save(textured_image(seed + i, size), root / split / f"{i + 139:012d}.jpg", quality=90)
    return root / split


def make_instance_folder(root: Path, *, n: int = 5, size=(256, 256), seed: int = 900) -> Path:
    """A plain folder of n subject photos."""
    for i in range(n):
        save(textured_image(seed + i, size), root / f"photo_{i}.png")
    return root


def make_kohya_tree(root: Path, *, folders: dict[str, int] | None = None, size=(128, 128), seed: int = 700) -> Path:
    """root/<'10_sks person'>/img_i.png at 128 px; the first image of each folder gets a .txt caption."""
    folders = {"10_sks person": 3, "2_ohwx dog": 2} if folders is None else folders
    for f_idx, (folder, n) in enumerate(folders.items()):
        for i in range(n):
            save(textured_image(seed + 100 * f_idx + i, size), root / folder / f"img_{i}.png")
        (root / folder / "img_0.txt").write_text(f"a photo of {folder.split('_', 1)[1]}, custom caption\n")
    return root


def write_broken_files(folder: Path) -> dict[str, str]:
    """Corrupt, truncated and empty image files in `folder`: name → the skip reason a scan must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    for ext in ("jpg", "png"):
        buf = folder / f"full.{ext}.tmp"
        textured_image(1, (200, 160)).save(buf, format="JPEG" if ext == "jpg" else "PNG")
        data = buf.read_bytes()
        buf.unlink()
        (folder / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
    return {"corrupt.jpg": "not_an_image", "empty.jpg": "empty", "truncated.jpg": "truncated",
            "truncated.png": "truncated"}


def write_ignored_files(folder: Path) -> list[Path]:
    """Files a scan must never open: notes, CSV, hidden files, macOS debris, notebook checkpoints."""
    paths = [folder / "notes.txt", folder / "meta.csv", folder / ".hidden.jpg",
             folder / "__MACOSX" / "._x.jpg", folder / ".ipynb_checkpoints" / "y.jpg"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"garbage")
    return paths


def exif_rotated_jpeg(path: Path, *, orientation: int = 6) -> Path:
    """A 60x40 JPEG (left half red, right half blue) whose EXIF says rotate (6 = 90° clockwise for display)."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), path, exif=exif, quality=95)


def gradient_png16(path: Path, *, width: int = 256) -> Path:
    """A 16-bit grayscale (I;16) PNG: a horizontal ramp 0 → 65535."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)[None].repeat(8, 0)
    return save(Image.fromarray(ramp), path)


def rgba_png(path: Path) -> Path:
    """64x64 RGBA: left half fully transparent red, right half opaque blue."""
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:, :32] = (255, 0, 0, 0)
    arr[:, 32:] = (0, 0, 255, 255)
    return save(Image.fromarray(arr, "RGBA"), path)


def palette_png(path: Path) -> Path:
    """64x64 palette (P) PNG in pure green."""
    return save(Image.new("RGB", (64, 64), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE), path)


def cmyk_jpeg(path: Path) -> Path:
    """64x64 CMYK JPEG of pure red (C=0, M=255, Y=255, K=0)."""
    return save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), path, quality=95)


def make_eda_fixture(root: Path) -> dict[str, Path]:
    """WikiArt-like tree (3 styles, a broken and a small file, one near-duplicate) and a COCO val2017 folder."""
    wikiart = make_wikiart_tree(root / "wikiart")
    write_broken_files(root / "wikiart" / "Baroque")
    save(textured_image(77, (120, 100)), wikiart / "Cubism" / "small.jpg")
    Image.open(wikiart / "Impressionism" / "impressionism_000.jpg").save(
        wikiart / "Impressionism" / "impressionism_000_copy.jpg", quality=60)
    coco = make_coco_folder(root / "coco", n=8)
    return {"wikiart": wikiart, "coco": coco}
