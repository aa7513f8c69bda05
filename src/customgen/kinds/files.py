"""File helpers every kind uses: open a weights file safely, and keep an artifact inside its own folder."""
from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from customgen.errors import UserError


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused (one line, before anything is opened) when `name` leaves the folder: absolute
    paths, `..` and symlinks pointing outside. An artifact reads only its own files."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise UserError(f"{Path(folder) / 'style.json'}: file {name!r} lies outside the artifact folder; "
                        "an artifact may only name files inside its own folder")
    return path


def readable(path: Path):
    """safe_open a weights file, or one line saying it is corrupt."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file ({first_line(err)}); "
                        "retrain or re-copy the artifact") from err


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when empty), at most 300 characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def export_stem(name: str) -> str:
    """A file stem for an artifact's exports (`<stem>.safetensors`): the artifact name with anything outside
    letters, digits, `.`, `_` and `-` replaced, so it is safe in every tool's flat folder and on Windows."""
    stem = re.sub(r"[^0-9A-Za-z._-]+", "_", name).strip("._") or "style"
    return stem
