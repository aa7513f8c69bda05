"""Find and check the images of a data root in one of four layouts: wikiart, coco, folder, kohya."""
from __future__ import annotations

import csv
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from customgen.data.dedup import image_hash
from customgen.data.io import DEFAULT_MAX_PIXELS, ImageRejected, is_hidden, is_image_name, probe_image
from customgen.errors import UserError

LAYOUTS = ("wikiart", "coco", "folder", "kohya")
COCO_SPLITS = ("val2017", "train2017")  # val2017 first: 5k images are plenty for a content test set
# Short side (px) below which an image is listed as `small` and left out of selections. Kohya and
# instance photos are upscaled to the training resolution anyway, so 128-px images stay usable there.
DEFAULT_MIN_SIZE = {"wikiart": 256, "coco": 256, "folder": 64, "kohya": 64}
KOHYA_DIR = re.compile(r"^(\d+)_(\S.*)$")  # "10_sks person" → repeats 10, "sks person"
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: path, group label (style / kohya folder), caption, kohya repeats, size, dHash hex."""

    path: str
    label: str | None = None
    caption: str | None = None
    repeats: int = 1
    width: int = 0
    height: int = 0
    dhash: str | None = None


@dataclass
class ScanResult:
    """What a scan found: usable records, small images, skipped files with reasons, ignored files, CSV info."""

    root: Path
    layout: str
    min_size: int
    max_pixels: int | None
    records: list[ImageRecord] = field(default_factory=list)
    small: list[ImageRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}
    ignored: list[str] = field(default_factory=list)
    csv: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Usable images per label, largest first (ties by name)."""
        c = Counter(r.label or "" for r in self.records)
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    def by_label(self) -> dict[str, list[ImageRecord]]:
        """Usable records grouped by label, labels sorted by name."""
        out: dict[str, list[ImageRecord]] = {}
        for r in self.records:
            out.setdefault(r.label or "", []).append(r)
        return dict(sorted(out.items()))


def parse_kohya_name(name: str) -> tuple[int, str, str | None] | None:
    """'10_sks person' → (10, 'sks', 'person'); None when the folder name is not kohya-style."""
    m = KOHYA_DIR.match(name)
    if not m:
        return None
    token, _, cls = m.group(2).strip().partition(" ")
    return int(m.group(1)), token, cls.strip() or None


def check_root(root: str | Path) -> Path:
    """The root as an absolute Path, or a one-line UserError when it is missing, a file or unreadable."""
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"data root {path} does not exist; check the path (on Kaggle: under /kaggle/input)")
    if not path.is_dir():
        raise UserError(f"data root {path} is a file; pass the folder that contains the images")
    try:
        with os.scandir(path) as it:
            next(it, None)
    except PermissionError:
        raise UserError(f"cannot read data root {path}: permission denied; fix its permissions") from None
    return path.resolve()


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))


def has_images(folder: Path) -> bool:
    """True when the folder directly holds at least one image-named visible file."""
    with os.scandir(folder) as it:
        return any(e.is_file() and not is_hidden(e.name) and is_image_name(e.name) for e in it)


def _coco_split(root: Path) -> Path | None:
    """root itself when it is val2017/train2017, else such a child (val2017 preferred), else None."""
    if root.name in COCO_SPLITS:
        return root
    return next((root / s for s in COCO_SPLITS if (root / s).is_dir()), None)


def detect_layout(root: Path, *, _depth: int = 0) -> tuple[str, Path]:
    """Guess (layout, resolved root) from the folder structure; UserError when it is ambiguous."""
    split = _coco_split(root)
    if split is not None:
        return "coco", split
    if parse_kohya_name(root.name):
        return "kohya", root
    subs = subdirs(root)
    if any(parse_kohya_name(d.name) for d in subs):
        return "kohya", root
    if sum(has_images(d) for d in subs) >= 2:
        return "wikiart", root
    if has_images(root):
        return "folder", root
    if len(subs) == 1 and _depth < 2:  # e.g. /kaggle/input/wikiart/wikiart
        return detect_layout(subs[0], _depth=_depth + 1)
    raise UserError(f"cannot tell the layout of {root}; pass --layout " + "|".join(LAYOUTS))


def resolve_root(root: Path, layout: str) -> Path:
    """Where the images of an explicit layout live (COCO split folder, a single wrapping folder skipped)."""
    if layout == "coco":
        return _coco_split(root) or root
    if layout == "wikiart" and not any(has_images(d) for d in subdirs(root)):
        subs = subdirs(root)
        if len(subs) == 1:  # wikiart/wikiart
            return resolve_root(subs[0], layout)
    return root


def _walk(folder: Path, errors: list[dict], *, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """(image files, other visible files) under folder, sorted; hidden files and folders are not listed."""
    images, others = [], []

    def onerror(err: OSError) -> None:
        errors.append({"path": str(err.filename), "reason": "unreadable", "detail": err.strerror or str(err)})

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d)) if recursive else []
        for name in sorted(filenames):
            if not is_hidden(name):
                (images if is_image_name(name) else others).append(Path(dirpath) / name)
    return images, others


def read_caption(image: Path, extension: str = "") -> str | None:
    """Text of a kohya sidecar caption (image.txt or image.caption, or only `extension`), whitespace collapsed; None if
    absent."""
    for ext in (extension,) if extension else CAPTION_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
            return text or None
    return None


