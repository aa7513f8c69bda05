"""Deterministic, seeded selection of content / style / instance images, saved as plain JSON.

The JSON files are the shared test set: every notebook and method reads the same paths.
  content_paths.json  {"kind": "content", "layout", "root", "seed", "n_requested", "n_available", "paths": [...]}
  style_paths.json    {"kind": "style", "layout", "root", "seed", "per_style", "styles": {style: [...]}}
  instance_paths.json {"kind": "instance", "layout", "root", "seed", "paths": [...],
                       "items": [{"path", "caption", "repeats", "label"}]}
Paths are absolute; `read_selection(path, root=NEW)` re-roots them when the data moved.
"""
from __future__ import annotations

import difflib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from customgen.data.scan import ImageRecord, ScanResult
from customgen.errors import UserError

SELECTION_FILES = {"content": "content_paths.json", "style": "style_paths.json", "instance": "instance_paths.json"}
KIND_OF_LAYOUT = {"coco": "content", "wikiart": "style", "folder": "instance", "kohya": "instance"}
DEFAULT_N_CONTENT = 50  # content test-set size (COCO val2017 / a folder)
DEFAULT_N_STYLES = 5  # styles picked by image count when none are named
DEFAULT_PER_STYLE = 20  # style reference images per style


def sample_paths(paths: Sequence[str], n: int | None, seed: str | int) -> list[str]:
    """n paths drawn without replacement; sorted first so the file-system order never matters."""
    ordered = sorted(paths)
    if n is None or n >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, n))


def select_content(records: Sequence[ImageRecord], *, n: int | None = DEFAULT_N_CONTENT, seed: int = 0) -> list[str]:
    """n content image paths chosen with `seed` (all of them when n is None or larger than the pool)."""
    if not records:
        raise UserError("no usable content images to select from; check the scan report for skipped/small files")
    return sample_paths([r.path for r in records], n, seed)


def choose_styles(counts: dict[str, int], *, styles: Sequence[str] | None = None,
                  n_styles: int = DEFAULT_N_STYLES) -> list[str]:
    """The named styles (validated against `counts`), else the n_styles with most usable images."""
    if styles is None:
        ranked = sorted((s for s, c in counts.items() if c > 0), key=lambda s: (-counts[s], s))
        return ranked[:n_styles]
    for name in styles:
        if counts.get(name, 0) == 0:
            lower = {s.lower(): s for s in counts}  # case-insensitive: "cubism" suggests "Cubism"
            close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
            hint = f"did you mean {', '.join(close)}?" if close else "see the scan report for style names"
            raise UserError(f"style {name!r} has no usable images; {hint}")
    return list(styles)


def select_styles(records: Sequence[ImageRecord], *, styles: Sequence[str] | None = None,
                  n_styles: int = DEFAULT_N_STYLES, per_style: int | None = DEFAULT_PER_STYLE,
                  seed: int = 0) -> dict[str, list[str]]:
    """style → per_style paths; each style draws with its own seed so adding a style changes no other."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.label or "", []).append(r.path)
    chosen = choose_styles({k: len(v) for k, v in groups.items()}, styles=styles, n_styles=n_styles)
    if not chosen:
        raise UserError("no usable style images to select from; check the scan report for skipped/small files")
    return {s: sample_paths(groups[s], per_style, f"{seed}:{s}") for s in chosen}


def build_selection(scan: ScanResult, *, seed: int = 0, n_content: int | None = DEFAULT_N_CONTENT,
                    styles: Sequence[str] | None = None, n_styles: int = DEFAULT_N_STYLES,
                    per_style: int | None = DEFAULT_PER_STYLE) -> dict:
    """The selection document (see module docstring) that fits the scan's layout."""
    kind = KIND_OF_LAYOUT[scan.layout]
    doc = {"kind": kind, "layout": scan.layout, "root": str(scan.root), "seed": seed}
    if kind == "content":
        paths = select_content(scan.records, n=n_content, seed=seed)
        return doc | {"n_requested": n_content, "n_available": len(scan.records), "paths": paths}
    if kind == "style":
        chosen = select_styles(scan.records, styles=styles, n_styles=n_styles, per_style=per_style, seed=seed)
        return doc | {"per_style": per_style, "styles": chosen}
    if not scan.records:
        raise UserError(f"no usable instance images under {scan.root}; check the scan report for skipped/small files")
    items = [{"path": r.path, "caption": r.caption, "repeats": r.repeats, "label": r.label}
             for r in sorted(scan.records, key=lambda r: r.path)]
    return doc | {"paths": [i["path"] for i in items], "items": items}


def check_writable(paths: Sequence[Path], *, overwrite: bool) -> None:
    """UserError naming the first existing file unless overwrite is set."""
    for p in paths:
        if p.exists() and not overwrite:
            raise UserError(f"{p} already exists; pass --overwrite (overwrite=True) to replace it")


def write_json(path: Path, doc: dict) -> Path:
    """Write `doc` as indented UTF-8 JSON (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_selection(doc: dict, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a selection document to OUT/<kind>_paths.json; refuses to overwrite unless asked."""
    path = Path(out) / SELECTION_FILES[doc["kind"]]
    check_writable([path], overwrite=overwrite)
    return write_json(path, doc)


def _reroot(paths: list[str], old: str, new: Path | None) -> list[Path]:
    """Absolute paths; with `new`, paths under `old` are moved under `new`."""
    if new is None:
        return [Path(p) for p in paths]
    return [new / Path(p).relative_to(old) if Path(p).is_relative_to(old) else Path(p) for p in paths]


def read_selection(path: str | Path, *, root: str | Path | None = None, check: bool = True) -> dict:
    """Load a selection JSON as a dict with Path values; `root` re-roots it; missing files → UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"selection file {path} not found; run `customgen data scan ROOT --out DIR` first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    new = Path(root).resolve() if root is not None else None
    if "styles" in doc:
        doc["styles"] = {s: _reroot(v, doc["root"], new) for s, v in doc["styles"].items()}
    if "paths" in doc:
        doc["paths"] = _reroot(doc["paths"], doc["root"], new)
    for item, p in zip(doc.get("items", []), doc.get("paths", [])):
        item["path"] = p
    every = doc.get("paths", []) + [p for v in doc.get("styles", {}).values() for p in v]
    missing = [p for p in every if check and not p.exists()]
    if missing:
        raise UserError(f"{len(missing)} selected files are missing (first: {missing[0]}); "
                        "pass root= the data's new location")
    doc["root"] = str(new or doc["root"])
    return doc
