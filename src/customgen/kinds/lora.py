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
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from customgen.errors import UserError
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.files import first_line, readable
from customgen.train.freeze import freeze

WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention projections (subject LoRA)
_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora\.down|lora\.up|lora_linear_layer\.down|"
                  r"lora_linear_layer\.up|lora_A|lora_B)\.weight$")


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


def check_lora(path: Path, modules: dict) -> None:
    """Every LoRA matrix must match its target layer's in/out features in this model (same architecture)."""
    with readable(path) as f:
        for key in f.keys():
            m = _KEY.match(key)
            if not m or modules.get(m.group(1)) is None:
                continue
            owner, module_path, part = m.groups()
            try:
                layer = modules[owner].get_submodule(module_path)
            except AttributeError:
                raise UserError(f"{path}: layer {owner}.{module_path} is not in this model "
                                "(the style was trained for another base model)") from None
            shape = f.get_slice(key).get_shape()  # down/A: (r, in); up/B: (out, r)
            down = part.endswith(("down", "_A"))
            want = getattr(layer, "in_features" if down else "out_features", None)
            have = shape[1] if down else shape[0]
            if want is not None and want != have:
                raise UserError(f"{path}: {owner}.{module_path} has {have} features in the style but {want} in "
                                "this model (the style was trained for another base model)")


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
LORA_COMPONENTS = ("unet", "text_encoder")  # pipeline components LoRA styles adapt (stock fuse_lora names)


@dataclass
class LoraState:
    """LoRA styles loaded into one session: artifact folder → peft adapter name, and what is active now."""

    adapters: dict = field(default_factory=dict)
    active: tuple | None = None  # ((adapter, weight), ...) last set; None: nothing set yet
    fused: dict | None = None  # peft layer → (weight, bias) of its base layer before fusing, on the CPU


def lora_layers(pipe, adapter: str) -> list:
    """The peft LoRA layers of the pipeline's UNet and text encoder that hold `adapter`."""
    return [m for c in LORA_COMPONENTS for m in getattr(pipe, c).modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})]


def _base_copy(layer) -> tuple:
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    return base.weight.detach().to("cpu", copy=True), None if bias is None else bias.detach().to("cpu", copy=True)


class LoraKind(Kind):
    """LoRA styles as named peft adapters. One active style is fused into the base weights at its scale (stock
    `fuse_lora`: the LoRA branch costs nothing per step); blends run unfused through `set_adapters`. Unfusing
    copies the saved base weights back, so switching styles restores the base model bit for bit."""

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
            raise UserError(f"cannot load LoRA style {style.name} from {style.folder}: {first_line(err)}") from err
        state.adapters[style.folder] = name
        state.active = None  # peft activates a newly loaded adapter: set the active set again

    def activate(self, session, active: list[tuple]) -> None:
        state = session.state(self)
        if not state.adapters:
            return
        # An adapter at weight 0 adds exactly nothing: leaving it out lets a single remaining style fuse.
        weighted = tuple((state.adapters[s.folder], float(w)) for s, w in active if float(w) != 0.0)
        if weighted == state.active:
            return  # nothing changed: set_adapters walks every module of the UNet
        pipe = session.pipeline("img2img")
        if not weighted:
            pipe.disable_lora()  # peft skips the LoRA branch: the base output, bit for bit
        else:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in weighted], adapter_weights=[w for _, w in weighted])
        state.active = weighted

    def stock_variants(self) -> dict[str, bool]:
        return {"load_lora_weights": False, "load_lora_weights + fuse_lora": True}  # customgen fuses one style

    def load_stock(self, pipe, style, variant: str) -> None:
        load_lora(pipe, style.folder, adapter_name="style")
        if variant.endswith("fuse_lora"):
            pipe.fuse_lora(components=list(LORA_COMPONENTS), lora_scale=1.0)

    def fuse(self, session) -> None:
        """Fuse a single active adapter at its scale, as stock `fuse_lora(lora_scale=w)` does it (the adapter at
        weight 1, then the scale); the base weights of its layers are kept on the CPU for `unfuse`."""
        state = session.state(self)
        if state.fused is not None or not state.active or len(state.active) != 1:
            return
        (name, weight), = state.active
        pipe = session.pipeline("img2img")
        state.fused = {layer: _base_copy(layer) for layer in lora_layers(pipe, name)}
        pipe.set_adapters([name], adapter_weights=[1.0])
        pipe.fuse_lora(components=list(LORA_COMPONENTS), lora_scale=weight, adapter_names=[name])

    def unfuse(self, session) -> None:
        """Unmerge (peft's bookkeeping), then copy the saved base weights back: exact, unlike W + ΔW − ΔW."""
        state = session.state(self)
        if state.fused is None:
            return
        with warnings.catch_warnings():  # layers of other (unfused) adapters say so, once each
            warnings.filterwarnings("ignore", message="Already unmerged")
            session.pipeline("img2img").unfuse_lora(components=list(LORA_COMPONENTS))
        with torch.no_grad():
            for layer, (weight, bias) in state.fused.items():
                base = layer.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
        state.fused, state.active = None, None  # fusing rescaled the layers: set the adapters again
