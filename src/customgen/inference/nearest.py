"""Style from an image without the IP-Adapter: pick the library style whose CLIP embedding is closest.

A style is represented by its reference images (`references/`, else the training `samples/` in the artifact
folder), or, when it has none, by a preview rendered with it. Distances are 1 − cosine (Radford et al. 2021).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from customgen.data.io import is_hidden, is_image_name
from customgen.errors import Notice, UserError
from customgen.inference.images import load_content
from customgen.inference.library import Style
from customgen.metrics import get_default_networks

REFERENCE_DIRS = ("references", "samples")  # looked up in this order inside the artifact folder
MAX_REFERENCES = {"references": 16, "samples": 4}  # samples/step-NNNNNN.png: only the latest show the style


def style_references(style: Style) -> list[Path]:
    """Reference images stored with the artifact: references/, else the latest training samples/."""
    for sub in REFERENCE_DIRS:
        folder = style.folder / sub
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if is_image_name(p.name) and not is_hidden(p.name))
            if found:
                return found[:MAX_REFERENCES[sub]] if sub == "references" else found[-MAX_REFERENCES[sub]:]
    return []


def default_embedder():
    """customgen.metrics' CLIP (open_clip; real weights when cached, else a random smoke network, with a Notice)."""
    clip = get_default_networks().clip
    if clip.smoke:
        warnings.warn("no CLIP weights available (offline?): the nearest style is picked with a random network",
                      Notice, stacklevel=3)
    return clip


def embed(embedder, images: Sequence[Image.Image]) -> np.ndarray:
    """(N, D) unit-norm embeddings from a callable(images) or an object with `.encode(images)`."""
    fn = embedder.encode if hasattr(embedder, "encode") else embedder
    feats = np.asarray(fn(list(images)), dtype=np.float64)  # (N, D)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def nearest_style(image: Image.Image, styles: Sequence[Style], *, embedder=None,
                  preview: Callable[[Style], Image.Image] | None = None) -> tuple[Style, dict[str, float]]:
    """The style closest to `image` in CLIP space, and every candidate's distance (1 − cos)."""
    embedder = embedder if embedder is not None else default_embedder()
    query = embed(embedder, [image])[0]  # (D,)
    distances, by_name = {}, {}
    for style in styles:
        refs = [load_content(p) for p in style_references(style)]
        if not refs and preview is not None:
            refs = [preview(style)]
        if not refs:
            continue
        mean = embed(embedder, refs).mean(axis=0)
        distances[style.name] = float(1.0 - mean @ query / max(np.linalg.norm(mean), 1e-12))
        by_name[style.name] = style
    if not distances:
        raise UserError("no library style to compare the style image with: add styles to the library "
                        f"(with {' or '.join(REFERENCE_DIRS)}/ images) or use --style-image-mode ip-adapter")
    best = min(distances, key=distances.get)
    return by_name[best], distances
