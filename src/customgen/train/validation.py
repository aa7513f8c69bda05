"""Validation images during training: img2img on fixed content images (styles) or txt2img (subjects)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from customgen.config import Config
from customgen.data import find_kaggle_roots, load_image
from customgen.data.io import is_image_name
from customgen.kinds import recipe
from customgen.memory import moved
from customgen.models import build_pipeline


@contextmanager
def eval_mode(*modules):
    """Modules in eval mode for the block, then back to their previous mode."""
    was = [(m, m.training) for m in modules]
    for m, _ in was:
        m.eval()
    try:
        yield
    finally:
        for m, training in was:
            m.train(training)


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images (same size) tiled into one picture, `cols` per row."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def validation_content(cfg: Config) -> list[str]:
    """Fixed content images: validation.content, else the first of validation.content_root (styles on
    Kaggle: the attached COCO folder), else none (txt2img)."""
    v = cfg.validation
    if v.content:
        return list(v.content)
    style = recipe(cfg.method).target == "style"
    root = v.content_root or (find_kaggle_roots().get("coco") if style else None)
    if not root or not Path(root).is_dir():
        return []
    return [str(p) for p in sorted(Path(root).iterdir()) if is_image_name(p.name)][: v.num_images]


@torch.no_grad()
def sample_images(comps, cfg: Config, prompt: str, *, device) -> list[Image.Image]:
    """Validation samples with the model as it is now (LoRA/TI/DreamBooth weights active)."""
    v, res = cfg.validation, cfg.data.resolution
    request = v.request()
    content = validation_content(cfg)
    kind = "img2img" if content else "txt2img"
    pipe = build_pipeline(comps, kind=kind)
    prompts = v.prompts or [prompt]
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator("cpu").manual_seed(cfg.train.seed + i)
        common = dict(num_inference_steps=request.steps, guidance_scale=request.guidance, generator=g)
        if kind == "img2img":
            for path in content:
                image = load_image(path).resize((res, res))
                out += pipe(p, image=image, strength=request.strength, **common).images
        else:
            out += pipe(p, height=res, width=res, num_images_per_prompt=v.num_images, **common).images
    return out


def validate(run, step: int) -> Path | None:
    """Write samples/step-NNNNNN.png (main process); VAE and text encoder must sit on the device."""
    if not run.accelerator.is_main_process:
        return None
    c = run.comps
    with eval_mode(c.unet, c.text_encoder), moved(c.vae, c.text_encoder, device=run.accelerator.device), \
            run.accelerator.autocast():
        images = sample_images(c, run.cfg, run.method.default_prompt(), device=run.accelerator.device)
    path = run.out / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=max(1, len(validation_content(run.cfg)) or run.cfg.validation.num_images)).save(path)
    return path
