"""Stock diffusers pipelines around `Components` (txt2img, img2img, inpaint), safety checker off."""
from __future__ import annotations

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from customgen.errors import UserError
from customgen.models.builders import Components
from customgen.models.tokenizer import save_tokenizer

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


def save_pipeline(comps: Components, folder: str | Path) -> Path:
    """A diffusers folder (`from_pretrained` loads it) that transformers 4 and 5 both read: the text encoder's
    weights under CLIPTextModel's canonical `text_model.` names (transformers 5 writes them without, and
    transformers 4 would then silently start from random weights), the tokenizer in both formats."""
    build_pipeline(comps, kind="txt2img").save_pretrained(folder, safe_serialization=True)
    for path in (Path(folder) / "text_encoder").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        if any(not k.startswith("text_model.") for k in state):
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()},
                      str(path), metadata=metadata)
    save_tokenizer(comps.tokenizer, Path(folder) / "tokenizer")
    return Path(folder)
