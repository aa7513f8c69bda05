"""Build the reserved model references offline from configs shipped in the package.

`tiny` is SD v1.5-shaped (cross-attention UNet blocks with to_q/to_k/to_v/to_out.0, a VAE with a
scaling factor, a CLIP text encoder and tokenizer) but small enough for CPU tests; `sd15-random`
is the real SD v1.5 architecture with random weights, for speed and memory measurements only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from customgen.memory import seeded
from customgen.models.tokenizer import sd15_tokenizer, tiny_tokenizer

CONFIGS = Path(__file__).parent / "configs"
RESERVED = {"tiny": CONFIGS / "tiny", "sd15-random": CONFIGS / "sd15"}
SEED = 0  # the reserved models are seeded: the same reference always gives the same weights


@dataclass
class Components:
    """The parts of an SD v1.5 model, as the training loop and the pipelines use them."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM, for training
    scheduler: Any  # the inference scheduler the model was published with
    ref: str = ""
    kind: str = ""  # tiny | sd15-random | hub | local | single-file
    extra: dict = field(default_factory=dict)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def build_reserved(name: str, *, meta: bool = False) -> Components:
    """Build `tiny` or `sd15-random` from the shipped configs (seeded; on the meta device if `meta`)."""
    root = RESERVED[name]
    unet_cfg, vae_cfg = _json(root / "unet" / "config.json"), _json(root / "vae" / "config.json")
    te_cfg = CLIPTextConfig(**_json(root / "text_encoder" / "config.json"))
    te_cfg._attn_implementation = "sdpa"
    device = torch.device("meta") if meta else torch.device("cpu")
    with seeded(SEED), device:  # building a model must not move the caller's RNG
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(te_cfg)
    for m in (unet, vae, text_encoder):
        m.eval()
    tokenizer = tiny_tokenizer(root / "tokenizer") if name == "tiny" else sd15_tokenizer()
    sched_cfg = _json(root / "scheduler" / "scheduler_config.json")
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(sched_cfg),
        scheduler=DPMSolverMultistepScheduler.from_config(sched_cfg),
        ref=name, kind=name,
    )
