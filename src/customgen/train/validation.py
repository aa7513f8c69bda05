"""Validation images during training: img2img on fixed content images (styles) or txt2img (subjects)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from customgen.config import Config
from customgen.data import find_kaggle_roots, load_image
from customgen.data.buckets import spec_of
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
    """Images tiled into one picture, `cols` per row, each in a cell of the largest width and height (buckets)."""
    w, h = max(im.size[0] for im in images), max(im.size[1] for im in images)
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


def content_image(path: str, cfg: Config) -> Image.Image:
    """A validation content image at the training size: square, or with data.buckets its own bucket (resized to cover
    it, center-cropped), so a style trained on whole compositions is shown on one."""
    image, res = load_image(path), cfg.data.resolution
    spec = spec_of(cfg.data)
    place = spec.place(*image.size) if spec is not None else None
    if place is None:
        return image.resize((res, res))
    left, top = place.crop_box()
    return image.resize(place.resized, Image.Resampling.BILINEAR).crop(
        (left, top, left + place.bucket[0], top + place.bucket[1]))


@torch.no_grad()
def sample_images(comps, cfg: Config, prompts: list[str], *, device) -> list[Image.Image]:
    """Validation samples of each prompt with the model as it is now (LoRA/TI/DreamBooth weights active)."""
    v, res = cfg.validation, cfg.data.resolution
    request = v.request()
    content = validation_content(cfg)
    kind = "img2img" if content else "txt2img"
    pipe = build_pipeline(comps, kind=kind)
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator("cpu").manual_seed(cfg.train.seed + i)
        common = dict(num_inference_steps=request.steps, guidance_scale=request.guidance, generator=g)
        if kind == "img2img":
            for path in content:
                out += pipe(p, image=content_image(path, cfg), strength=request.strength, **common).images
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
        images = sample_images(c, run.cfg, run.method.validation_prompts(), device=run.accelerator.device)
    path = run.out / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=max(1, len(validation_content(run.cfg)) or run.cfg.validation.num_images)).save(path)
    return path
