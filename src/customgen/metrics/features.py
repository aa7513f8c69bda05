"""Image encoders (CLIP, Inception, smoke CNN) behind one protocol, with a feature cache keyed by file hash."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from customgen.metrics.images import ImageLike, image_digest, load_image


@runtime_checkable
class ImageEncoder(Protocol):
    """What CLIP scores and FID/KID need from a network: a stable name, a smoke flag, and features."""

    name: str  # identifies architecture *and* weights: it is part of the cache key
    smoke: bool  # random weights: numbers are plumbing checks

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images → (N, D) float32 features."""
        ...


class FeatureCache:
    """Features by (encoder name, sha1 of image bytes): in memory, plus one .safetensors per image on disk."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[tuple[str, str], np.ndarray] = {}

    def _path(self, encoder_name: str, digest: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder_name)
        return self.cache_dir / slug / f"{digest}.safetensors"

    def get(self, encoder_name: str, digest: str) -> np.ndarray | None:
        key = (encoder_name, digest)
        if key in self._mem:
            return self._mem[key]
        if self.cache_dir is not None and self._path(encoder_name, digest).is_file():
            feat = load_file(str(self._path(encoder_name, digest)))["features"]
            self._mem[key] = feat
            return feat
        return None

    def put(self, encoder_name: str, digest: str, feat: np.ndarray) -> None:
        feat = np.ascontiguousarray(feat, dtype=np.float32)
        self._mem[(encoder_name, digest)] = feat
        if self.cache_dir is not None:
            path = self._path(encoder_name, digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"features": feat}, str(tmp), metadata={"encoder": encoder_name, "sha1": digest})
            tmp.replace(path)  # atomic: a crashed run never leaves a half-written entry

    def __len__(self) -> int:
        return len(self._mem)


def encode_images(images: Sequence[ImageLike], encoder: ImageEncoder, *, cache: FeatureCache | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Features (N, D) for images, computing only those not yet in the cache."""
    digests = [image_digest(x) for x in images]
    feats: list[np.ndarray | None] = [cache.get(encoder.name, d) if cache is not None else None for d in digests]
    first = {}  # digest → first index needing it: identical images are encoded once
    for i, f in enumerate(feats):
        if f is None:
            first.setdefault(digests[i], i)
    todo = list(first.values())
    computed: dict[str, np.ndarray] = {}
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        out = np.asarray(encoder.encode([load_image(images[i]) for i in idx]), dtype=np.float32)  # (b, D)
        for i, f in zip(idx, out):
            computed[digests[i]] = f
            if cache is not None:
                cache.put(encoder.name, digests[i], f)
    if not feats:
        raise ValueError("encode_images: no images given")
    return np.stack([f if f is not None else computed[d] for f, d in zip(feats, digests)])  # (N, D)
