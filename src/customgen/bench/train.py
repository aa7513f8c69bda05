"""Training pairs: one customgen optimizer step per recipe against the inner step of diffusers' example scripts.

The peer is written from train_text_to_image_lora.py, train_dreambooth.py, textual_inversion.py and
train_dreambooth_lora.py (read, not copied): every step it VAE-encodes the pixels and runs the text encoder,
noises, predicts with the UNet, takes the MSE (instance + weighted prior half under prior preservation),
backpropagates through accelerate, clips, steps AdamW and the LR scheduler and zeroes the gradients; textual
inversion then restores the other embedding rows. It trains what the recipe trains (the same LoRA targets and
ranks, TI rows, DreamBooth scope — diffusers' DreamBooth script would train the whole UNet) with the recipe's
optimizer settings, batch, mixed precision and gradient checkpointing. Its data loader is left out: the peer gets
ready pixel tensors and token ids, so data loading counts only on customgen's side (its cached latents).
"""
from __future__ import annotations

import gc
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from customgen.bench.fixtures import data_overrides, quiet, recipe_config
from customgen.bench.timing import Side, alternate
from customgen.kinds import RECIPES, make_method
from customgen.models import load_components
from customgen.models.loading import place
from customgen.train.build import Run, build_run
from customgen.train.loop import optimizer_step


def bench_config(recipe: str, model: str, data: dict, *, resolution: int, extra: list[str] = ()):
    """The recipe's config on the synthetic data: L2 only (the perceptual job times those terms), two class
    images for prior preservation, no checkpoints or validation, square crops (the diffusers peer crops square)."""
    layout = recipe_config(recipe, model).data.layout
    return recipe_config(recipe, model, [
        *data_overrides(layout, data), f"data.resolution={resolution}", "data.min_size=32", "data.buckets=false",
        "loss.lpips=0",
        "loss.gram=0", "prompt.num_class_images=2", "prompt.class_steps=2", "train.checkpoint_every=0",
        "train.validate_every=0", "train.checkpoint_minutes=0", *extra])


class PeerStep:
    """diffusers' example-script inner step on its own copy of the model, training what `run`'s recipe trains."""

    def __init__(self, run: Run):
        cfg, acc = run.cfg, run.accelerator
        self.cfg, self.acc, self.dtype = cfg, acc, run.weight_dtype
        self.comps = c = load_components(cfg.model.ref, device="cpu", dtype=torch.float32)
        self.method = make_method(cfg)
        with quiet():
            groups = self.method.setup(c)  # freeze all, then the recipe's LoRA layers / token rows / scope
        for m in (c.unet, c.vae):
            place(m, acc.device, self.dtype)
        place(c.text_encoder, acc.device, self.method.text_encoder_dtype(self.dtype))
        cast_training_params([c.unet, c.text_encoder], dtype=torch.float32)
        if run.plan.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.train.weight_decay)
        scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer=optimizer, num_warmup_steps=0,
                                  num_training_steps=cfg.train.steps)
        trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
        self.unet = acc.prepare(c.unet) if trains(c.unet) else c.unet
        self.text_encoder = acc.prepare(c.text_encoder) if trains(c.text_encoder) else c.text_encoder
        self.optimizer, self.lr_scheduler = acc.prepare(optimizer, scheduler)
        self.pixels, self.input_ids, self.prior = self._batch(run)

    def _batch(self, run: Run):
        """The first batch of customgen's own data (instance images, then class images), as the scripts'
        collate_fn hands it over: pixels in [-1, 1] and token ids."""
        n = self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(0)
        pixels = [run.images.dataset[i % len(run.images)]["pixel_values"] for i in range(n)]
        captions = [self.method.caption(run.images.dataset.caption_of(run.images.dataset.order[i % len(run.images)]),
                                        gen) for i in range(n)]
        if run.classes is not None:
            pixels += [run.classes.dataset[i % len(run.classes)]["pixel_values"] for i in range(n)]
            captions += [self.cfg.prompt.class_prompt] * n
        tok = self.comps.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return torch.stack(pixels).to(self.acc.device), ids.to(self.acc.device), run.classes is not None

    def step(self) -> float:
        c, cfg = self.comps, self.cfg
        sched = c.noise_scheduler
        with self.acc.accumulate(self.unet, self.text_encoder):
            latents = c.vae.encode(self.pixels.to(self.dtype)).latent_dist.sample() * c.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
            noisy = sched.add_noise(latents, noise, t)
            cond = self.text_encoder(self.input_ids)[0].to(self.dtype)
            with self.acc.autocast():
                pred = self.unet(noisy, t, cond).sample
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
            if self.prior:
                pred, pred_prior = pred.chunk(2)
                target, target_prior = target.chunk(2)
                prior = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean") + cfg.prompt.prior_weight * prior
            else:
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            self.acc.backward(loss)
            if self.acc.sync_gradients and cfg.train.max_grad_norm > 0:
                self.acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        self.method.after_step(c)  # textual_inversion.py restores every row but the new token's here
        return float(loss.detach())


def train_pair(recipe: str, model: str, data: dict, work: Path, *, resolution: int, repeats: int,
               flops: bool) -> dict:
    """customgen's optimizer_step against the peer step for one recipe (alternating, after one warm-up each)."""
    cfg = bench_config(recipe, model, data, resolution=resolution)
    with quiet():
        run = build_run(cfg, work / recipe)
    steps = itertools.count()
    ours = Side("customgen", lambda: optimizer_step(run, next(steps))["loss"])
    peer = PeerStep(run)
    stock = Side("diffusers example step", peer.step)
    result = alternate(ours, stock, repeats=repeats, flops=flops)
    row = {"recipe": recipe, "kind": RECIPES[recipe].kind, "resolution": resolution,
           "batch_size": cfg.train.batch_size, "prior": run.classes is not None, "plan": vars(run.plan), **result}
    del run, peer, ours, stock
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row
