"""Model references → SD v1.5 components and stock diffusers pipelines.

References: a Hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`), a local diffusers
folder, a single `.safetensors`/`.ckpt` file, or the reserved `tiny` / `sd15-random`.
"""
from __future__ import annotations

from customgen.models.builders import Components, build_reserved
from customgen.models.loading import DEFAULT_MODEL, ModelRef, load_components, resolve_ref
from customgen.models.pipelines import KINDS, build_pipeline, canonical_text_encoder, save_pipeline


def load_pipeline(ref="stable-diffusion-v1-5/stable-diffusion-v1-5", *, kind: str = "img2img", dtype=None, device=None):
    """Model reference (or `Components`) → a stock diffusers pipeline of `kind` on `device`."""
    comps = ref if isinstance(ref, Components) else load_components(ref, dtype=dtype, device=device)
    return build_pipeline(comps, kind=kind)


__all__ = ["Components", "DEFAULT_MODEL", "KINDS", "ModelRef", "build_pipeline", "build_reserved", "canonical_text_encoder",
           "save_pipeline",
           "load_components", "load_pipeline", "resolve_ref"]
