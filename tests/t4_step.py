"""The T4 recipe's step on the CPU, for every method and adapter type that tests it: frozen weights fp16, the
trained tensors fp32, fp16 autocast, GradScaler scale + unscale + step (what accelerate runs on a T4)."""
from __future__ import annotations

from pathlib import Path

import torch

from customgen.memory import MemoryPlan
from customgen.train import build_run, loop
from customgen.train.build import place_components


def fp16_scaled_step(cfg, folder: Path) -> None:
    """One such step of `cfg`'s run: the dtypes as a T4 keeps them, finite loss and gradients, the weights moved."""
    run = build_run(cfg, folder)
    run.weight_dtype = place_components(cfg, run.comps, run.accelerator, MemoryPlan("fp16", True, "adamw"), run.method)
    trained = run.method.trained_params(run.comps)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in run.comps.unet.parameters() if not p.requires_grad} == {torch.float16}
    before = {k: v.detach().clone() for k, v in trained.items()}
    optimizer, scaler = run.optimizer.optimizer, torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        losses = loop.step_losses(run, 0)
    assert torch.isfinite(losses["loss"])
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients." if a trainable were fp16
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trained.values())
    scaler.step(optimizer)
    scaler.update()
    run.method.after_step(run.comps)
    assert any(not torch.equal(before[k], v) for k, v in trained.items())
