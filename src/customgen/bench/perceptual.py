"""Where a perceptual training step goes: the LPIPS + Gram step of `lora_style` against its L2-only step
(alternating), then the pieces of `Perceptual.terms` timed on their own — VAE decoder forward and backward on
the decoded crop, VGG (Gram) and LPIPS forward and backward.
"""
from __future__ import annotations

import gc
import itertools
import statistics
import time
from pathlib import Path

import torch

from customgen.bench.fixtures import quiet, recipe_config
from customgen.bench.timing import Side, alternate
from customgen.bench.train import bench_config
from customgen.errors import UserError
from customgen.kinds import RECIPES
from customgen.memory import sync
from customgen.train.build import build_run
from customgen.train.loop import optimizer_step
from customgen.train.losses import gram_loss, lpips_loss

PERCEPTUAL = ["loss.lpips=0.1", "loss.gram=0.1", "loss.perceptual_every=1", "loss.perceptual_max_timestep=1000"]


def _timed(fn) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def pieces(run, *, repeats: int, crop: int | None = None) -> dict:
    """Median milliseconds of each piece of the perceptual terms, on the latent crop the recipe decodes (or
    `crop`)."""
    p, vae, cfg = run.perceptual, run.comps.vae, run.cfg
    size = cfg.data.resolution // 8
    crop = crop or min(cfg.loss.decode_crop or size, size)
    b, device = cfg.train.batch_size, run.accelerator.device
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 4, crop, crop, generator=gen).to(device).requires_grad_(True)
    pixels = (torch.rand(b, 3, 8 * crop, 8 * crop, generator=gen) * 2 - 1).to(device)
    times: dict[str, list[float]] = {}

    def lap(name, fn):
        seconds, out = _timed(fn)
        times.setdefault(name, []).append(seconds)
        return out

    for _ in range(repeats + 1):  # the first round warms up and is dropped below
        image = lap("decoder forward", lambda: vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float())
        leaf = image.detach().requires_grad_(True)
        if p.vgg is not None:
            g = lap("VGG forward + Gram", lambda: gram_loss(p.vgg(leaf), p.grams).sum())
            lap("VGG backward", lambda: torch.autograd.grad(g, leaf))
        if p.lpips is not None:
            d = lap("LPIPS forward", lambda: lpips_loss(p.lpips, leaf, pixels).sum())
            lap("LPIPS backward", lambda: torch.autograd.grad(d, leaf))
        lap("decoder backward", lambda: torch.autograd.grad(image, x0, torch.ones_like(image)))
    return {"crop_latent": crop, "crop_pixels": 8 * crop, "batch": b,
            "ms": {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}}


def perceptual_recipe(model: str) -> str:
    """The first recipe whose own config turns the perceptual terms on (the style LoRA)."""
    for name in RECIPES:
        loss = recipe_config(name, model).loss
        if loss.lpips > 0 or loss.gram > 0:
            return name
    raise UserError("no recipe in configs/ uses the perceptual loss terms")


def perceptual_job(model: str, data: dict, work: Path, *, resolution: int, repeats: int, flops: bool) -> dict:
    """The perceptual step against the L2 step of `lora_style`-like runs, then its pieces."""
    recipe = perceptual_recipe(model)
    l2_cfg = bench_config(recipe, model, data, resolution=resolution)
    full_cfg = bench_config(recipe, model, data, resolution=resolution, extra=PERCEPTUAL)
    with quiet():
        l2_run, full_run = build_run(l2_cfg, work / "l2"), build_run(full_cfg, work / "perceptual")
    count = itertools.count()
    full = Side("L2 + LPIPS + Gram step", lambda: optimizer_step(full_run, next(count))["loss"])
    plain = Side("L2 step", lambda: optimizer_step(l2_run, next(count))["loss"])
    result = alternate(full, plain, repeats=repeats, flops=flops)
    first = pieces(full_run, repeats=repeats)
    out = {"recipe": recipe, "resolution": resolution, "decode_crop": full_cfg.loss.decode_crop, **result,
           "pieces": first,  # and at half the crop side: the decoder's share scales with the decoded pixels
           "pieces_half_crop": pieces(full_run, repeats=repeats, crop=max(1, first["crop_latent"] // 2))}
    del l2_run, full_run
    gc.collect()
    return out
