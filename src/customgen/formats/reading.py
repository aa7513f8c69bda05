"""Opening a weights file a user brings, without running anything in it.

`.safetensors` is read through safetensors (a header, then raw tensors). `.pt`, `.pth`, `.bin` and `.ckpt` are
pickles: they go only through torch's weights-only unpickler (`torch.load(..., weights_only=True)`), which builds
tensors and plain containers and refuses every other object, so a `__reduce__` payload is refused, never run.
Nested pickled dictionaries (AUTOMATIC1111 embeddings: `string_to_param: {"*": tensor}`, checkpoints:
`state_dict: {...}`) are flattened to dotted keys; their non-tensor entries become metadata strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from customgen.errors import UserError
from customgen.models import weightfile
from customgen.models.weightfile import load_pickle

SAFETENSORS = (weightfile.SAFETENSORS,)
PICKLES = weightfile.PICKLES
SUFFIXES = SAFETENSORS + PICKLES
MAX_DETAIL = 160  # characters of a library's message quoted in ours


@dataclass
class Contents:
    """A file's tensors by key (shape and dtype known before any value is read) and its metadata strings."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None  # a pickle's tensors (already in memory); None for safetensors

    def keys(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor's values (read from disk for safetensors)."""
        if self._tensors is not None:
            return self._tensors[key]
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def tensors(self, keys=None) -> dict[str, torch.Tensor]:
        """Several tensors' values, the file opened once."""
        keys = self.keys() if keys is None else list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}


def _clause(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL].rsplit(" ", 1)[0] + " …"


def open_contents(path: str | Path) -> Contents:
    """The file's keys, shapes, dtypes and metadata: one `error:` line for a missing, truncated or foreign file and
    for a pickle the weights-only unpickler refuses."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in PICKLES:
        return _open_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: _DTYPES.get(f.get_slice(k).get_dtype(), torch.uint8) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        kind = "a safetensors file" if path.suffix.lower() in SAFETENSORS else "a safetensors file or a weights-only pickle"
        raise UserError(f"{path}: not readable as {kind} ({_clause(err)}); the file may be truncated or of "
                        "another format: download it again") from err
    return Contents(path, shapes, dtypes, metadata)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _open_pickle(path: Path) -> Contents:
    data = load_pickle(path)
    tensors, metadata = {}, {}
    _flatten(data, "", tensors, metadata)
    return Contents(path, {k: tuple(v.shape) for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()},
                    metadata, tensors)


def _flatten(value, prefix: str, tensors: dict, metadata: dict) -> None:
    """Tensors under dotted keys; other leaves as metadata strings (a pickled list keeps its indices)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), tensors, metadata)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in value):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}" if prefix else str(i), tensors, metadata)
    else:
        metadata[prefix] = str(value)


def check_finite(contents: Contents, keys) -> None:
    """Every floating value finite (NaN or inf weights give flat black images)."""
    floats = [k for k in keys if contents.dtypes[k].is_floating_point]
    for key, tensor in contents.tensors(floats).items():
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{contents.path}: tensor {key} holds NaN or infinite values (a diverged or damaged "
                            "training); this file cannot be used")
