"""img2img stylization of content images with library styles (LoRA blends, DreamBooth, Textual Inversion),
an optional mask, a style image (IP-Adapter or nearest library style) and structure guidance (ControlNet).

With no style the call is exactly stock `StableDiffusionImg2ImgPipeline` with the same weights, strength,
steps, guidance and `torch.Generator("cpu").manual_seed(seed)`. Per image, customgen adds only the resize to the
working size and back, the mask and the metadata: the scheduler and the encoded prompt are reused from the
session. `request.batch` > 1 runs content images of the same working size together, each with its own
generator seeded with `seed`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import customgen
from customgen.errors import Notice
from customgen.inference import adapters
from customgen.inference.fit import fit_sampling, use
from customgen.inference.images import (composite, default_feather, feather_mask, load_content, load_contents,
                                        load_mask, to_original, to_working, with_settings)
from customgen.inference.library import StyleLibrary, resolve_styles, scheduler_notes
from customgen.inference.nearest import nearest_style
from customgen.inference.prompts import build_prompt, conditioning
from customgen.inference.session import Session, get_session, lap
from customgen.inference.txt2img import as_request, preview
from customgen.models.footprint import addon_shapes
from customgen.request import Request


@dataclass
class Job:
    """One stylize call after validation: the resolved request, the styles, the style image and notes."""

    request: Request  # resolved: strength, scales and seed are concrete
    specs: list  # (Style, scale) pairs
    style_image: Image.Image | None = None  # for the IP-Adapter
    notes: dict = field(default_factory=dict)
    controlnet: Any = None  # the request's local ControlNet (models.addons.ControlNetFile), checked
    ip_adapter: Any = None  # the request's local IP-Adapter (models.addons.IPAdapterFile), checked


def stylize(content, styles=None, request: Request | None = None, *, styles_dir=None, embedder=None, **fields):
    """Stylize content image(s) with library styles by img2img; returns a PIL image (a list for several).

    Keyword fields are those of `customgen.request.Request` (strength, scales, stylization, steps, guidance,
    scheduler, seed, size, prompt, mask, style_image, structure, model, ...). One knob instead of
    strength/scales: stylization s → strength 0.2 + 0.6·s, scale min(1, 2·s)."""
    req = as_request(request, fields).resolved()
    controlnet, ip = adapters.local_addons(req)  # local add-on files checked before the base model loads
    contents = load_contents(content)
    library = StyleLibrary(styles_dir)
    job = Job(req, resolve_styles(styles, req.scales, library), controlnet=controlnet, ip_adapter=ip)  # styles (and
    # files) checked before the model loads
    scheduler_notes(job.specs, req.scheduler)
    session = get_session(req.model, device=req.device, dtype=req.dtype)
    if req.style_image is not None:
        add_style_image(session, job, load_content(req.style_image), library, embedder)
    with session.lock:
        session.activate(job.specs)
        outputs = stylize_all(session, contents, job)
    return outputs[0] if is_single(content) else outputs


def is_single(content) -> bool:
    """One image (PIL or an image file path) rather than a list, folder or selection JSON."""
    if isinstance(content, Image.Image):
        return True
    if isinstance(content, (list, tuple)):
        return False
    path = Path(content)
    return not path.is_dir() and path.suffix.lower() != ".json"


def add_style_image(session: Session, job: Job, image: Image.Image, library: StyleLibrary, embedder) -> None:
    """IP-Adapter on the image when its weights can be had (auto), else the nearest library style."""
    mode, req = job.request.style_image_mode, job.request
    if mode == "auto":
        mode = "ip-adapter" if adapters.ip_adapter_available(session, job.ip_adapter) else "nearest"
        if mode == "nearest":
            warnings.warn("IP-Adapter weights (h94/IP-Adapter) are not cached and the Hub is unreachable: "
                          "using the nearest library style instead (or pass --ip-adapter FILE)", Notice, stacklevel=3)
    if mode == "ip-adapter":
        adapters.ip_adapter_weights(session, job.ip_adapter)  # fail now, before any content is processed
        job.style_image, job.notes["style_image"] = image, "ip-adapter"
        return
    chosen, distances = nearest_style(image, library.styles(), embedder=embedder,
                                      preview=lambda s: preview(session, s, size=req.size))
    warnings.warn(f"style image → nearest library style {chosen.name} (distance {distances[chosen.name]:.3f})",
                  Notice, stacklevel=3)
    job.specs.append((chosen, float(req.style_image_scale)))
    job.notes["style_image"] = f"nearest:{chosen.name}"


def batches(sizes: list[tuple[int, int]], batch: int) -> list[list[int]]:
    """Indices grouped by working size, at most `batch` per group, in first-seen order."""
    groups: dict = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return [idx[i:i + batch] for idx in groups.values() for i in range(0, len(idx), batch)]


def stylize_all(session: Session, contents: list[Image.Image], job: Job) -> list[Image.Image]:
    """Every content image, up to `request.batch` of one working size per pipeline call (fewer, and VAE slicing or
    tiling, where the predicted peak asks for it: customgen.inference.fit); outputs in input order."""
    with lap(session, "resize"):
        works = [to_working(c, job.request.size or session.native_size) for c in contents]
    outputs: list = [None] * len(contents)
    for group in batches([w.size for w in works], len(works)):
        w, h = works[group[0]].size
        plan = fit_sampling(session, kind="img2img", size=(h, w), batch=min(job.request.batch, len(group)),
                            cap_gib=job.request.cap_gib, addons=job_addons(session, job))
        use(session, plan)
        for i in range(0, len(group), plan.batch):
            idx = group[i:i + plan.batch]
            for k, out in zip(idx, stylize_batch(session, [contents[k] for k in idx], [works[k] for k in idx], job)):
                outputs[k] = out
    return outputs


def job_addons(session: Session, job: Job):
    """The add-ons this job's calls use, by shape (for the memory prediction); they load here if not loaded yet."""
    req = job.request
    net = adapters.load_controlnet(session, req.structure, job.controlnet) if req.structure else None
    ip = adapters.ip_adapter_weights(session, job.ip_adapter) if job.style_image is not None else None
    return addon_shapes(net, ip)


