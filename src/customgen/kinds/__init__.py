"""The adaptation kinds, one object each, and the registry every stage asks.

    from customgen.kinds import KINDS, get_kind, recipe, make_method
    get_kind("lora").has_scale          # True: evaluation sweeps its scale
    recipe("dreambooth_style").kind     # "dreambooth"

Adding a kind = one module defining a `Kind` and its `Method` (see kinds/base.py and docs/architecture.md)
plus one entry in KINDS below.
"""
from __future__ import annotations

from pathlib import Path

from customgen.errors import UserError
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.dreambooth import DreamBoothKind
from customgen.kinds.files import inside
from customgen.kinds.foreign import MergedKind, file_manifest
from customgen.kinds.lora import LoraKind
from customgen.kinds.manifest import (MANIFEST, SNAPSHOTS, Manifest, list_snapshots, package_versions, read_manifest,
                                      snapshot_folder, training_facts, write_manifest)
from customgen.kinds.textual_inversion import TextualInversionKind

KINDS: dict[str, Kind] = {k.name: k for k in (LoraKind(), DreamBoothKind(), TextualInversionKind(), MergedKind())}
# Recipes (config `method`) in plot order: styles first, then subjects, each in registry order.
RECIPES: dict[str, Recipe] = {r.name: r for r in sorted((r for k in KINDS.values() for r in k.recipes),
                                                         key=lambda r: r.target != "style")}


def get_kind(name: str) -> Kind:
    """The kind object for a manifest `kind` (one line for unknown kinds)."""
    if name not in KINDS:
        raise UserError(f"unknown artifact kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]


def recipe(method: str) -> Recipe:
    """The recipe for a config `method` (one line for unknown methods)."""
    if method not in RECIPES:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[method]


def make_method(cfg) -> Method:
    """The training half for `cfg.method`."""
    return KINDS[recipe(cfg.method).kind].method(cfg)


def read_artifact(folder: str | Path) -> tuple[Manifest, Kind]:
    """An artifact's manifest and kind, with its files checked: a known kind, every named file inside the
    folder (refused before anything is opened otherwise), the main weights file present."""
    manifest = read_manifest(folder)
    kind = get_kind(manifest.kind)
    paths = [inside(Path(folder), name) for name in kind.files(manifest)]
    if not paths[0].is_file():
        raise UserError(f"{folder}: weights file {manifest.weights} is missing")
    return manifest, kind


__all__ = ["KINDS", "RECIPES", "MANIFEST", "SNAPSHOTS", "Kind", "Manifest", "Method", "Recipe", "file_manifest", "get_kind",
           "list_snapshots", "make_method", "package_versions", "read_artifact", "read_manifest", "recipe",
           "snapshot_folder", "training_facts", "write_manifest"]
