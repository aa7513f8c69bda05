"""Find the WikiArt and COCO roots of attached Kaggle datasets by their shape, not their names."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from customgen.data.scan import COCO_SPLITS, has_images, subdirs
from customgen.errors import UserError

KAGGLE_INPUT = "/kaggle/input"


def _is_wikiart(folder: Path, min_styles: int) -> int:
    """Number of image-holding sub-folders when there are at least min_styles of them, else 0."""
    try:
        n = sum(has_images(d) for d in subdirs(folder) if d.name not in COCO_SPLITS)
    except OSError:
        return 0
    return n if n >= min_styles else 0


def _walk_dirs(base: Path, max_depth: int):
    """(folder, depth) breadth-first to max_depth, hidden folders skipped, unreadable ones tolerated."""
    level = [base]
    for depth in range(max_depth + 1):
        nxt = []
        for folder in level:
            yield folder, depth
            try:
                nxt += subdirs(folder)
            except OSError:
                continue
        level = nxt


def find_kaggle_roots(base: str | Path = KAGGLE_INPUT, *, max_depth: int = 5, min_styles: int = 5) -> dict:
    """{"wikiart": Path | None, "coco": Path | None} found under `base` (COCO val2017 preferred over train2017)."""
    base = Path(base)
    found: dict[str, Path | None] = {"wikiart": None, "coco": None}
    if not base.is_dir():
        return found
    best_styles, coco = 0, {}
    for folder, _ in _walk_dirs(base, max_depth):
        if folder.name in COCO_SPLITS and folder.name not in coco and has_images(folder):
            coco[folder.name] = folder
            continue
        n = _is_wikiart(folder, min_styles)
        if n > best_styles:
            best_styles, found["wikiart"] = n, folder
    found["coco"] = next((coco[s] for s in COCO_SPLITS if s in coco), None)
    return found


def resolve_data_roots(*, wikiart: str | Path | None = None, coco: str | Path | None = None,
                       base: str | Path = KAGGLE_INPUT, need: Sequence[str] = ("wikiart", "coco")) -> dict:
    """Given roots as they are; missing ones found under `base`; UserError naming what to attach or set."""
    roots = {"wikiart": Path(wikiart) if wikiart else None, "coco": Path(coco) if coco else None}
    if any(roots[k] is None for k in need):
        found = find_kaggle_roots(base)
        roots = {k: roots[k] or found[k] for k in roots}
    for key in need:
        if roots[key] is None:
            raise UserError(f"no {key} images found under {base}; attach the dataset (Add Data) "
                            f"or set {key.upper()}_ROOT to its folder")
    return roots
