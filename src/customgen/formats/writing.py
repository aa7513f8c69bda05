"""Writing what customgen trained in the layout other tools read: kohya/LyCORIS files from peft's adapter tensors.

    state = kohya_state(layers)                     # {"lora_unet_<module>.<part>": tensor, ...}
    meta = kohya_metadata(facts, rank=4, alpha=4.0, text_encoder=False, network=network_args("loha", ...))

One entry per layer, `lora_unet_<module path with _>` / `lora_te_<text_model path with _>` (names.kohya_name: the SD1
names kohya's sd-scripts, LyCORIS, the WebUI and ComfyUI read), with peft's tensors under LyCORIS's part names:

    LoRA, LoCon  lora_A.weight → lora_down.weight (r, in[, k, k]); lora_B.weight → lora_up.weight (out, r[, 1, 1])
    DoRA         lora_magnitude_vector → dora_scale, (out, 1) for a Linear and (out, 1, 1, 1) for a Conv2d: LyCORIS's
                 output axis, as peft's `use_dora` trains it. A 1-D dora_scale (what diffusers' kohya converter
                 writes) breaks ComfyUI on non-square layers.
    LoHa, LoKr   hada_w1_a … hada_t2, lokr_w1 … lokr_t2: peft's names and shapes are LyCORIS's (Tucker included)
    alpha        the layer's α: the tools scale by α/r, r = rows of lora_down / hada_w1_b, as peft does
    LoKr         peft scales every layer by α/r; ComfyUI and LyCORIS only where a factor is decomposed (1 where both
                 are full). The scale is folded into lokr_w1 (or lokr_w1_a) and alpha written as r, so every tool
                 merges the weight peft trained: s·(w1 ⊗ w2) with scale 1.
Written here because diffusers' converter names the SD1 text encoder `lora_te1_` (SDXL's), which kohya, A1111 and
ComfyUI ignore for SD1, writes a 1-D dora_scale, and has no LoHa or LoKr.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from customgen.formats.deltas import PARTS, algorithm
from customgen.formats.names import kohya_name

PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora_magnitude_vector": "dora_scale"}  # peft's LoRA/DoRA names → LyCORIS's; LoHa/LoKr names are equal
# kohya's ss_* names of the run's schedule facts (customgen.kinds.training_facts), written when the facts hold them
KOHYA_SCHEDULE = {"ss_gradient_accumulation_steps": "grad_accum", "ss_total_batch_size": "effective_batch",
                  "ss_num_epochs": "epochs", "ss_lr_warmup_steps": "warmup_steps", "ss_max_grad_norm": "max_grad_norm",
                  "ss_flip_aug": "random_flip", "ss_prior_loss_weight": "prior_weight",
                  # buckets, captions and noise (kohya's train_network.py writes these names)
                  "ss_enable_bucket": "buckets", "ss_min_bucket_reso": "min_bucket", "ss_max_bucket_reso": "max_bucket",
                  "ss_bucket_no_upscale": "bucket_no_upscale", "ss_bucket_info": "bucket_info",
                  "ss_caption_dropout_rate": "caption_dropout", "ss_shuffle_caption": "shuffle_caption",
                  "ss_keep_tokens": "keep_tokens", "ss_noise_offset": "noise_offset",
                  "ss_adaptive_noise_scale": "adaptive_noise_scale"}


@dataclass
class TrainedLayer:
    """One adapted layer as peft holds it: its component, canonical module path, tensors by peft's part names
    (`lora_A.weight`, `hada_w1_a`, `lokr_w1`, ...), rank and alpha (peft's scale is alpha/rank)."""

    component: str  # unet | text_encoder
    path: str
    parts: dict[str, torch.Tensor]
    rank: int
    alpha: float


def kohya_parts(layer: TrainedLayer) -> dict[str, torch.Tensor]:
    """The layer's tensors under LyCORIS's part names, alpha included (see the module docstring)."""
    parts = {PEFT_PARTS.get(k, k): v.detach().cpu().contiguous() for k, v in layer.parts.items()}
    algo = algorithm(set(parts))
    unknown = set(parts) - set(PARTS.get(algo, ())) - {"dora_scale"}
    if unknown:
        raise ValueError(f"{layer.component}.{layer.path}: peft parts {sorted(unknown)} have no kohya/LyCORIS name")
    alpha = float(layer.alpha)
    if "dora_scale" in parts:  # peft: (out,) for Linear, (1, out, 1, 1) for Conv2d → LyCORIS's (out, 1[, 1, 1])
        ndim = parts["lora_down.weight"].dim()
        parts["dora_scale"] = parts["dora_scale"].reshape(-1, *[1] * (ndim - 1))
    if algo == "lokr":
        first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
        parts[first] = (parts[first].double() * (alpha / layer.rank)).to(parts[first].dtype)  # one rounding
        alpha = float(layer.rank)  # scale 1 wherever a tool divides α by a decomposed factor's rank
    return parts | {"alpha": torch.tensor(alpha)}


def kohya_state(layers: list[TrainedLayer]) -> dict[str, torch.Tensor]:
    """Every layer's tensors under `<kohya name>.<part>`."""
    return {f"{kohya_name(layer.component, layer.path)}.{part}": value
            for layer in layers for part, value in kohya_parts(layer).items()}


def network_args(algo: str, *, conv_rank: int, conv_alpha: float, dora: bool) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args) as kohya's sd-scripts record them for LyCORIS algorithm `algo` (locon
    for LoRA and LoCon, loha, lokr): its own networks.lora for LoRA and LoCon (`conv_dim`/`conv_alpha` args where
    convolutions train, `conv_rank` > 0), LyCORIS's `lycoris.kohya` with its `algo` for LoHa, LoKr and DoRA."""
    conv = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if conv_rank else {}
    if algo == "locon" and not dora:
        return "networks.lora", conv
    return "lycoris.kohya", {"algo": algo} | conv | ({"dora_wd": "True", "wd_on_output": "True"} if dora else {})


