"""What the bench runs on: synthetic data laid out as each recipe expects, and random-weight style artifacts made
by each recipe's own training half (setup → perturb the trainable parameters → save), so every kind is benched
without a training run. Random weights: time, memory and FLOPs only, never quality.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import torch
from PIL import Image

from customgen.config import Config, find_config, load_config
from customgen.data.samples import write_samples
from customgen.kinds import RECIPES, Manifest, make_method, read_manifest, training_facts, write_manifest
from customgen.errors import UserError
from customgen.formats import examine
from customgen.memory import seeded
from customgen.models import load_components

STYLE_STD = 0.02  # perturbation of every trainable parameter (LoRA B starts at zero; TI rows; DreamBooth weights)
STYLE = "Stripes"  # the synthetic WikiArt style the training jobs learn
KOHYA_FOLDER = "5_sks person"  # a kohya-style folder name: 5 repeats, trigger word, class


@contextlib.contextmanager
def quiet():
    """Training builders print their plan and parameter counts: keep the bench's output to its table."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def write_data(root: Path, *, size: int) -> dict[str, Path]:
    """Synthetic WikiArt-like styles, COCO-like contents and a kohya folder, images `size` px square."""
    data = write_samples(root, per_style=4, n_content=4, size=size)
    kohya = root / "kohya" / KOHYA_FOLDER
    kohya.mkdir(parents=True, exist_ok=True)
    for path in sorted((data["wikiart"] / STYLE).iterdir()):
        shutil.copy(path, kohya / path.name)
    return {**data, "kohya": kohya.parent}


def data_overrides(layout: str, data: dict[str, Path]) -> list[str]:
    """Config overrides that point a recipe of `layout` at the synthetic data."""
    roots = {"wikiart": [f"data.root={data['wikiart']}", f"data.style={STYLE}"],
             "folder": [f"data.root={data['wikiart'] / STYLE}"], "kohya": [f"data.root={data['kohya']}"],
             "coco": [f"data.root={data['coco']}"]}
    return roots[layout]


def recipe_config(recipe: str, model: str, extra: list[str] = ()) -> Config:
    """A recipe's own config (configs/<recipe>.yaml) on `model`, with `extra` overrides."""
    return load_config(find_config(recipe), [f"model.ref={model}", *extra])


def style_recipes() -> list[str]:
    """Recipes that make styles (applied by img2img), one per kind: the stylize jobs."""
    seen, out = set(), []
    for r in RECIPES.values():
        if r.target == "style" and r.kind not in seen:
            seen.add(r.kind)
            out.append(r.name)
    return out


def make_style(recipe: str, model: str, folder: Path, *, seed: int = 0) -> Path:
    """A random-weight artifact of `recipe` on `model`, written as training writes it (weights + style.json)."""
    cfg = recipe_config(recipe, model)
    method = make_method(cfg)
    comps = load_components(model, device="cpu", dtype=torch.float32)
    with quiet():
        groups = method.setup(comps)
    with seeded(seed), torch.no_grad():
        for group in groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p) * STYLE_STD)
    method.after_step(comps)  # TI: only the new token rows keep the perturbation
    folder.mkdir(parents=True, exist_ok=True)
    fields = method.save(folder, comps, training_facts(cfg, folder.name))
    write_manifest(folder, Manifest(name=folder.name, method=recipe, kind=method.kind.name, base_model=model,
                                    prompt=method.default_prompt(), token=fields.pop("token", ""),
                                    resolution=cfg.data.resolution, **fields))
    return folder


def fewstep_file(library: Path, folder: Path) -> Path:
    """A random-weight stand-in for an LCM-LoRA (the published file is a kohya LoRA, found by its name): the first
    export in `library` that holds layer changes (a random LoRA style's kohya file), named as LCM-LoRA files are."""
    for artifact in sorted(p for p in library.iterdir() if p.is_dir()):
        for export in read_manifest(artifact).exports:
            _, adapter = examine(artifact / export)
            if adapter is not None and adapter.deltas:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / "lcm-lora-random.safetensors"
                shutil.copyfile(artifact / export, path)
                return path
    raise UserError(f"{library} holds no LoRA export to stand in for a few-step LoRA: pass --fewstep-file")


def content_image(data: dict[str, Path], size: int) -> Image.Image:
    """The first synthetic content photo, `size` px square (already at the working size: no resize on either side)."""
    path = sorted(data["coco"].iterdir())[0]
    with Image.open(path) as im:
        return im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
