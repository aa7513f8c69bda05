"""`lora.type` and `lora.dora` as peft trains them: the peft config of each type, the layers it adapts, and the
trained layers read back for the kohya/LyCORIS writer (customgen.formats.writing).

    lora    LoraConfig on lora.targets (the UNet attention projections)
    locon   LoraConfig on those, plus the ResNet blocks' time_emb_proj and conv_shortcut (lora.rank) and their 3×3
            conv1/conv2 and the down/up-samplers' conv (lora.conv_rank; 0 leaves them out): LyCORIS's LoCon targets
    loha    LoHaConfig on the same layers (peft's LoHa, LyCORIS's layout)
    lokr    LoKrConfig on the same layers (peft's LoKr)
    dora    `use_dora` of LoraConfig (types lora and locon: peft has no DoRA for LoHa or LoKr)
The text encoder (subject recipes) takes the same type on lora.text_encoder_targets (it has no convolutions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from customgen.config import CONV_TARGETS, RESNET_TARGETS
from customgen.formats.writing import TrainedLayer, network_args
from customgen.limits import LORA_TYPES

CONV_PATTERN = "|".join(re.escape(t) for t in CONV_TARGETS)  # peft's rank/alpha_pattern key for the 3×3 convolutions


@dataclass(frozen=True)
class AdapterType:
    """How peft trains one `lora.type` and whether stock diffusers loads its file (`load_lora_weights`); where it
    cannot, the artifact's main weights are the kohya/LyCORIS file, merged by customgen (kind `merged`)."""

    config: Callable[..., object]  # (settings, targets, alpha, rank_pattern, alpha_pattern) → a peft config
    diffusers: bool
    algo: str  # LyCORIS's algorithm name (its `algo` network arg; LoRA and LoCon are one algorithm there)


def _lora(c, targets, alpha, ranks, alphas):
    return LoraConfig(r=c.rank, lora_alpha=alpha, init_lora_weights=c.init, target_modules=targets,
                      rank_pattern=ranks, alpha_pattern=alphas, use_dora=c.dora)


def _loha(c, targets, alpha, ranks, alphas):
    return LoHaConfig(r=c.rank, alpha=alpha, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)


def _lokr(c, targets, alpha, ranks, alphas):
    return LoKrConfig(r=c.rank, alpha=alpha, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)


TYPES = {"lora": AdapterType(_lora, True, "locon"), "locon": AdapterType(_lora, True, "locon"),
         "loha": AdapterType(_loha, False, "loha"), "lokr": AdapterType(_lokr, False, "lokr")}


def alpha_of(c) -> float:
    """lora.alpha, or the rank (scale 1) when unset."""
    return c.alpha if c.alpha is not None else c.rank


def conv_settings(c) -> tuple[int, float]:
    """(rank, alpha) of the 3×3 convolutions: lora.conv_rank / conv_alpha, else lora.rank / alpha (LyCORIS's
    conv_dim / conv_alpha defaults)."""
    return (c.rank if c.conv_rank is None else c.conv_rank), (alpha_of(c) if c.conv_alpha is None else c.conv_alpha)


def kohya_network(c) -> tuple[str, dict[str, str]]:
    """kohya's ss_network_module and ss_network_args for settings `c` (customgen.formats.writing.network_args)."""
    rank, alpha = conv_settings(c) if LORA_TYPES[c.type][0] else (0, 0.0)
    return network_args(TYPES[c.type].algo, conv_rank=rank, conv_alpha=alpha, dora=c.dora)


def unet_config(c):
    """The peft config of the UNet adapter for settings `c` (cfg.lora)."""
    targets, ranks, alphas = list(c.targets), {}, {}
    if LORA_TYPES[c.type][0]:
        targets += RESNET_TARGETS
        rank, alpha = conv_settings(c)
        if rank:
            targets += CONV_TARGETS
            ranks, alphas = {CONV_PATTERN: rank}, {CONV_PATTERN: alpha}
    return TYPES[c.type].config(c, list(dict.fromkeys(targets)), alpha_of(c), ranks, alphas)


def text_encoder_config(c):
    """The peft config of the text-encoder adapter (subject recipes): the same type on its Linear layers."""
    return TYPES[c.type].config(c, list(c.text_encoder_targets), alpha_of(c), {}, {})


def add_adapter(model, config, adapter_name: str = "default", *, meta: bool = False) -> None:
    """Inject a trainable adapter with peft's own `inject_adapter_in_model`, what both diffusers' and
    transformers' `add_adapter` call. transformers' mixin first refuses any peft below its own floor (5.24 asks
    for peft 0.22 while PyPI's newest is 0.21.2), so a fresh install could not train a text-encoder LoRA.
    `meta`: the adapter's tensors on the meta device (counting shapes without memory)."""
    inject_adapter_in_model(config, model, adapter_name, **({"low_cpu_mem_usage": True} if meta else {}))
    model._hf_peft_config_loaded = True  # what add_adapter records: diffusers' and transformers' adapter calls read it


def trained_layers(model, component: str, adapter_name: str = "default") -> list[TrainedLayer]:
    """The adapted layers of a UNet or text encoder with peft's tensors (its state-dict names), rank and alpha;
    text-encoder paths with CLIPTextModel's `text_model.` level whatever transformers is installed."""
    tuners = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.r}
    parts: dict[str, dict] = {}
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        module = next(p for p in (key.rsplit(".", 1)[0], key.rsplit(".", 2)[0]) if p in tuners)
        parts.setdefault(module, {})[key[len(module) + 1:]] = value
    out = []
    for name, layer in tuners.items():
        alphas = getattr(layer, "lora_alpha", None) or layer.alpha  # LoraLayer's name, LycorisLayer's name
        path = f"text_model.{name}" if component == "text_encoder" and not name.startswith("text_model.") else name
        out.append(TrainedLayer(component, path, parts[name], int(layer.r[adapter_name]), float(alphas[adapter_name])))
    return out


def saved_parameters(comps, c, *, text_encoder: bool) -> tuple[int, int]:
    """(values, layers) an adapter of settings `c` holds on this model, counted on a meta-device copy (exact for every
    type: LoKr's factorisation is peft's own)."""
    values = layers = 0
    models = [(comps.unet, unet_config(c))] + ([(comps.text_encoder, text_encoder_config(c))] if text_encoder else [])
    for model, config in models:
        with torch.device("meta"):
            copy = type(model)(model.config) if not hasattr(model, "from_config") else type(model).from_config(
                model.config)
        add_adapter(copy, config, meta=True)
        trained = [p for p in copy.parameters() if p.requires_grad]
        values += sum(p.numel() for p in trained)
        layers += sum(isinstance(m, BaseTunerLayer) for m in copy.modules())
    return values, layers
