"""What an evaluation runs on: the styles (library artifacts), the content set and each style's references.

Reference rule: an artifact's references are the WikiArt folder of the style it was trained on, read
from the `data.style` of the `config.yaml` saved beside it; when that is empty (or there is no
config.yaml), the manifest name and then the library folder name are matched against the reference
styles (case-insensitive: equal, else the longest style name contained in it). An artifact that names
a style missing from the references is an error; one that names none gets no style metrics. A file from elsewhere
(a loose .safetensors/.pt in the styles folder, or eval.styles naming one) has no config.yaml: `eval.references`
names its reference style or a folder of its reference images, else it is matched by name like an artifact, else
it gets the content metrics only (summary.md lists such styles). Subjects (artifacts whose recipe targets a subject)
are not styles: customgen.evaluate.subjects scores them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from customgen.data import read_selection, scan_images, select_content
from customgen.data.scan import COCO_SPLITS, check_root, resolve_root, subdirs
from customgen.data.select import sample_paths
from customgen.errors import Notice, UserError
from customgen.inference.library import Style, StyleLibrary, is_style_file, load_file_style, load_style
from customgen.kinds import MANIFEST, RECIPES

DEFAULT_MIN_SIZE = 256  # shorter side below which content/reference images are skipped (as in `data scan`)


@dataclass
class EvalStyle(Style):
    """One artifact under evaluation: a library Style plus its reference style (None: no style metrics)."""

    reference: str | None = None


@dataclass
class EvalInputs:
    """Resolved inputs: styles to run, content images, reference images per style."""

    styles: list[EvalStyle]
    contents: list[Path]
    references: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def reference_styles(self) -> list[str]:
        """The reference styles some artifact uses, in a stable order (the baseline gets one row each)."""
        return sorted({s.reference for s in self.styles if s.reference})


def load_styles(folder: str, methods: list[str]) -> list:
    """Library styles in `folder` (eval.styles; an artifact's own folder is a library of that one artifact, a style
    file one of that file), only those whose manifest method is in `methods` if given."""
    if not folder:
        raise UserError("eval.styles is not set: point it at the folder of trained artifacts (e.g. outputs)")
    root = Path(folder).expanduser()
    if is_style_file(root):
        return [load_file_style(root)]
    if not root.is_dir():
        raise UserError(f"eval.styles folder {root} does not exist; train styles first (customgen train CONFIG) "
                        "or set eval.styles to the folder that holds them")
    styles = [load_style(root)] if (root / MANIFEST).is_file() else StyleLibrary(root).styles()
    if not styles:
        raise UserError(f"eval.styles folder {root} holds no artifacts (sub-folders with style.json)")
    if methods:
        found = sorted({s.manifest.method for s in styles})
        styles = [s for s in styles if s.manifest.method in methods]
        if not styles:
            raise UserError(f"no artifact in {root} has a method in eval.methods {methods}; found: {', '.join(found)}")
    return styles


def _scan(root: str, *, layout: str, min_size: int, key: str):
    """Usable image records under `root`; scan errors name the config key they came from."""
    try:
        return scan_images(root, layout=layout, min_size=min_size).records
    except UserError as err:
        raise UserError(f"{key}: {err}") from err


def load_contents(e) -> list[Path]:
    """Content images: eval.content_paths (a selection JSON) or a seeded choice from eval.content_root."""
    if e.content_paths:
        paths = list(read_selection(e.content_paths)["paths"])
        chosen = paths[: e.max_contents]
    elif e.content_root:
        coco = Path(e.content_root).name in COCO_SPLITS or any((Path(e.content_root) / s).is_dir() for s in COCO_SPLITS)
        records = _scan(e.content_root, layout="coco" if coco else "folder", min_size=_min_size(e),
                        key="eval.content_root")
        if not records:
            raise UserError(f"eval.content_root {e.content_root} holds no usable images "
                            f"(shorter side >= {_min_size(e)} px; lower eval.min_size for small images)")
        chosen = [Path(p) for p in select_content(records, n=e.max_contents, seed=e.seed)]
    else:
        raise UserError("no content images: set eval.content_root (a folder of photos, e.g. COCO val2017) "
                        "or eval.content_paths (content_paths.json from `customgen data scan`)")
    if not chosen:
        raise UserError("the content set is empty: check eval.content_paths / eval.content_root and eval.max_contents")
    return chosen


def _min_size(e) -> int:
    return DEFAULT_MIN_SIZE if e.min_size is None else int(e.min_size)


def available_references(e) -> dict[str, Path | list[Path]]:
    """Style name → folder (eval.style_root, scanned lazily) or → paths (eval.style_paths)."""
    if e.style_paths:
        return dict(read_selection(e.style_paths)["styles"])
    if e.style_root:
        root = resolve_root(check_root(e.style_root), "wikiart")
        return {d.name: d for d in subdirs(root)}
    if e.references:
        return {}  # only the folders eval.references names
    raise UserError("no style references: set eval.style_root (WikiArt root, one folder per style) "
                    "or eval.style_paths (style_paths.json from `customgen data scan`)")


def is_subject(style) -> bool:
    """Whether an artifact's recipe learns a subject (scored by customgen.evaluate.subjects), not a style."""
    found = RECIPES.get(style.manifest.method)
    return found is not None and found.target == "subject"