def kohya_metadata(facts: dict, *, rank: int, alpha: float, text_encoder: bool,
                   network: tuple[str, dict[str, str]] = ("networks.lora", {})) -> dict[str, str]:
    """The `ss_*` training metadata kohya's sd-scripts write (what WebUI extensions show), plus the SAI model
    spec keys; every value is a string (safetensors metadata)."""
    module, args = network
    meta = {
        "ss_output_name": facts["name"], "ss_sd_model_name": facts["base_model"], "ss_base_model_version": "sd_v1",
        "ss_v2": "False", "ss_network_module": module, "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha), "ss_network_train_unet_only": str(not text_encoder),
        "ss_resolution": f"({facts['resolution']}, {facts['resolution']})",
        "ss_steps": str(facts.get("step", facts["steps"])),  # trained so far (a snapshot's step), of ss_max_train_steps
        "ss_max_train_steps": str(facts["steps"]), "ss_learning_rate": str(facts["lr"]),
        "ss_unet_lr": str(facts["lr"]), "ss_text_encoder_lr": str(facts["text_encoder_lr"] if text_encoder else 0),
        "ss_batch_size_per_device": str(facts["batch_size"]), "ss_num_train_images": str(facts["num_images"]),
        "ss_seed": str(facts["seed"]), "ss_mixed_precision": facts["mixed_precision"],
        "ss_optimizer": facts["optimizer"], "ss_lr_scheduler": facts["lr_scheduler"],
        "ss_training_started_at": str(facts["started_at"]), "ss_training_finished_at": str(facts["finished_at"]),
        "ss_tag_frequency": json.dumps(facts["tag_frequency"]), "ss_training_comment": f"customgen {facts['method']}",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": facts["name"],
        "modelspec.resolution": f"{facts['resolution']}x{facts['resolution']}",
    }
    meta |= {"ss_network_args": json.dumps(args)} if args else {}
    text = lambda v: json.dumps(v) if isinstance(v, (dict, list)) else str(v)  # noqa: E731 - safetensors wants str
    return meta | {key: text(facts[fact]) for key, fact in KOHYA_SCHEDULE.items() if facts.get(fact) is not None}
