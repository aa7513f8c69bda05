"""Ranges of the numeric config keys, and the LoRA settings that go together, checked whenever a config is loaded
and again before training starts (`--max-steps` changes train.steps after loading): one line naming the key and its
range, before any model loads.

A leaf like customgen.request (whose sampling limits it shares): customgen.config imports it.
"""
from __future__ import annotations

import math

from customgen.errors import UserError
from customgen.request import MAX_GUIDANCE, MAX_IMAGES, MAX_SCALE, MAX_SEED, MAX_SIDE, MAX_STEPS, SIZE_MULTIPLE

MILLION = 1_000_000
# Numeric keys and their (lowest, highest) values: outside them a value is a typo or stalls the machine (a
# 100,000-px resolution asks for terabytes, a billion steps never ends). Sampling keys share customgen.request's
# limits; lists are checked item by item.
LIMITS: dict[str, tuple] = {
    "data.max_images": (1, MILLION), "data.resolution": (SIZE_MULTIPLE, MAX_SIDE), "data.min_size": (0, MILLION),
    "data.max_pixels": (1, 2**40), "data.seed": (0, 2**32 - 1), "data.min_bucket": (0, MAX_SIDE),
    "data.max_bucket": (0, 2 * MAX_SIDE), "data.bucket_step": (0, MAX_SIDE), "data.caption_dropout": (0, 1),
    "data.keep_tokens": (0, 1000),
    "train.steps": (1, MILLION), "train.epochs": (0, 100_000), "train.batch_size": (1, 1024),
    "train.grad_accum": (1, 1024), "train.validate_every_epochs": (0, MILLION),
    "train.lr": (0, 1), "train.warmup_steps": (0, MILLION), "train.weight_decay": (0, 1),
    "train.max_grad_norm": (0, 1e6), "train.seed": (0, 2**32 - 1), "train.checkpoint_every": (0, MILLION),
    "train.checkpoint_minutes": (0, 1e6), "train.keep_checkpoints": (0, 10_000), "train.validate_every": (0, MILLION),
    "train.log_every": (0, MILLION), "train.snapshot_every": (0, MILLION), "train.keep_snapshots": (0, 10_000),
    "lora.rank": (1, 1024), "lora.alpha": (0, 1e6), "lora.text_encoder_lr": (0, 1), "lora.conv_rank": (0, 1024),
    "lora.conv_alpha": (0, 1e6),
    "pivotal.tokens": (0, 75), "pivotal.lr": (0, 1), "pivotal.frac": (0, 1),  # tokens: CLIP's 77 positions minus 2
    "loss.l2": (0, 1e6), "loss.lpips": (0, 1e6), "loss.gram": (0, 1e6), "loss.perceptual_every": (1, MILLION),
    "loss.perceptual_max_timestep": (0, 1000), "loss.decode_crop": (0, MAX_SIDE // 8),
    "loss.content_strength": (0, 1), "loss.snr_gamma": (0, 1e6), "loss.noise_offset": (0, 1),
    "loss.adaptive_noise_scale": (-1, 1),
    "prompt.prior_weight": (0, 1e6), "prompt.num_class_images": (0, MILLION), "prompt.class_steps": (1, MAX_STEPS),
    "textual_inversion.num_vectors": (1, 75),  # CLIP's 77 positions minus start and end
    "validation.strength": (0, 1), "validation.steps": (1, MAX_STEPS), "validation.guidance": (0, MAX_GUIDANCE),
    "validation.num_images": (1, MAX_IMAGES),
    "eval.max_contents": (1, MILLION), "eval.max_references": (1, MILLION), "eval.min_size": (0, MILLION),
    "eval.strength": (0, 1), "eval.style_scale": (0, MAX_SCALE), "eval.steps": (1, MAX_STEPS),
    "eval.guidance": (0, MAX_GUIDANCE), "eval.size": (SIZE_MULTIPLE, MAX_SIDE), "eval.seed": (0, MAX_SEED),
    "eval.kid_subset": (1, MILLION), "eval.cap_gib": (0.01, 4096), "eval.sweep_strengths": (0, 1),
    "eval.sweep_scales": (0, MAX_SCALE), "eval.structure_scale": (0, MAX_SCALE), "eval.style_image_scale": (0, MAX_SCALE),
    "eval.samples_per_prompt": (1, MAX_IMAGES), "eval.fidelity_margin": (0, 2),  # one batch; cosines span 2
}
# the lowest value itself is refused (0 learns nothing; pivotal.frac 0 would train the embeddings no step)
POSITIVE = ("train.lr", "lora.alpha", "lora.text_encoder_lr", "lora.conv_alpha", "pivotal.lr", "pivotal.frac")
MULTIPLES = {"data.resolution": SIZE_MULTIPLE, "eval.size": SIZE_MULTIPLE}  # the VAE downsamples by 8
# lora.type → (adapts the ResNet blocks' convolutions, has DoRA in peft): LyCORIS's algorithm names; config.py's
# LoraSettings.type lists the same names
LORA_TYPES: dict[str, tuple[bool, bool]] = {"lora": (False, True), "locon": (True, True), "loha": (True, False),
                                            "lokr": (True, False)}


def check_limits(cfg):
    """Every key of LIMITS within its range (one line naming the key and the range), the LoRA settings that go
    together; returns cfg."""
    for key, (lo, hi) in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                _within(key, v, lo, hi)
    if cfg.loss.adaptive_noise_scale and not cfg.loss.noise_offset:  # kohya's sd-scripts refuses it the same way
        raise UserError(f"config key loss.adaptive_noise_scale ({cfg.loss.adaptive_noise_scale}) needs "
                        "loss.noise_offset > 0: it is added to the offset")
    _lora_combination(cfg.lora, cfg.pivotal.tokens)
    return cfg


def _lora_combination(c, pivotal_tokens: int) -> None:
    """DoRA only where peft has it (lora, locon); conv settings only for the types that adapt convolutions; pivotal
    tuning's embeddings only beside a LoRA file (a LoHa or LoKr artifact is merged from one kohya/LyCORIS file)."""
    convs, dora = LORA_TYPES[c.type]
    if pivotal_tokens and not dora:
        raise UserError(f"pivotal tuning needs lora.type lora or locon: a {c.type} artifact is merged from its "
                        "kohya/LyCORIS file, which does not carry the new tokens; set pivotal.tokens=0 or "
                        "lora.type=locon")
    if c.dora and not dora:
        raise UserError(f"lora.dora needs lora.type lora or locon (peft has no DoRA for {c.type}): set lora.dora=false "
                        "or lora.type=locon")
    for key in ("conv_rank", "conv_alpha"):
        if getattr(c, key) is not None and not convs:
            raise UserError(f"lora.{key} applies to lora.type locon, loha or lokr (lora.type {c.type} adapts no "
                            "convolutions): set lora.type=locon or leave it unset")


def _within(key: str, value, lo, hi) -> None:
    strict = key in POSITIVE
    finite = isinstance(value, int) or math.isfinite(value)
    if not finite or value < lo or value > hi or (strict and value <= lo):
        raise UserError(f"config key {key} must be {'>' if strict else '>='} {lo} and <= {hi}, got {value}")
    step = MULTIPLES.get(key)
    if step and value % step:
        raise UserError(f"config key {key} must be a multiple of {step}, got {value}")
