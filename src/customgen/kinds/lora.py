"""LoRA (Hu et al. 2021): low-rank adapters on the UNet attention projections (and, for subjects, on the text
encoder). Recipes: `lora_style`, `dreambooth_lora_subject`, `lora_anime_kohya` (they differ only by config).

Files: `pytorch_lora_weights.safetensors` (diffusers: `pipe.load_lora_weights(folder)`, rank/alpha metadata)
and `lora_kohya.safetensors` (kohya keys `lora_unet_...` with `.alpha`, for A1111 / ComfyUI). At inference a
LoRA style is a named peft adapter; scales blend through `set_adapters`, scale 0 or no LoRA is `disable_lora()`
(the base model, bit for bit).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from customgen.errors import UserError
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.files import first_line
from customgen.kinds.validate import RETRAIN, check_lora
from customgen.train.freeze import freeze

WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention projections (subject LoRA)


# --- files -------------------------------------------------------------------------------------------------
def _peft_state(model, adapter_name: str) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def save_lora(folder: str | Path, unet, text_encoder=None, *, adapter_name: str = "default") -> None:
    """Save LoRA weights in diffusers format (with rank/alpha metadata) plus a kohya export."""
    unet_state = _peft_state(unet, adapter_name)
    te_state = _peft_state(text_encoder, adapter_name) if text_encoder is not None else None
    meta = lambda m: m.peft_config[adapter_name].to_dict()  # noqa: E731 - rank/alpha survive reload
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_state) if te_state else None,
        weight_name=WEIGHTS, unet_lora_adapter_metadata=meta(unet),
        text_encoder_lora_adapter_metadata=meta(text_encoder) if te_state else None,
    )
    save_kohya(Path(folder) / KOHYA_WEIGHTS, unet_state, te_state, alpha=unet.peft_config[adapter_name].lora_alpha)


def save_kohya(path: Path, unet_state: dict, te_state: dict | None, *, alpha: float) -> None:
    """kohya/WebUI LoRA (lora_unet_... keys, one .alpha per module) via diffusers' converter."""
    prefixed = {f"unet.{k}": v for k, v in unet_state.items()}
    prefixed |= {f"text_encoder.{k}": v for k, v in (te_state or {}).items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    for key in kohya:
        if key.endswith(".alpha"):  # the converter writes alpha = rank (scale 1); keep the trained scale
            kohya[key] = torch.tensor(float(alpha))
    rank = next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    save_file(kohya, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                          "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"})


def load_lora(pipe, folder: str | Path, *, adapter_name: str) -> None:
    """Load a LoRA artifact into a pipeline under `adapter_name` (stock diffusers loader)."""
    pipe.load_lora_weights(str(folder), weight_name=WEIGHTS, adapter_name=adapter_name)


# --- training ----------------------------------------------------------------------------------------------
class LoraMethod(Method):
    """LoRA on the UNet attention projections (cfg.lora.targets), optionally on the text encoder too."""

    def __init__(self, cfg, kind):
        super().__init__(cfg, kind)
        self.trains_text_encoder = cfg.lora.text_encoder

    def _lora_config(self, targets) -> LoraConfig:
        c = self.cfg.lora
        return LoraConfig(r=c.rank, lora_alpha=c.alpha if c.alpha is not None else c.rank,
                          init_lora_weights=c.init, target_modules=list(targets))

    def setup(self, comps) -> list[dict]:
        freeze(comps.unet, comps.vae, comps.text_encoder)
        comps.unet.add_adapter(self._lora_config(self.cfg.lora.targets))
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.train.lr}]
        if self.trains_text_encoder:
            comps.text_encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS))
            groups.append({"params": [p for p in comps.text_encoder.parameters() if p.requires_grad],
                           "lr": self.cfg.lora.text_encoder_lr})
        return groups

    def save(self, folder: Path, comps) -> dict:
        save_lora(folder, comps.unet, comps.text_encoder if self.trains_text_encoder else None)
        c = self.cfg.lora
        return {"weights": WEIGHTS, "exports": [KOHYA_WEIGHTS], "rank": c.rank,
                "alpha": float(c.alpha if c.alpha is not None else c.rank), "text_encoder": c.text_encoder}


# --- inference ---------------------------------------------------------------------------------------------
@dataclass
class LoraState:
    """LoRA styles loaded into one session: artifact folder → peft adapter name, and what is active now."""

    adapters: dict = field(default_factory=dict)
    active: tuple | None = None  # ((adapter, weight), ...) last set; None: nothing set yet


class LoraKind(Kind):
    name = "lora"
    weights = WEIGHTS
    has_scale = True
    method_class = LoraMethod
    recipes = (Recipe("lora_style", "lora", "style", "tab:blue"),
               Recipe("dreambooth_lora_subject", "lora", "subject", "tab:purple"),
               Recipe("lora_anime_kohya", "lora", "subject", "tab:red"))

    def check(self, style, comps) -> None:
        check_lora(style.folder / style.manifest.weights, {"unet": comps.unet, "text_encoder": comps.text_encoder})

    def new_state(self) -> LoraState:
        return LoraState()

    def load(self, session, style) -> None:
        state = session.state(self)
        name = f"{re.sub(r'[^0-9A-Za-z_]', '_', style.name)}_{len(state.adapters)}"  # unique, no dots (peft keys)
        try:
            with warnings.catch_warnings():  # peft warns on every second adapter; named adapters are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora(session.pipeline("img2img"), style.folder, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load LoRA style {style.name} from {style.folder} ({first_line(err)}); "
                            f"{RETRAIN}") from err
        state.adapters[style.folder] = name
        state.active = None  # peft activates a newly loaded adapter: set the active set again

    def activate(self, session, active: list[tuple]) -> None:
        state = session.state(self)
        if not state.adapters:
            return
        weighted = tuple((state.adapters[s.folder], float(w)) for s, w in active)
        if weighted == state.active:
            return  # nothing changed: set_adapters walks every module of the UNet
        pipe = session.pipeline("img2img")
        if not weighted:
            pipe.disable_lora()  # peft skips the LoRA branch: the base output, bit for bit
        else:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in weighted], adapter_weights=[w for _, w in weighted])
        state.active = weighted