def artifact_config(folder: Path) -> dict:
    """The config.yaml training saved beside an artifact, as plain data ({} when absent or unreadable)."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def trained_style(folder: Path) -> str:
    """`data.style` of the config.yaml saved beside an artifact ("" when absent)."""
    return str((artifact_config(folder).get("data") or {}).get("style") or "")


def match_reference(style, available: list[str], named: str = "") -> str | None:
    """The reference style of an artifact or file (module docstring): `named` (eval.references), else its config's
    data.style, else by name; UserError when it names a missing one."""
    by_lower = {a.lower(): a for a in available}
    named = named or (trained_style(style.folder) if style.source is None else "")  # a file's folder is not its own
    if named:
        if named.lower() in by_lower:
            return by_lower[named.lower()]
        raise UserError(f"style {style.name} was trained on {named!r}, which is not among the style references "
                        f"({', '.join(sorted(available)) or 'none'}); add it to eval.style_root / eval.style_paths")
    for name in (style.manifest.name, style.name):
        if name.lower() in by_lower:
            return by_lower[name.lower()]
        contained = [a for a in available if a.lower() in name.lower()]
        if contained:
            return max(contained, key=len)
    return None


def select_references(e, available: dict, needed: list[str]) -> dict[str, list[Path]]:
    """At most eval.max_references images per needed style (seeded), from folders or a selection."""
    out = {}
    for style in needed:
        source = available[style]
        if isinstance(source, Path):
            paths = [r.path for r in _scan(str(source), layout="folder", min_size=_min_size(e), key="eval.style_root")]
        else:
            paths = [str(p) for p in source]
        if not paths:
            raise UserError(f"style {style} has no usable reference images (shorter side >= {_min_size(e)} px)")
        out[style] = [Path(p) for p in sample_paths(paths, e.max_references, f"{e.seed}:{style}")]
    return out


def resolve_inputs(cfg, library: list | None = None) -> EvalInputs:
    """Styles (the library's artifacts that are not subjects), contents and references for cfg.eval, each problem
    as a one-line UserError."""
    e = cfg.eval
    library = [s for s in (load_styles(e.styles, list(e.methods)) if library is None else library)
               if not is_subject(s)]
    contents = load_contents(e)
    available = available_references(e)
    named = dict(e.references)
    for name, ref in e.references.items():  # a folder of reference images, named after the folder
        folder = Path(ref).expanduser()
        if ref not in available and folder.is_dir():
            key = folder.name if folder.name not in available else str(folder)
            available[key], named[name] = folder, key
    unknown = sorted(set(e.references) - {s.name for s in library})
    if unknown:
        raise UserError(f"eval.references names {', '.join(unknown)}, which eval.styles does not hold "
                        f"({', '.join(s.name for s in library)})")
    styles = []
    for s in library:
        ref = match_reference(s, list(available), named.get(s.name, ""))
        if ref is None:
            warnings.warn(f"style {s.name} names no reference style (data.style); it gets no style metrics",
                          Notice, stacklevel=2)
        styles.append(EvalStyle(s.name, s.folder, s.manifest, source=s.source, reference=ref))
    needed = sorted({s.reference for s in styles if s.reference})
    return EvalInputs(styles, contents, select_references(e, available, needed))
