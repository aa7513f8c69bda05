"""Stock diffusers pipelines around `Components` (txt2img, img2img, inpaint), safety checker off; diffusers folders
written and checked."""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

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


WEIGHTED = ("unet", "vae", "text_encoder")  # the components whose weights a diffusers folder holds
TEXT_ENCODER_WEIGHTS = "model.safetensors"


def canonical_text_encoder(state: dict, prefix: str = "") -> dict:
    """Text-encoder names with CLIPTextModel's `text_model.` level, as SD1 tools and every transformers release read
    them (transformers 4.x and 5.0 have the level in their module tree; 5.15 and later drop it). With `prefix`, only
    keys under it are text-encoder names (`text_encoder.encoder...` → `text_encoder.text_model.encoder...`)."""
    def name(key: str) -> str:
        rest = key[len(prefix):]
        return key if not key.startswith(prefix) or rest.startswith("text_model.") else f"{prefix}text_model.{rest}"

    return {name(k): v for k, v in state.items()}


def canonical_state(name: str, module) -> dict:
    """A component's own tensors under the names its diffusers folder holds."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    return canonical_text_encoder(state) if name == "text_encoder" else state


def expected_names(name: str, module) -> set[str]:
    """What `from_pretrained` fills in a fresh component of this class and config (built on the meta device):
    independent of the names the merged module happens to carry."""
    with init_empty_weights():
        fresh = type(module)._from_config(module.config) if name == "text_encoder" else type(module).from_config(module.config)
    names = set(fresh.state_dict())
    return set(canonical_text_encoder(dict.fromkeys(names))) if name == "text_encoder" else names


def read_folder(folder: Path) -> dict:
    """Every tensor of a component folder's safetensors files (shards included)."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(path))
    return state


def check_saved(comps: Components, folder: Path) -> None:
    """Refuse (one line) a written folder that would not reload into these components: a key `from_pretrained`
    wants that is missing, one it would ignore, or a tensor that differs from the module's."""
    for name in WEIGHTED:
        module = getattr(comps, name)
        saved, own, wanted = read_folder(folder / name), canonical_state(name, module), expected_names(name, module)
        missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        differ = [k for k in sorted(wanted & set(saved)) if k not in own or not torch.equal(saved[k], own[k])]
        if missing or extra or differ:
            first = (missing or extra or differ)[0]
            raise UserError(
                f"the written {name} would not reload ({len(missing)} weights missing, {len(extra)} unexpected, "
                f"{len(differ)} different, e.g. {first}) with transformers {transformers.__version__} and diffusers "
                f"{diffusers.__version__}; nothing was exported, please report it")


def save_pipeline(comps: Components, folder: str | Path) -> Path:
    """A diffusers folder (`from_pretrained` loads it) that transformers 4 and 5 both read, checked after writing.

    The text encoder's weights are written from the module's own tensors under CLIPTextModel's canonical
    `text_model.` names: transformers' own `save_pretrained` writes whatever its release maps the names to
    (5.0.0, after a LoRA was fused and unloaded, wrote `text_base_model.model.model.*`, which `from_pretrained`
    then skipped, leaving a random text encoder). The tokenizer is saved in both formats."""
    folder = Path(folder)
    build_pipeline(comps, kind="txt2img").save_pretrained(folder, safe_serialization=True)
    te = folder / "text_encoder"
    for path in [*te.glob("*.safetensors"), *te.glob("*.safetensors.index.json")]:
        path.unlink()
    save_file(canonical_state("text_encoder", comps.text_encoder), str(te / TEXT_ENCODER_WEIGHTS), metadata={"format": "pt"})
    save_tokenizer(comps.tokenizer, folder / "tokenizer")
    check_saved(comps, folder)
    return folder
