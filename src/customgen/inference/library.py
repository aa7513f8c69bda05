"""Style library: a folder of artifacts (one sub-folder each, with its style.json), referred to by name or path.

Also the architecture checks that refuse a style trained for another base model before any weight is loaded.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from customgen import artifacts
from customgen.artifacts import Manifest
from customgen.errors import Notice, UserError

DEFAULT_STYLES_DIR = "outputs/styles"  # where `customgen train` writes artifacts (config `train.output`)
STYLES_ENV = "CUSTOMGEN_STYLES"  # overrides the default library folder
_LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora\.down|lora\.up|lora_linear_layer\.down|"
                       r"lora_linear_layer\.up|lora_A|lora_B)\.weight$")


@dataclass
class Style:
    """One artifact: its library name, folder and manifest (the method comes from the manifest)."""

    name: str
    folder: Path
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind  # lora | dreambooth | textual_inversion

    @property
    def default_prompt(self) -> str:
        """The manifest's prompt; else its token (TI/DreamBooth); "" for prompt-free LoRA styles."""
        return self.manifest.prompt or self.manifest.token


def load_style(folder: str | Path, *, name: str | None = None) -> Style:
    """An artifact folder → Style (one-line errors for a missing or corrupt manifest)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"style folder {folder} does not exist")
    return Style(name or folder.name, folder.resolve(), artifacts.read_manifest(folder))


def default_styles_dir() -> Path:
    """$CUSTOMGEN_STYLES, else `outputs` (where training writes artifacts)."""
    return Path(os.environ.get(STYLES_ENV) or DEFAULT_STYLES_DIR)


class StyleLibrary:
    """The artifacts under `root` (each sub-folder holding a style.json), looked up by folder or manifest name."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_styles_dir()

    def folders(self) -> dict[str, Path]:
        """Folder name → artifact folder, for every sub-folder with a style.json (sorted)."""
        if not self.root.is_dir():
            return {}
        return {p.name: p for p in sorted(self.root.iterdir()) if (p / artifacts.MANIFEST).is_file()}

    def names(self) -> list[str]:
        """Library names (folder names) of all artifacts."""
        return list(self.folders())

    def manifest_names(self) -> dict[str, Path]:
        """Manifest `name` → folder, for manifests that parse (broken ones are reported when used)."""
        out = {}
        for folder in self.folders().values():
            try:
                out.setdefault(json.loads((folder / artifacts.MANIFEST).read_text()).get("name", ""), folder)
            except (OSError, ValueError, AttributeError):
                continue
        return out

    def styles(self) -> list[Style]:
        """Every readable artifact; unreadable ones are skipped with a Notice."""
        out = []
        for name, folder in self.folders().items():
            try:
                out.append(load_style(folder, name=name))
            except UserError as err:
                warnings.warn(f"skipping style {name}: {err}", Notice, stacklevel=2)
        return out

    def resolve(self, ref: str | Path | Style) -> Style:
        """A Style, an artifact folder path, a folder name or a manifest name → Style."""
        if isinstance(ref, Style):
            return ref
        path = Path(ref).expanduser()
        if path.is_dir():
            return load_style(path)
        folders = self.folders()
        if str(ref) in folders:
            return load_style(folders[str(ref)])
        by_manifest = self.manifest_names()
        if str(ref) in by_manifest:
            return load_style(by_manifest[str(ref)])
        raise UserError(self._unknown(str(ref), folders))

    def _unknown(self, ref: str, folders: dict) -> str:
        if not self.root.is_dir():
            return (f"unknown style {ref!r}: the styles folder {self.root} does not exist; "
                    "pass --styles DIR or the artifact's folder path")
        if not folders:
            return f"unknown style {ref!r}: no artifacts (folders with style.json) in {self.root}"
        return f"unknown style {ref!r}; available in {self.root}: {', '.join(folders)}"


def _readable(path: Path):
    """safe_open a weights file, or one line saying it is corrupt."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file ({err}); retrain or re-copy the artifact") from err


def check_lora(path: Path, modules: dict) -> None:
    """Every LoRA matrix must match its target layer's in/out features in this model (same architecture)."""
    with _readable(path) as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if not m or modules.get(m.group(1)) is None:
                continue
            owner, module_path, part = m.groups()
            try:
                layer = modules[owner].get_submodule(module_path)
            except AttributeError:
                raise UserError(f"{path}: layer {owner}.{module_path} is not in this model "
                                "(the style was trained for another base model)") from None
            shape = f.get_slice(key).get_shape()  # down/A: (r, in); up/B: (out, r)
            down = part.endswith(("down", "_A"))
            want = getattr(layer, "in_features" if down else "out_features", None)
            have = shape[1] if down else shape[0]
            if want is not None and want != have:
                raise UserError(f"{path}: {owner}.{module_path} has {have} features in the style but {want} in "
                                "this model (the style was trained for another base model)")


def check_textual_inversion(path: Path, text_encoder) -> None:
    """The learned vectors must have the text encoder's embedding width."""
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    with _readable(path) as f:
        for key in f.keys():
            width = f.get_slice(key).get_shape()[-1]
            if width != dim:
                raise UserError(f"{path}: embedding width {width}, this text encoder has {dim} "
                                "(the style was trained for another base model)")


def check_compatible(style: Style, comps) -> None:
    """Refuse a style made for another architecture (one line); a different base reference only gets a Notice."""
    weights = style.folder / style.manifest.weights
    if style.kind == "lora":
        check_lora(weights, {"unet": comps.unet, "text_encoder": comps.text_encoder})
    elif style.kind == "textual_inversion":
        check_textual_inversion(weights, comps.text_encoder)
    else:
        _readable(weights).keys()  # a readable file; DreamBooth keys/shapes are checked by load_dreambooth
    base = style.manifest.base_model
    if base and comps.ref and base != comps.ref:
        warnings.warn(f"style {style.name} was trained on {base}; applying it to {comps.ref}", Notice, stacklevel=2)
