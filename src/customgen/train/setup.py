"""Everything the loop needs, built once: accelerator, components, method, data, optimizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from customgen.errors import UserError


@dataclass
class Run:
    """The state of one training run (the loop reads and steps it)."""

    cfg: object
    out: Path
    accelerator: object
    comps: object
    method: object
    plan: object
    images: object  # ImageSet of instance/style images
    classes: object | None  # ImageSet of prior-preservation class images
    contents: object | None  # ImageSet of content images for perceptual content pairs
    unet: object  # prepared (maybe DDP-wrapped) UNet
    text_encoder: object  # prepared text encoder
    optimizer: object
    lr_scheduler: object
    perceptual: object | None
    weight_dtype: torch.dtype = torch.float32
    prompt_cache: dict = field(default_factory=dict)

    @property
    def needs_pixels(self) -> bool:
        return self.perceptual is not None and self.perceptual.lpips is not None


def make_accelerator(cfg, out: Path, method, plan):
    """accelerate: mixed precision, accumulation, TensorBoard; unused-parameter DDP only when the text encoder trains."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if method.trains_text_encoder else []
    return Accelerator(mixed_precision=plan.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with="tensorboard", kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def place_components(run_cfg, comps, accelerator, plan, method) -> torch.dtype:
    """Frozen weights in the mixed-precision dtype, trainables in fp32 (no 'unscale FP16 gradients')."""
    from diffusers.training_utils import cast_training_params

    from customgen.models.loading import place

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.mixed_precision, torch.float32)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        place(m, accelerator.device, weight_dtype)
    if run_cfg.loss.lpips > 0 or run_cfg.loss.gram > 0:
        place(comps.vae, accelerator.device, torch.float32)  # gradients flow through the decoder: keep it fp32
    cast_training_params([comps.unet, comps.text_encoder], dtype=torch.float32)
    if plan.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            comps.text_encoder.gradient_checkpointing_enable()
    return weight_dtype


def make_lr_scheduler(cfg, optimizer, num_processes: int):
    """diffusers' get_scheduler; accelerate steps it once per process, hence the scaling."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.train.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=cfg.train.warmup_steps * num_processes,
                             num_training_steps=cfg.train.steps * num_processes)
    except ValueError as err:
        raise UserError(f"train.lr_scheduler: {err}") from err


def content_set(cfg, vae):
    """Content images for perceptual content pairs (loss.content_root), or None."""
    from customgen.data import scan_images
    from customgen.train.data import image_set

    if not cfg.loss.content_root:
        return None
    scan = scan_images(cfg.loss.content_root, min_size=cfg.data.min_size)
    if not scan.records:
        raise UserError(f"no usable content images under loss.content_root={cfg.loss.content_root}")
    return image_set(sorted(scan.records, key=lambda r: r.path)[: cfg.data.max_images], cfg, vae)


def style_pixels(images, limit: int = 64) -> torch.Tensor:
    """Pixels (N, 3, R, R) of up to `limit` style images, for the Gram targets."""
    n = min(limit, len(images.dataset.records))
    return torch.stack([images.dataset[images.dataset.order.index(i)]["pixel_values"] for i in range(n)])
