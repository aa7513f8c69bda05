"""A small synthetic dataset for the quickstart and smoke runs: three procedural 'styles' laid out
like Kaggle's WikiArt (one folder per style) and a COCO-like folder of simple scenes.

These images only make every step of the pipeline runnable offline; they say nothing about quality.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STYLES = ("Stripes", "Dots", "Waves")


def _style_image(style: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A procedural 'painting': a palette and a texture per style."""
    y, x = np.mgrid[0:size, 0:size] / size
    hue = rng.uniform(0, 1, 3)
    if style == "Stripes":
        t = np.sin(2 * np.pi * (x * rng.uniform(4, 9) + y * rng.uniform(-2, 2)))
    elif style == "Dots":
        f = rng.uniform(6, 12)
        t = np.cos(2 * np.pi * f * x) * np.cos(2 * np.pi * f * y)
    else:
        t = np.sin(2 * np.pi * (y * rng.uniform(3, 6) + 0.3 * np.sin(2 * np.pi * x * rng.uniform(1, 3))))
    rgb = 0.5 + 0.5 * np.stack([np.sin(2 * np.pi * (t * 0.3 + h)) for h in hue], -1)
    return Image.fromarray((255 * rgb).astype(np.uint8))


def _content_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A simple 'photo': a sky/ground gradient with a few solid shapes."""
    y = np.linspace(0, 1, size)[:, None, None]
    top, bottom = rng.uniform(0.4, 1, 3), rng.uniform(0, 0.6, 3)
    img = Image.fromarray((255 * (top * (1 - y) + bottom * y) * np.ones((size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=color)
    return img


def write_samples(out: str | Path, *, per_style: int = 8, n_content: int = 6, size: int = 256, seed: int = 0) -> dict:
    """Write OUT/wikiart/<Style>/*.jpg and OUT/coco/val2017/*.jpg; returns their roots."""
    out, rng = Path(out), np.random.default_rng(seed)
    for style in STYLES:
        for i in range(per_style):
            path = out / "wikiart" / style / f"{style.lower()}_{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _style_image(style, rng, size).save(path, quality=92)
    for i in range(n_content):
        path = out / "coco" / "val2017" / f"{i + 1:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        _content_image(rng, size).save(path, quality=92)
    return {"wikiart": out / "wikiart", "coco": out / "coco" / "val2017"}
