"""Style library: a folder of artifacts (one sub-folder each, with its style.json) and of loose files from elsewhere
(kohya/LyCORIS LoRAs, embeddings: customgen.formats), referred to by name or path.

Also the architecture checks that refuse a style trained for another base model before any weight is loaded; a
file is read and checked when it is named, before any model loads.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from customgen.errors import Notice, UserError
from customgen.formats import SUFFIXES
from customgen.kinds import MANIFEST, Kind, Manifest, file_manifest, get_kind, read_artifact
from customgen.request import DEFAULT_SCALE, scale_list as scale_values

DEFAULT_STYLES_DIR = "outputs/styles"  # where `customgen train` writes artifacts (config `train.output`)
STYLES_ENV = "CUSTOMGEN_STYLES"  # overrides the default library folder


@dataclass
class Style:
    """One artifact (its library name, folder and manifest; the method comes from the manifest), or a file from
    elsewhere (`source`: the file; `folder` its folder; a manifest made from the file)."""

    name: str
    folder: Path
    manifest: Manifest
    source: Path | None = None

    @property
    def key(self) -> Path:
        """What names this style in a session and its caches: the artifact folder, or the file."""
        return self.source or self.folder

    @property
    def kind(self) -> Kind:
        """The adaptation kind object (customgen.kinds) that loads and applies this artifact."""
        return get_kind(self.manifest.kind)

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def default_prompt(self) -> str:
        """The kind's default prompt: the manifest's prompt, else its token; "" for prompt-free styles."""
        return self.kind.default_prompt(self)


def load_style(folder: str | Path, *, name: str | None = None) -> Style:
    """An artifact folder → Style (one-line errors for a missing or corrupt manifest)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"style folder {folder} does not exist")
    manifest, _ = read_artifact(folder)
    return Style(name or folder.name, folder.resolve(), manifest)


def is_style_file(path: Path) -> bool:
    """A file with a weights suffix (.safetensors, .pt, .pth, .bin, .ckpt), to be read as a style."""
    return path.is_file() and path.suffix.lower() in SUFFIXES


def load_file_style(path: str | Path, *, name: str | None = None) -> Style:
    """A file from elsewhere → Style, read and checked now (one line for a file customgen cannot use)."""
    path = Path(path).expanduser().resolve()
    return Style(name or path.stem, path.parent, file_manifest(path), source=path)


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
        return {p.name: p for p in sorted(self.root.iterdir()) if (p / MANIFEST).is_file()}

    def files(self) -> dict[str, Path]:
        """File stem → loose style file in the library folder (sorted; an artifact's name wins a clash)."""
        if not self.root.is_dir():
            return {}
        folders = self.folders()
        return {p.stem: p for p in sorted(self.root.iterdir()) if is_style_file(p) and p.stem not in folders}

    def names(self) -> list[str]:
        """Library names of all styles: artifact folder names, then loose files' stems."""
        return list(self.folders()) + list(self.files())

    def manifest_names(self) -> dict[str, Path]:
        """Manifest `name` → folder, for manifests that parse (broken ones are reported when used)."""
        out = {}
        for folder in self.folders().values():
            try:
                out.setdefault(json.loads((folder / MANIFEST).read_text()).get("name", ""), folder)
            except (OSError, ValueError, AttributeError):
                continue
        return out

    def styles(self) -> list[Style]:
        """Every readable artifact, then every usable loose file; the others are skipped with a Notice."""
        out = []
        loaders = [(n, f, load_style) for n, f in self.folders().items()]
        for name, path, load in loaders + [(n, p, load_file_style) for n, p in self.files().items()]:
            try:
                out.append(load(path, name=name))
            except UserError as err:
                warnings.warn(f"skipping style {name}: {err}", Notice, stacklevel=2)
        return out

    def resolve(self, ref: str | Path | Style) -> Style:
        """A Style, an artifact folder path, a style file path, a folder name, a loose file's stem or a manifest
        name → Style."""
        if isinstance(ref, Style):
            return ref
        path = Path(ref).expanduser()
        if path.is_dir():
            return load_style(path)
        if is_style_file(path):
            return load_file_style(path)
        if path.suffix.lower() in SUFFIXES:
            raise UserError(f"style file {path} does not exist")
        folders = self.folders()
        if str(ref) in folders:
            return load_style(folders[str(ref)])
        files = self.files()
        if str(ref) in files:
            return load_file_style(files[str(ref)])
        by_manifest = self.manifest_names()
        if str(ref) in by_manifest:
            return load_style(by_manifest[str(ref)])
        raise UserError(self._unknown(str(ref), folders))

    def _unknown(self, ref: str, folders: dict) -> str:
        if not self.root.is_dir():
            return (f"unknown style {ref!r}: the styles folder {self.root} does not exist; "
                    "pass --styles DIR or the artifact's folder path")
        names = self.names()
        if not names:
            return f"unknown style {ref!r}: no artifacts (folders with style.json) or style files in {self.root}"
        return f"unknown style {ref!r}; available in {self.root}: {', '.join(names)}"


def check_compatible(style: Style, comps) -> None:
    """Refuse a style made for another architecture (one line, by its kind); a different base reference only
    gets a Notice."""
    style.kind.check(style, comps)
    base = style.manifest.base_model
    if base and comps.ref and base != comps.ref:
        warnings.warn(f"style {style.name} was trained on {base}; applying it to {comps.ref}", Notice, stacklevel=2)


def scheduler_notes(specs: list[tuple[Style, float]], scheduler: str) -> None:
    """One Notice per style sampled with a scheduler it was not made for (a few-step LoRA: LCM, TCD, Hyper-SD)."""
    for style, scale in specs:
        sampler = style.manifest.training.get("sampler") if float(scale) else None
        if sampler and scheduler not in sampler["schedulers"]:
            warnings.warn(f"{style.name} is {sampler['what']}, sampled with --scheduler "
                          f"{' or '.join(sampler['schedulers'])} in {sampler['steps']} steps; --scheduler {scheduler} "
                          "will not give its images", Notice, stacklevel=3)


def as_list(styles) -> list:
    """None, one style (name, path or Style) or several → a list."""
    return [] if styles is None else [styles] if isinstance(styles, (str, Path, Style)) else list(styles)


def resolve_styles(styles, scales, library: StyleLibrary) -> list[tuple[Style, float]]:
    """Style references and scales → (Style, scale) pairs; one scale applies to all, else one per style."""
    refs = as_list(styles)
    scale_list = [DEFAULT_SCALE] if scales is None else scale_values(scales)
    if refs and len(scale_list) not in (1, len(refs)):
        raise UserError(f"{len(scale_list)} style scales for {len(refs)} styles: give one scale, or one per style")
    scale_list = scale_list * len(refs) if len(scale_list) == 1 else scale_list
    if any(float(s) < 0 for s in scale_list):
        raise UserError(f"style scales must be >= 0, got {scale_list}")
    return [(library.resolve(r), float(s)) for r, s in zip(refs, scale_list)]
