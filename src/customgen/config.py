"""Typed configs: dataclass defaults (each with a comment), YAML files of overrides, `--set k=v`.

Unknown keys and wrong types are errors naming the key. The resolved config is saved beside every
output (`save_config`), and its hash goes into manifests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from customgen.errors import UserError
from customgen.models.loading import DEFAULT_MODEL


@dataclasses.dataclass
class ModelConfig:
    ref: str = DEFAULT_MODEL  # Hub id, local diffusers folder, .safetensors file, tiny or sd15-random
    dtype: str | None = None  # fp32 | fp16 | bf16; None: bf16 where supported, fp16 on T4/P100, fp32 on CPU


@dataclasses.dataclass
class DataConfig:
    root: str = ""  # WikiArt root, COCO folder, instance-photo folder or kohya root
    layout: Literal["wikiart", "coco", "folder", "kohya"] = "wikiart"  # how data.root is organised
    style: str = ""  # WikiArt style folder to learn, e.g. Analytical_Cubism ("" for folder/kohya layouts)
    max_images: int = 100  # at most this many training images (seeded choice)
    resolution: int = 512  # training resolution (square crops)
    center_crop: bool = True  # center crop (False: random crop)
    random_flip: bool = True  # horizontal flip augmentation
    min_size: int = 64  # images with a shorter side below this are listed as small and skipped
    max_pixels: int = 89_478_485  # decompression-bomb cap (PIL's default limit)
    seed: int = 0  # seed of the image selection


@dataclasses.dataclass
class Config:
    """Root config: one section per concern."""

    name: str = ""  # artifact name ("" → derived from method and style)
    method: str = ""  # which recipe the config is for (set by configs/*.yaml)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


SECTIONS: dict[str, type] = {}  # extra top-level sections registered by other modules (train, eval, ...)


def register_section(name: str, cls: type) -> None:
    """Add a top-level section (e.g. `train`) to the root config; modules own their own dataclasses."""
    SECTIONS[name] = cls


# --- checking -----------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; int→float and '1e-4'→float are the only conversions."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if cls is Config:
        out.update(SECTIONS)
    return out


def _build(cls, data: dict, prefix: str = ""):
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}")
    known = {f.name for f in dataclasses.fields(cls)}
    obj = cls(**{k: _coerce(v, fields[k], prefix + k) for k, v in data.items() if k in known})
    for name, section in SECTIONS.items() if cls is Config else ():
        setattr(obj, name, _coerce(data.get(name, {}), section, name))
    return obj


# --- loading and saving -------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(data: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part} is not a section")
        data = node
    data[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path` (one-line errors for missing or malformed files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), **sets: Any) -> Config:
    """Defaults ← YAML file ← `--set` overrides ← keyword overrides like `model__ref="tiny"`."""
    data = read_yaml(path) if path else {}
    for text in overrides:
        _set(data, *parse_override(text))
    for key, value in sets.items():
        _set(data, key.split("__"), value)
    return _build(Config, data)


def to_dict(cfg) -> dict:
    """The config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(cfg) | {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS if hasattr(cfg, name)}


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def config_hash(cfg) -> str:
    """A short stable hash of the resolved config (goes into manifests)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