def read_csv_info(root: Path) -> dict:
    """Rows and columns of the CSV files at the root (WikiArt's classes.csv etc.): extra info, never required."""
    info = {}
    for path in sorted(root.glob("*.csv")):
        try:
            with path.open(newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.reader(f)
                columns = next(reader, [])
                info[path.name] = {"rows": sum(1 for _ in reader), "columns": columns}
        except (OSError, csv.Error) as err:
            info[path.name] = {"error": str(err)}
    return info


_Candidate = tuple[Path, str | None, str | None, int]  # path, label, caption, repeats


def _kohya_candidates(root: Path, errors: list[dict], ext: str = "") -> tuple[list[_Candidate], list[Path]]:
    """Images of every 'N_token class' folder (root itself may be one); other folders are ignored."""
    dirs = [root] if parse_kohya_name(root.name) else subdirs(root)
    cands: list[_Candidate] = []
    others = [] if dirs == [root] else _walk(root, errors, recursive=False)[1]
    for d in dirs:
        parsed = parse_kohya_name(d.name)
        if parsed is None or parsed[0] < 1:
            others.append(d)
            continue
        repeats, token, cls = parsed
        label = f"{token} {cls}" if cls else token
        images, rest = _walk(d, errors)
        cands += [(p, label, read_caption(p, ext) or label, repeats) for p in images]
        others += rest
    if not any(parse_kohya_name(d.name) for d in dirs):
        raise UserError(f"no kohya folders like '10_sks person' under {root}; rename them or pass another --layout")
    return cands, others


def _wikiart_candidates(root: Path, errors: list[dict]) -> tuple[list[_Candidate], list[Path]]:
    """Images of every style folder; loose files at the root are ignored (CSV files are read as info)."""
    loose_images, loose_others = _walk(root, errors, recursive=False)
    others = loose_images + [p for p in loose_others if p.suffix.lower() != ".csv"]
    cands: list[_Candidate] = []
    for d in subdirs(root):
        images, rest = _walk(d, errors)
        cands += [(p, d.name, None, 1) for p in images]
        others += rest
    if not cands:
        raise UserError(f"no style folders with images under {root}; --layout wikiart expects ROOT/<Style>/<image>")
    return cands, others


def _candidates(root: Path, layout: str, errors: list[dict], ext: str = "") -> tuple[list[_Candidate], list[Path]]:
    """Candidate images and ignored files of a layout (captions from `ext` sidecars, "" either); sidecar captions are
    not reported as ignored."""
    if layout == "kohya":
        cands, others = _kohya_candidates(root, errors, ext)
    elif layout == "wikiart":
        cands, others = _wikiart_candidates(root, errors)
    else:  # coco / folder: every image under the root, labelled with the folder name
        images, others = _walk(root, errors)
        cands = [(p, root.name, read_caption(p, ext) if layout == "folder" else None, 1) for p in images]
    stems = {p.with_suffix("") for p, *_ in cands}
    others = [p for p in others if not (p.suffix.lower() in CAPTION_EXTENSIONS and p.with_suffix("") in stems)]
    return cands, others


def _probe_one(path: Path, max_pixels: int | None, decode: bool):
    """(ImageInfo, dHash hex) of a usable file, or (None, None, ImageRejected)."""
    try:
        info, rgb = probe_image(path, max_pixels=max_pixels, decode=decode)
    except ImageRejected as err:
        return None, None, err
    return info, (f"{image_hash(rgb):016x}" if rgb is not None else None), None


def _layout_and_root(root: Path, layout: str | None) -> tuple[str, Path]:
    """Explicit layout (validated) or auto-detection, with the root the images live under."""
    if layout in (None, "auto"):
        return detect_layout(root)
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose from " + ", ".join(LAYOUTS))
    return layout, resolve_root(root, layout)


def scan_images(root: str | Path, *, layout: str | None = None, min_size: int | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, decode: bool = True,
                workers: int | None = None, caption_extension: str = "") -> ScanResult:
    """Scan a data root: every candidate image is checked (header, then a draft decode unless decode=False); captions
    come from `caption_extension` sidecars (".txt" or ".caption"; "": either, .txt first)."""
    layout, root = _layout_and_root(check_root(root), layout)
    min_size = DEFAULT_MIN_SIZE[layout] if min_size is None else int(min_size)
    errors: list[dict] = []
    cands, others = _candidates(root, layout, errors, caption_extension)
    if not cands:
        raise UserError(f"no image files under {root} (layout {layout}); check the path or --layout")
    result = ScanResult(root, layout, min_size, max_pixels, skipped=errors, ignored=[str(p) for p in others],
                        csv=read_csv_info(root) if layout == "wikiart" else {})
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        outcomes = pool.map(lambda c: _probe_one(c[0], max_pixels, decode), cands)
        for (path, label, caption, repeats), (info, dhash, err) in zip(cands, outcomes):
            if err is not None:
                result.skipped.append({"path": str(path), "reason": err.reason, "detail": err.detail})
                continue
            rec = ImageRecord(str(path), label, caption, repeats, info.width, info.height, dhash)
            (result.small if min(info.width, info.height) < min_size else result.records).append(rec)
    return result
