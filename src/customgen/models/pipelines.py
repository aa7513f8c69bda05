"""Stock diffusers pipelines around `Components` (txt2img, img2img, inpaint), safety checker off."""
from __future__ import annotations

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from customgen.errors import UserError
from customgen.models.builders import Components

KINDS = ("txt2img", "img2img", "inpaint")


def pipeline_class(kind: str):
    """The diffusers pipeline class for `kind`."""
    classes = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
               "inpaint": StableDiffusionInpaintPipeline}
    if kind not in classes:
        raise UserError(f"unknown pipeline kind {kind!r}; choose from {', '.join(KINDS)}")
    return classes[kind]


def build_pipeline(comps: Components, *, kind: str = "img2img"):
    """A stock diffusers pipeline sharing `comps`' modules (no copies, no safety checker)."""
    cls = pipeline_class(kind)
    pipe = cls(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=comps.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
