"""Near-duplicate detection with a perceptual hash.

Hand-written: none of the listed dependencies ships a perceptual hash (imagehash is not one of them),
and dHash is a dozen lines of PIL + numpy (Krawetz, "Kind of like that", 2013).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from customgen.data.io import DEFAULT_MAX_PIXELS, ImageRejected, load_image


def image_hash(img: Image.Image, *, kind: str = "dhash", size: int = 8) -> int:
    """64-bit perceptual hash of an image: dHash (adjacent-pixel gradient) or aHash (above-mean)."""
    gray = img.convert("L")
    if kind == "dhash":
        px = np.asarray(gray.resize((size + 1, size), Image.Resampling.BOX), dtype=np.int16)
        bits = (px[:, 1:] > px[:, :-1]).ravel()  # (size*size,)
    elif kind == "ahash":
        px = np.asarray(gray.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
        bits = (px > px.mean()).ravel()
    else:
        raise ValueError(f"unknown hash kind {kind!r}; choose from 'dhash', 'ahash'")
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bit count of uint64 values (numpy>=2 has bitwise_count; older numpy uses a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x[..., None].view(np.uint8)].sum(axis=-1)


def _union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (size ≥ 2) of the graph given by `pairs`."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def group_hashes(hashes: Sequence[int], *, threshold: int = 6, block: int = 256) -> list[list[int]]:
    """Index groups whose hashes are within `threshold` bits (transitively), compared in numpy blocks."""
    h = np.array([x & (2**64 - 1) for x in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), block):
        dist = _popcount(h[start:start + block, None] ^ h[None, :])  # (block, N); 80k images ≈ 20 s
        rows, cols = np.nonzero(dist <= threshold)
        keep = cols > rows + start  # each pair once, no self-pairs
        pairs.extend(zip((rows[keep] + start).tolist(), cols[keep].tolist()))
    return _union_find_groups(len(h), pairs)


def find_near_duplicates(items: Sequence, *, threshold: int = 6, kind: str = "dhash",
                         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[list[str]]:
    """Groups of paths (or ImageRecords) whose hashes differ by ≤ threshold bits; unreadable files left out."""
    # A record's dHash stored by the scan is reused, so grouping a scanned WikiArt decodes nothing again.
    paths, hashes = [], []
    for item in items:
        path = str(getattr(item, "path", item))
        stored = getattr(item, "dhash", None)
        if stored is not None and kind == "dhash":
            hashes.append(int(stored, 16))
        else:
            try:
                hashes.append(image_hash(load_image(path, max_pixels=max_pixels, draft_size=(64, 64)), kind=kind))
            except ImageRejected:
                continue
        paths.append(path)
    groups = group_hashes(hashes, threshold=threshold)
    return sorted(sorted(paths[i] for i in g) for g in groups)


def drop_near_duplicates(items: Sequence, groups: Sequence[Sequence[str]]) -> list:
    """`items` (paths or records) without the 2nd, 3rd... member of each group; the first path is kept."""
    drop = {p for g in groups for p in list(g)[1:]}
    return [it for it in items if str(getattr(it, "path", it)) not in drop]
