"""Text-to-image with library styles and subjects ("a photo of sks person wearing a suit")."""
from __future__ import annotations

import torch
from PIL import Image

import customgen
from customgen.errors import UserError
from customgen.inference.fit import fit_sampling, use
from customgen.inference.images import with_settings
from customgen.inference.library import Style, StyleLibrary, resolve_styles, scheduler_notes
from customgen.inference.prompts import build_prompt, conditioning
from customgen.inference.session import Session, get_session
from customgen.request import Request, random_seed


def as_request(request: Request | None, fields: dict) -> Request:
    """The caller's Request (or the defaults) with keyword fields on top."""
    return (request or Request()).replace(**fields)


def generate(prompt: str | None = None, styles=None, request: Request | None = None, *, styles_dir=None, **fields):
    """txt2img with styles/subjects; returns a PIL image (a list when num_images > 1). Prompt defaults to the
    styles' manifest prompts; the batch shares one generator seeded with `seed`. Keyword fields are those of
    `customgen.request.Request` (steps, guidance, scheduler, seed, size, width, height, num_images, ...)."""
    req = as_request(request, {"prompt": prompt, **fields} if prompt is not None else fields).check()
    specs = resolve_styles(styles, req.scales, StyleLibrary(styles_dir))  # checked before the model loads
    scheduler_notes(specs, req.scheduler)
    session = get_session(req.model, device=req.device, dtype=req.dtype)
    side = req.size or session.native_size
    req = req.replace(seed=random_seed() if req.seed is None else int(req.seed), width=req.width or side,
                      height=req.height or side)
    with session.lock:
        session.activate(specs)
        text = build_prompt(session, specs, req.prompt)
        if not text.strip():
            raise UserError("generate needs a prompt: pass --prompt (the chosen styles have no default prompt)")
        images = run_txt2img(session, specs, text, req)
    return images[0] if req.num_images == 1 else images


def run_txt2img(session: Session, specs, prompt: str, req: Request) -> list[Image.Image]:
    """The stock txt2img pipeline with the active styles (req: seed, width and height set); each image carries
    its settings."""
    use(session, fit_sampling(session, kind="txt2img", size=(req.height, req.width), batch=req.num_images,
                              cap_gib=req.cap_gib, split=False))  # VAE slicing/tiling where the peak asks for it
    pipe = session.pipeline("txt2img")
    if pipe.scheduler is not session.scheduler(req.scheduler):
        pipe.scheduler = session.scheduler(req.scheduler)
    with torch.inference_mode():
        out = pipe(**conditioning(session, pipe, specs, prompt, req.negative_prompt, guidance=float(req.guidance)),
                   num_inference_steps=int(req.steps), guidance_scale=float(req.guidance),
                   generator=torch.Generator("cpu").manual_seed(req.seed), num_images_per_prompt=req.num_images,
                   width=req.width, height=req.height).images
    base = {"tool": "customgen.generate", "version": customgen.__version__, "model": session.comps.ref,
            "styles": [{"name": s.name, "method": s.method, "kind": s.kind.name, "scale": w} for s, w in specs],
            "seed": req.seed, "steps": int(req.steps), "scheduler": req.scheduler, "guidance": float(req.guidance),
            "prompt": prompt, "negative_prompt": req.negative_prompt, "size": [req.width, req.height],
            "batch_size": req.num_images}
    return [with_settings(img, {**base, "batch_index": i}) for i, img in enumerate(out)]


def preview(session: Session, style: Style, *, size: int | None = None, steps: int = 10) -> Image.Image:
    """A seed-0 txt2img image of a style (its default prompt), cached: its stand-in reference for nearest-style."""
    cache = session.extra.setdefault("previews", {})
    if style.key not in cache:
        side = size or session.native_size
        req = Request(steps=steps, seed=0, width=side, height=side)
        with session.lock:
            session.activate([(style, 1.0)])
            text = build_prompt(session, [(style, 1.0)], None)
            cache[style.key] = run_txt2img(session, [(style, 1.0)], text, req)[0]
    return cache[style.key]
