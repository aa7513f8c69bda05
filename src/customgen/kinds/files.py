"""File helpers every kind uses: open a weights file safely, and keep an artifact inside its own folder."""
from __future__ import annotations

import math
import re
from pathlib import Path

from safetensors import safe_open

from customgen.errors import UserError

MAX_DETAIL = 200  # characters of a library's message quoted in ours (whole words, then "…")


def tensor_values(path: Path) -> int:
    """How many values a weights file's tensors hold (scalars such as kohya's `.alpha` left out: no layer keeps them
    as tensors), from the safetensors header alone or a weights-only read."""
    from customgen.models.weightfile import tensor_shapes  # lazy: models imports kinds

    return sum(math.prod(shape) for shape in tensor_shapes(Path(path)).values() if len(shape) > 0)


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused (one line, before anything is opened) when `name` leaves the folder: absolute
    paths, `..` and symlinks pointing outside. An artifact reads only its own files."""
    where = Path(folder) / "style.json"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{where}: file name {name!r} is not a file name; retrain or repair the manifest")
    root = Path(folder).resolve()
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError) as err:  # symlink loops, names too long
        raise UserError(f"{where}: file {name!r} cannot be resolved ({err}); repair the artifact folder") from None
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise UserError(f"{where}: file {name!r} lies outside the artifact folder; "
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
    """A library's message as a clause inside ours: its first line without a dangling colon, cut at a word
    boundary (marked …) past MAX_DETAIL characters; its type when empty."""
    text = str(err).strip()
    line = (text.splitlines()[0] if text else type(err).__name__).strip().rstrip(":").strip()
    if len(line) > MAX_DETAIL:
        line = line[:MAX_DETAIL].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return line


def export_stem(name: str) -> str:
    """A file stem for an artifact's exports (`<stem>.safetensors`): the artifact name with anything outside
    letters, digits, `.`, `_` and `-` replaced, so it is safe in every tool's flat folder and on Windows."""
    return re.sub(r"[^0-9A-Za-z._-]+", "_", name).strip("._") or "style"
