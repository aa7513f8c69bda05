"""Reading weight files users bring (ControlNet, IP-Adapter) without running anything inside them, and the model
family their widths belong to.

`.safetensors` holds only tensors. `.pth`/`.pt`/`.bin`/`.ckpt` files are pickles, which can run code when loaded:
they are read only through torch's weights-only unpickler (`torch.load(..., weights_only=True)`), which refuses
any object but tensors and plain containers before constructing it.
"""
from __future__ import annotations

import functools
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from customgen.errors import UserError
from customgen.models.builders import CONFIGS
from customgen.models.loading import resolve_ref

SAFETENSORS = ".safetensors"
PICKLES = (".pth", ".pt", ".bin", ".ckpt")  # torch.save / PyTorch Lightning files: weights-only unpickler only
# Cross-attention widths of the published families (the text encoder's width): how a file tells its family.
KNOWN_WIDTHS = {768: "SD v1.x", 1024: "SD 2.x", 2048: "SDXL", 4096: "a T5-conditioned model (SD3, Flux)"}
FAMILY_NAMES = {"tiny": "the tiny test model", "sd15": "SD v1.5"}


def family(model) -> str:
    """`tiny` for the reserved tiny model (or a session of it), else `sd15`: the shapes an add-on must have."""
    comps = getattr(model, "comps", None)
    kind = comps.kind if comps is not None else resolve_ref(model).kind
    return "tiny" if kind == "tiny" else "sd15"


@functools.lru_cache(maxsize=None)
def family_config(fam: str, part: str) -> dict:
    """The shipped config of `part` (unet | controlnet) for family `fam`."""
    return json.loads((CONFIGS / fam / part / "config.json").read_text())


def cross_width(fam: str) -> int:
    """The cross-attention width a family's UNet takes (768 for SD v1.5)."""
    return int(family_config(fam, "unet")["cross_attention_dim"])


def check_width(path: Path, what: str, width: int, fam: str) -> None:
    """One line when `width` is not the family's cross-attention width, naming the family the file is for."""
    want = cross_width(fam)
    if width != want:
        other = KNOWN_WIDTHS.get(width, "another model")
        raise UserError(f"{path} is {what} for {other} (cross-attention width {width}); this model needs one for "
                        f"{FAMILY_NAMES[fam]} (width {want})")


def existing(path, what: str) -> Path:
    """`path` as a Path, or one line saying it does not exist."""
    if not str(path).strip():
        raise UserError(f"empty {what} path: name the file or folder")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    return p


def _refused(path: Path, err: Exception) -> UserError:
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"{path} is not a readable weights file ({detail}); re-download or re-copy it")


def _unpickler_line(err: BaseException) -> str:
    """The line of torch's weights-only message that says what it met (its first lines are general advice)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    line = next((ln for ln in lines if re.search(r"GLOBAL|[Gg]lobal|Unsupported|operand|invalid", ln)), lines[0])
    return line if len(line) <= 160 else line[:160].rsplit(" ", 1)[0] + " …"


def load_pickle(path: Path):
    """A pickle's contents through torch's weights-only unpickler (mapped lazily in torch's zip format): one line
    when it holds objects to build (code it would run; never run) or is no weights pickle at all."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        why = _unpickler_line(err)
        if "global" in why.lower():
            raise UserError(f"{path}: a pickle that torch's weights-only unpickler refuses ({why}); customgen never "
                            "runs code from a file: use a .safetensors copy") from err
        raise UserError(f"{path}: not readable as a weights-only pickle ({why}); the file may be truncated or of "
                        "another format: download it again") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"{path}: not readable as a weights-only pickle ({_unpickler_line(err)}); the file may be "
                        "truncated or of another format: download it again") from err


def _flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors → 'a.b.c' keys (what an IP-Adapter .bin holds); non-tensor leaves dropped."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or a weights-only pickle (nested dicts flattened with '.', a
    `state_dict` wrapper removed); one line for anything else."""
    suffix = path.suffix.lower()
    try:
        if suffix == SAFETENSORS:
            return load_file(str(path))
        if suffix in PICKLES:
            tree = load_pickle(path)
        else:
            raise UserError(f"{path}: weights must be a .safetensors file or a weights-only pickle "
                            f"({', '.join(PICKLES)}), got {suffix or 'no suffix'!r}")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, zipfile and the unpickler raise many types
        raise _refused(path, err) from err
    while isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict):
        raise UserError(f"{path} holds a {type(tree).__name__}, not a dictionary of tensors")
    return _flatten(tree)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name → shape of every tensor in the file: from the safetensors header alone, or a weights-only read."""
    if path.suffix.lower() == SAFETENSORS:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - corrupt headers raise several types
            raise _refused(path, err) from err
    return {k: tuple(v.shape) for k, v in read_weights(path).items()}
