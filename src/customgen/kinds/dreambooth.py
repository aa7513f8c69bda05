"""DreamBooth (Ruiz et al. 2023) on a scope of UNet parameters (attention | cross_attention | full); the
artifact holds only the trained parameters, under their diffusers names. Recipe: `dreambooth_style`.

At inference the trained weights are swapped into the session's UNet and the base weights restored exactly
when the style is switched off; a scale s gives weights = base + s·(trained − base).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customgen.errors import UserError
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.files import first_line
from customgen.kinds.freeze import freeze, scope_names, unfreeze
from customgen.kinds.validate import check_finite_state, check_weights

WEIGHTS = "dreambooth_unet.safetensors"


# --- files -------------------------------------------------------------------------------------------------
def save_dreambooth(folder: str | Path, unet, names: list[str], *, scope: str) -> None:
    """Save only the trained UNet parameters, under their diffusers names."""
    params = dict(unet.named_parameters())
    state = {n: params[n].detach().float().cpu().contiguous() for n in names}
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"format": "customgen-dreambooth", "scope": scope})


def load_dreambooth(unet, folder: str | Path, weights: str = WEIGHTS) -> dict:
    """Swap an artifact's DreamBooth `weights` into `unet` with key, shape and value checks; returns the originals
    to restore."""
    path = Path(folder) / weights
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file ({first_line(err)}); "
                        "retrain or re-copy the artifact") from err
    check_finite_state(path, state)
    own = unet_parameters(unet)
    for key, value in state.items():
        if key not in own:
            raise UserError(f"{path}: key {key} is not in this UNet (was it trained on another base model?)")
        if own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, this UNet has {tuple(own[key].shape)}")
    originals = {k: own[k].detach().clone() for k in state}
    swap_weights(unet, state)
    return originals


def swap_weights(unet, state: dict) -> None:
    """Copy `state` into `unet`'s parameters in place (dtype/device of the UNet)."""
    params = unet_parameters(unet)
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


def unet_parameters(unet) -> dict:
    """Parameters by diffusers name, also for layers peft wrapped for LoRA (`x.base_layer.weight` as `x.weight`)."""
    params = dict(unet.named_parameters())
    return params | {k.replace(".base_layer.", "."): v for k, v in params.items() if ".base_layer." in k}


# --- training ----------------------------------------------------------------------------------------------
class DreamBoothMethod(Method):
    """DreamBooth on a scope of UNet parameters; the artifact holds only those."""

    def setup(self, comps) -> list[dict]:
        freeze(comps.unet, comps.vae, comps.text_encoder)
        self.names = scope_names(comps.unet, self.cfg.dreambooth.scope)
        return [{"params": unfreeze(comps.unet, self.names), "lr": self.cfg.train.lr}]

    def settings(self) -> dict:
        return {"scope": self.cfg.dreambooth.scope}

    def saved_bytes(self, comps) -> int:
        """fp32 copies of the scope's UNet parameters, in one file."""
        names = set(scope_names(comps.unet, self.cfg.dreambooth.scope))
        return 4 * sum(p.numel() for n, p in comps.unet.named_parameters() if n in names)

    def memory_savers(self) -> list[str]:
        narrower = {"full": "attention", "attention": "cross_attention"}.get(self.cfg.dreambooth.scope)
        return [f"dreambooth.scope={narrower}"] if narrower else []

    def save(self, folder: Path, comps, facts: dict) -> dict:
        save_dreambooth(folder, comps.unet, self.names, scope=self.cfg.dreambooth.scope)
        return {"weights": WEIGHTS, "scope": self.cfg.dreambooth.scope}


# --- inference ---------------------------------------------------------------------------------------------
@dataclass
class DreamBoothState:
    """DreamBooth styles loaded into one session (CPU copies) and the active (folder, scale) pairs."""

    trained: dict = field(default_factory=dict)  # artifact folder → {param: trained weight}
    base: dict = field(default_factory=dict)  # param → base weight, to restore exactly
    active: tuple = ()


class DreamBoothKind(Kind):
    name = "dreambooth"
    weights = WEIGHTS
    method_class = DreamBoothMethod
    recipes = (Recipe("dreambooth_style", "dreambooth", "style", "tab:orange"),)

    def check(self, style, comps) -> None:
        check_weights(style.folder / style.manifest.weights, unet_parameters(comps.unet))  # values: when loading

    def merge(self, comps, style, scale: float, *, single_file: bool) -> None:
        """Weights = base + scale·(trained − base) (exactly the trained weights at scale 1)."""
        base = load_dreambooth(comps.unet, style.folder, style.manifest.weights)
        if scale != 1.0:
            params = unet_parameters(comps.unet)
            swap_weights(comps.unet, {k: b.float() + scale * (params[k].detach().float() - b.float())
                                      for k, b in base.items()})

    def new_state(self) -> DreamBoothState:
        return DreamBoothState()

    def load(self, session, style) -> None:
        state, unet = session.state(self), session.comps.unet
        self.activate(session, [])  # load against the base weights, so the returned originals are the base
        originals = load_dreambooth(unet, style.folder, style.manifest.weights)
        params = unet_parameters(unet)  # works after LoRA wrapped the layers too
        state.trained[style.folder] = {key: params[key].detach().to("cpu", copy=True) for key in originals}
        for key, value in originals.items():
            state.base.setdefault(key, value.to("cpu"))
        swap_weights(unet, originals)  # back to the base until activated

    def stock_variants(self) -> dict[str, bool]:
        return {"merged UNet": True}  # a stock pipeline holding the fine-tuned UNet

    def load_stock(self, pipe, style, variant: str) -> None:
        load_dreambooth(pipe.unet, style.folder, style.manifest.weights)

    def activate(self, session, active: list[tuple]) -> None:
        """Weights = base + Σ scale·(trained − base); exactly the trained weights for one style at scale 1."""
        state = session.state(self)
        pairs = tuple((s.folder, float(w)) for s, w in active)
        if pairs == state.active:
            return
        target = {k: state.base[k] for folder, _ in state.active for k in state.trained[folder]}
        if len(pairs) == 1 and pairs[0][1] == 1.0:
            target.update(state.trained[pairs[0][0]])
        elif pairs:
            for folder, scale in pairs:
                for key, w in state.trained[folder].items():
                    base = state.base[key].float()
                    target[key] = target.get(key, base).float() + scale * (w.float() - base)
        swap_weights(session.comps.unet, target)
        state.active = pairs
