"""Text-to-image with library styles and subjects ("a photo of sks person wearing a suit")."""
from __future__ import annotations

import torch
from PIL import Image

import customgen
from customgen.errors import UserError
from customgen.inference.images import SIZE_MULTIPLE, with_settings
from customgen.inference.library import Style, StyleLibrary
from customgen.inference.prompts import build_prompt, prompt_kwargs
from customgen.inference.session import get_session, make_scheduler
from customgen.inference.img2img import (DEFAULT_GUIDANCE, DEFAULT_STEPS, check_sampling, random_seed,
                                         resolve_styles)
from customgen.models import DEFAULT_MODEL

MAX_BATCH = 16  # images per call; larger batches rarely fit a T4 at 512 px


def generate(prompt: str | None = None, styles=None, *, scales=None, model=DEFAULT_MODEL, styles_dir=None,
             negative_prompt: str = "", guidance: float = DEFAULT_GUIDANCE, steps: int = DEFAULT_STEPS,
             scheduler: str = "dpm++", seed: int | None = None, num_images: int = 1, size: int | None = None,
             width: int | None = None, height: int | None = None, device=None, dtype=None):
    """txt2img with styles/subjects; returns a PIL image (a list when num_images > 1). Prompt defaults
    to the styles' manifest prompts; the batch shares one generator seeded with `seed`."""
    check_sampling(steps=steps, guidance=guidance, scheduler=scheduler, size=size)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            raise UserError(f"{name} {value} must be a multiple of {SIZE_MULTIPLE}")
    if not 1 <= int(num_images) <= MAX_BATCH:
        raise UserError(f"num_images must be between 1 and {MAX_BATCH}, got {num_images}")
    session = get_session(model, device=device, dtype=dtype)
    specs = resolve_styles(styles, scales, StyleLibrary(styles_dir))
    seed = random_seed() if seed is None else int(seed)
    side = size or session.native_size
    with session.lock:
        session.activate(specs)
        text = build_prompt(session, specs, prompt)
        if not text.strip():
            raise UserError("generate needs a prompt: pass --prompt (the chosen styles have no default prompt)")
        images = run_txt2img(session, specs, text, negative_prompt=negative_prompt, guidance=float(guidance),
                             steps=int(steps), scheduler=scheduler, seed=seed, num_images=int(num_images),
                             width=width or side, height=height or side)
    return images[0] if num_images == 1 else images


def run_txt2img(session, specs, prompt: str, *, negative_prompt: str, guidance: float, steps: int, scheduler: str,
                seed: int, num_images: int, width: int, height: int) -> list[Image.Image]:
    """The stock txt2img pipeline with the active styles; each image carries its settings."""
    pipe = session.pipeline("txt2img")
    pipe.scheduler = make_scheduler(scheduler, session.comps.scheduler.config)
    with torch.inference_mode():
        out = pipe(**prompt_kwargs(session, pipe, specs, prompt, negative_prompt), num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                   num_images_per_prompt=num_images, width=width, height=height).images
    base = {"tool": "customgen.generate", "version": customgen.__version__, "model": session.comps.ref,
            "styles": [{"name": s.name, "method": s.manifest.method, "kind": s.kind, "scale": w} for s, w in specs],
            "seed": seed, "steps": steps, "scheduler": scheduler, "guidance": guidance, "prompt": prompt,
            "negative_prompt": negative_prompt, "size": [width, height], "batch_size": num_images}
    return [with_settings(img, {**base, "batch_index": i}) for i, img in enumerate(out)]


def preview(session, style: Style, *, size: int | None = None, steps: int = 10) -> Image.Image:
    """A seed-0 txt2img image of a style (its default prompt), cached: its stand-in reference for nearest-style."""
    cache = session.extra.setdefault("previews", {})
    if style.folder not in cache:
        side = size or session.native_size
        with session.lock:
            session.activate([(style, 1.0)])
            text = build_prompt(session, [(style, 1.0)], None)
            cache[style.folder] = run_txt2img(session, [(style, 1.0)], text, negative_prompt="", guidance=7.5,
                                              steps=steps, scheduler="dpm++", seed=0, num_images=1,
                                              width=side, height=side)[0]
    return cache[style.folder]