def stylize_batch(session: Session, contents: list[Image.Image], works: list[Image.Image], job: Job) -> list:
    """Content images of one working size through one (ControlNet) img2img call; back at their sizes, masks
    composited."""
    req, n = job.request, len(works)
    with lap(session, "prepare"):
        pipe = (adapters.controlnet_pipeline(session, req.structure, job.controlnet) if req.structure
                else session.pipeline("img2img"))
        if pipe.scheduler is not session.scheduler(req.scheduler):
            pipe.scheduler = session.scheduler(req.scheduler)
        prompt = build_prompt(session, job.specs, req.prompt)
        generators = [torch.Generator("cpu").manual_seed(req.seed) for _ in works]
        kwargs = dict(image=works[0] if n == 1 else works, strength=req.strength, num_inference_steps=req.steps,
                      guidance_scale=req.guidance, generator=generators[0] if n == 1 else generators,
                      **conditioning(session, pipe, job.specs, prompt, req.negative_prompt, guidance=req.guidance,
                                     batch=n))
        if req.structure:
            control = [adapters.control_image(session, req.structure, w) for w in works]
            kwargs.update(control_image=control[0] if n == 1 else control,
                          controlnet_conditioning_scale=float(req.structure_scale))
        if job.style_image is not None:
            kwargs["ip_adapter_image"] = job.style_image
    ip = (adapters.ip_adapter(session, pipe, float(req.style_image_scale), job.ip_adapter)
          if job.style_image is not None else contextlib.nullcontext())
    with lap(session, "pipeline"), ip, torch.inference_mode():
        images = pipe(**kwargs).images
    with lap(session, "finish"):
        return [finish(session, job, prompt, c, w.size, out) for c, w, out in zip(contents, works, images)]


def finish(session: Session, job: Job, prompt: str, content: Image.Image, work_size, out: Image.Image) -> Image.Image:
    """An output back at its content's size, the mask composited, the settings attached."""
    req = job.request
    out = to_original(out, content.size)
    if req.mask is not None:
        weights = feather_mask(load_mask(req.mask, content.size), default_feather(content.size)
                               if req.feather is None else req.feather)
        out = composite(content, out, weights)
    return with_settings(out, settings(session, job, prompt, content, work_size))


def settings(session: Session, job: Job, prompt: str, content: Image.Image, work_size) -> dict:
    """Everything needed to reproduce an output (stored in its PNG text metadata)."""
    req = job.request
    return {
        "tool": "customgen.stylize", "version": customgen.__version__, "model": session.comps.ref,
        "styles": [{"name": s.name, "method": s.method, "kind": s.kind.name, "scale": w} for s, w in job.specs],
        "strength": req.strength, "seed": req.seed, "steps": req.steps, "scheduler": req.scheduler,
        "guidance": req.guidance, "prompt": prompt, "negative_prompt": req.negative_prompt,
        "working_size": list(work_size), "content": content.info.get("source", ""), "mask": req.mask is not None,
        "structure": req.structure, "structure_scale": float(req.structure_scale) if req.structure else None,
        "style_image": job.notes.get("style_image"), "style_image_scale": float(req.style_image_scale)
        if job.style_image is not None else None,
        "controlnet": str(job.controlnet) if req.structure and job.controlnet is not None else None,
        "ip_adapter": str(job.ip_adapter) if job.style_image is not None and job.ip_adapter is not None else None,
    }
