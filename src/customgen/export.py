"""`customgen export`: bake a style into a full SD v1.5 checkpoint that other tools load as a model.

    --format diffusers     a diffusers folder: StableDiffusionPipeline.from_pretrained(PATH)
    --format single-file   an original-layout .safetensors: AUTOMATIC1111 / ComfyUI models/Stable-diffusion
                           (checkpoints) folders, diffusers' from_single_file

DreamBooth styles become the UNet they were trained into (base + scale·(trained − base)); LoRA styles are
fused at a chosen scale; a Textual Inversion style can only go into a diffusers folder (its token joins the
tokenizer) — for the WebUI it is an embedding file, not a model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from customgen.errors import UserError
from customgen.inference.images import writable_target
from customgen.inference.library import StyleLibrary
from customgen.memory import DTYPES
from customgen.models import DEFAULT_MODEL, load_components, save_pipeline
from customgen.models.ldm import to_ldm

FORMATS = ("single-file", "diffusers")


def check_target(out: Path, fmt: str, *, overwrite: bool) -> Path:
    """The output path, refused in one line when it has the wrong shape, exists without --overwrite, lies under a
    file or in a folder that refuses new files (writable_target); missing parent folders are created."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "single-file" and out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a single-file checkpoint is written as .safetensors")
    return writable_target(out, overwrite=overwrite)  # missing parent folders are made when the export is written


def export(style, out: str | Path, *, fmt: str = "single-file", model: str | None = None, scale: float = 1.0,
           dtype: str = "fp16", styles_dir=None, overwrite: bool = False) -> Path:
    """Merge `style` (library name, folder or Style) into its base model (or `model`) and write it to `out`."""
    out = check_target(Path(out).expanduser(), fmt, overwrite=overwrite)
    if dtype not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    if not 0.0 <= float(scale) <= 10.0:
        raise UserError(f"--scale must be between 0 and 10, got {scale}")
    style = StyleLibrary(styles_dir).resolve(style)
    comps = load_components(model or style.manifest.base_model or DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    style.kind.check(style, comps)
    style.kind.merge(comps, style, float(scale), single_file=fmt == "single-file")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # written aside, renamed when complete
    out.parent.mkdir(parents=True, exist_ok=True)  # like save_pretrained: `--out exports/db.safetensors` just works
    try:
        if fmt == "diffusers":
            for m in (comps.unet, comps.vae, comps.text_encoder):
                m.to(DTYPES[dtype])
            save_pipeline(comps, tmp)
        else:
            save_file(to_ldm(comps.unet, comps.vae, comps.text_encoder, dtype=DTYPES[dtype]), str(tmp),
                      metadata={"customgen_style": style.name, "customgen_scale": str(scale),
                                "customgen_base_model": comps.ref})
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return out
