"""img2img stylization of content images with library styles (LoRA blends, DreamBooth, Textual Inversion),
an optional mask, a style image (IP-Adapter or nearest library style) and structure guidance (ControlNet).

With no style the call is exactly stock `StableDiffusionImg2ImgPipeline` with the same weights, strength,
steps, guidance and `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import customgen
from customgen.errors import Notice, UserError
from customgen.inference import adapters
from customgen.inference.images import (check_size, composite, default_feather, feather_mask, load_content,
                                        load_contents, load_mask, to_original, to_working, with_settings)
from customgen.inference.library import Style, StyleLibrary
from customgen.inference.prompts import build_prompt, prompt_kwargs
from customgen.inference.session import SCHEDULERS, get_session, make_scheduler
from customgen.models import DEFAULT_MODEL

DEFAULT_STRENGTH = 0.6  # img2img denoising strength (diffusers' meaning); = style_strength 2/3
DEFAULT_SCALE = 1.0  # style (adapter) scale
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
STYLE_IMAGE_MODES = ("auto", "ip-adapter", "nearest")
STRUCTURES = tuple(adapters.CONTROLNETS)


def style_strength_settings(style_strength: float) -> tuple[float, float]:
    """One knob s in [0, 1] → (strength, scale) = (0.2 + 0.6·s, min(1, 2·s)): the style fades in first, then
    denoising grows so it can reshape the image. s = 0 is plain img2img at strength 0.2 with the style off."""
    check_unit("style_strength", style_strength)
    return round(0.2 + 0.6 * style_strength, 6), round(min(1.0, 2.0 * style_strength), 6)


def check_unit(name: str, value: float) -> None:
    """A value in [0, 1], or one line saying so."""
    if not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{name} must be between 0 and 1, got {value}")


def check_sampling(*, steps: int, guidance: float, scheduler: str, size: int | None) -> None:
    """Steps, guidance, scheduler and working size, each with a one-line error."""
    if int(steps) < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if float(guidance) < 0:
        raise UserError(f"guidance must be >= 0, got {guidance}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    check_size(size)


def random_seed() -> int:
    """A fresh seed (recorded in the output's metadata, so the image can be reproduced)."""
    return random.SystemRandom().randrange(2**32)


def as_list(styles) -> list:
    """None, one style (name, path or Style) or several → a list."""
    return [] if styles is None else [styles] if isinstance(styles, (str, Path, Style)) else list(styles)


def resolve_styles(styles, scales, library: StyleLibrary) -> list[tuple[Style, float]]:
    """Style references and scales → (Style, scale) pairs; one scale applies to all, else one per style."""
    refs = as_list(styles)
    scale_list = [DEFAULT_SCALE] if scales is None else [scales] if isinstance(scales, (int, float)) else list(scales)
    if refs and len(scale_list) not in (1, len(refs)):
        raise UserError(f"{len(scale_list)} style scales for {len(refs)} styles: give one scale, or one per style")
    scale_list = scale_list * len(refs) if len(scale_list) == 1 else scale_list
    if any(float(s) < 0 for s in scale_list):
        raise UserError(f"style scales must be >= 0, got {scale_list}")
    return [(library.resolve(r), float(s)) for r, s in zip(refs, scale_list)]


def knobs(strength, scales, style_strength) -> tuple[float, object]:
    """(strength, scales) from explicit values or the single style_strength knob (not both)."""
    if style_strength is None:
        strength = DEFAULT_STRENGTH if strength is None else strength
        check_unit("strength", strength)
        return float(strength), scales
    if strength is not None or scales is not None:
        raise UserError("give either style_strength or strength/style scales, not both")
    return style_strength_settings(style_strength)


@dataclass
class Job:
    """One stylize request after validation: what every content image is run with."""

    specs: list
    prompt: str | None
    negative_prompt: str
    strength: float
    guidance: float
    steps: int
    scheduler: str
    seed: int
    size: int | None
    mask: object = None
    feather: int | None = None
    structure: str | None = None
    structure_scale: float = 1.0
    style_image: Image.Image | None = None
    style_image_scale: float = 1.0
    notes: dict = field(default_factory=dict)


def stylize(content, styles=None, *, scales=None, strength: float | None = None, style_strength: float | None = None,
            model=DEFAULT_MODEL, styles_dir=None, prompt: str | None = None, negative_prompt: str = "",
            guidance: float = DEFAULT_GUIDANCE, steps: int = DEFAULT_STEPS, scheduler: str = "dpm++",
            seed: int | None = None, size: int | None = None, mask=None, feather: int | None = None,
            style_image=None, style_image_mode: str = "auto", style_image_scale: float = 1.0,
            structure: str | None = None, structure_scale: float = 1.0, embedder=None, device=None, dtype=None):
    """Stylize content image(s) with library styles by img2img; returns a PIL image (a list for several).
    One knob instead of strength/scales: style_strength s → strength 0.2 + 0.6·s, scale min(1, 2·s)."""
    strength, scales = knobs(strength, scales, style_strength)
    check_sampling(steps=steps, guidance=guidance, scheduler=scheduler, size=size)
    if int(int(steps) * strength) < 1:
        raise UserError(f"strength {strength} × {steps} steps runs no denoising step: raise strength or steps")
    if structure is not None and structure not in STRUCTURES:
        raise UserError(f"unknown structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if style_image_mode not in STYLE_IMAGE_MODES:
        raise UserError(f"unknown style image mode {style_image_mode!r}; choose from {', '.join(STYLE_IMAGE_MODES)}")
    contents = load_contents(content)
    session = get_session(model, device=device, dtype=dtype)
    library = StyleLibrary(styles_dir)
    job = Job(resolve_styles(styles, scales, library), prompt, negative_prompt, strength, float(guidance), int(steps),
              scheduler, random_seed() if seed is None else int(seed), size, mask, feather, structure,
              float(structure_scale), None, float(style_image_scale))
    if style_image is not None:
        add_style_image(session, job, load_content(style_image), style_image_mode, library, embedder)
    with session.lock:
        session.activate(job.specs)
        outputs = [stylize_one(session, img, job) for img in contents]
    return outputs[0] if is_single(content) else outputs


def is_single(content) -> bool:
    """One image (PIL or an image file path) rather than a list, folder or selection JSON."""
    if isinstance(content, Image.Image):
        return True
    if isinstance(content, (list, tuple)):
        return False
    path = Path(content)
    return not path.is_dir() and path.suffix.lower() != ".json"


def add_style_image(session, job: Job, image: Image.Image, mode: str, library: StyleLibrary, embedder) -> None:
    """IP-Adapter on the image when its weights can be had (auto), else the nearest library style."""
    if mode == "auto":
        mode = "ip-adapter" if adapters.ip_adapter_available(session) else "nearest"
        if mode == "nearest":
            warnings.warn("IP-Adapter weights (h94/IP-Adapter) are not cached and the Hub is unreachable: "
                          "using the nearest library style instead", Notice, stacklevel=3)
    if mode == "ip-adapter":
        adapters.ip_adapter_weights(session)  # fail now, before any content is processed
        job.style_image, job.notes["style_image"] = image, "ip-adapter"
        return
    from customgen.inference.txt2img import preview
    from customgen.inference.nearest import nearest_style

    chosen, distances = nearest_style(image, library.styles(), embedder=embedder,
                                      preview=lambda s: preview(session, s, size=job.size))
    warnings.warn(f"style image → nearest library style {chosen.name} (distance {distances[chosen.name]:.3f})",
                  Notice, stacklevel=3)
    job.specs.append((chosen, job.style_image_scale))
    job.notes["style_image"] = f"nearest:{chosen.name}"


def stylize_one(session, content: Image.Image, job: Job) -> Image.Image:
    """One content image through the (ControlNet) img2img pipeline; back at its size, mask composited."""
    work = to_working(content, job.size or session.native_size)
    control = adapters.control_image(session, job.structure, work) if job.structure else None
    pipe = adapters.controlnet_pipeline(session, job.structure) if job.structure else session.pipeline("img2img")
    pipe.scheduler = make_scheduler(job.scheduler, session.comps.scheduler.config)
    prompt = build_prompt(session, job.specs, job.prompt)
    kwargs = dict(image=work, strength=job.strength, num_inference_steps=job.steps, guidance_scale=job.guidance,
                  generator=torch.Generator("cpu").manual_seed(job.seed),
                  **prompt_kwargs(session, pipe, job.specs, prompt, job.negative_prompt))
    if control is not None:
        kwargs.update(control_image=control, controlnet_conditioning_scale=job.structure_scale)
    ip = adapters.ip_adapter(session, pipe, job.style_image_scale) if job.style_image else contextlib.nullcontext()
    with ip, torch.inference_mode():
        if job.style_image is not None:
            kwargs["ip_adapter_image"] = job.style_image
        out = pipe(**kwargs).images[0]
    out = to_original(out, content.size)
    if job.mask is not None:
        weights = feather_mask(load_mask(job.mask, content.size), default_feather(content.size)
                               if job.feather is None else job.feather)
        out = composite(content, out, weights)
    return with_settings(out, settings(session, job, prompt, content, work.size))


def settings(session, job: Job, prompt: str, content: Image.Image, work_size) -> dict:
    """Everything needed to reproduce an output (stored in its PNG text metadata)."""
    return {
        "tool": "customgen.stylize", "version": customgen.__version__, "model": session.comps.ref,
        "styles": [{"name": s.name, "method": s.manifest.method, "kind": s.kind, "scale": w} for s, w in job.specs],
        "strength": job.strength, "seed": job.seed, "steps": job.steps, "scheduler": job.scheduler,
        "guidance": job.guidance, "prompt": prompt, "negative_prompt": job.negative_prompt,
        "working_size": list(work_size), "content": content.info.get("source", ""), "mask": job.mask is not None,
        "structure": job.structure, "structure_scale": job.structure_scale if job.structure else None,
        "style_image": job.notes.get("style_image"), "style_image_scale": job.style_image_scale
        if job.style_image is not None else None,
    }
