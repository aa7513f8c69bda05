"""`customgen bench --jobs memory`: each recipe's predicted peak GPU memory against the peak its run reaches.

On a GPU: the recipe at the bench size under the cap (`--cap-gib 15`: a T4 on a bigger card), with the settings
memory auto picks for the cap (customgen.train.fit), trains for real through `customgen.train.train` — latent
caching, class images, optimizer steps up to the first perceptual step that has optimizer state, the final
validation images — and the job records `torch.cuda.max_memory_allocated` and `max_memory_reserved` over the run
against the prediction's tensor peak and its total with fixed costs (customgen.budget), and their ratios.

Without CUDA the measurement is the same byte counter on a real CPU run of the estimated step
(`estimate_training(fake=False)`, fp32, text encoder and VAE kept on the device); the CUDA fields are None: that
checks the counting, not a card.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from customgen.bench.fixtures import data_overrides, quiet, recipe_config
from customgen.budget import Gpu, total_bytes
from customgen.config import Config
from customgen.errors import UserError
from customgen.inference import clear_sessions
from customgen.memory import MemoryPlan, bnb_works
from customgen.train import train
from customgen.train.estimate import Estimate, estimate_training
from customgen.train.fit import fit


def memory_config(recipe: str, model: str, data: dict, *, resolution: int) -> Config:
    """The recipe on the synthetic data at `resolution`: two class images, steps up to the first perceptual step
    with optimizer state, no checkpoints, the final validation only; perceptual terms on every sample (the
    prediction's worst case); square crops (the plan predicts a bucketed run at its largest bucket, the square one
    where buckets tie in pixels: customgen.data.buckets.BucketSpec.largest)."""
    layout = recipe_config(recipe, model).data.layout
    cfg = recipe_config(recipe, model, [
        *data_overrides(layout, data), f"data.resolution={resolution}", "data.min_size=32", "data.buckets=false",
        "prompt.num_class_images=2", "prompt.class_steps=2", "validation.steps=2", "train.checkpoint_every=0",
        "train.checkpoint_minutes=0", "train.validate_every=0", "loss.perceptual_max_timestep=1000"])
    perceptual = cfg.loss.lpips > 0 or cfg.loss.gram > 0
    cfg.train.steps = cfg.loss.perceptual_every + 1 if perceptual else 2
    return cfg


def _predicted(est: Estimate) -> dict:
    return {"tensor_peak": est.peak, "total": total_bytes(est.peak), "step_peak": est.step_peak,
            "validation_peak": est.validation_peak, "setup_peak": est.setup_peak, "assembly_peak": est.assembly_peak}


def memory_job(recipe: str, model: str, data: dict, work: Path, *, resolution: int, cap_gib: float, info) -> dict:
    """One recipe's row: settings, predicted bytes, measured bytes (CUDA, or the CPU counter), ratios."""
    cfg = memory_config(recipe, model, data, resolution=resolution)
    if info.device.startswith("cuda"):
        return _on_gpu(cfg, work / recipe, cap_gib=cap_gib, info=info)
    plan = MemoryPlan("no", False, "adamw", offload=False)
    fake = estimate_training(cfg, plan)
    real = estimate_training(cfg, plan, fake=False)
    return {"recipe": recipe, "resolution": resolution, "settings": fake.settings, "predicted": _predicted(fake),
            "measured_by": "cpu counter (no CUDA: the same byte counter on a real CPU run of the step)",
            "measured": {"cuda_max_allocated": None, "cuda_max_reserved": None, "cpu_counter": real.peak},
            "ratio_allocated": real.peak / fake.peak, "ratio_reserved": None, "status": "ok"}


def _on_gpu(cfg: Config, out: Path, *, cap_gib: float, info) -> dict:
    """Plan for the cap, train for real, read the CUDA peaks."""
    cap = int((cap_gib or info.total_gib) * 2**30)
    fitted = fit(cfg, Gpu(f"{info.name} capped at {cap / 2**30:.1f} GiB", cap, info.bf16, "--cap-gib",
                          bnb=bnb_works(info.device)))
    row = {"recipe": cfg.method, "resolution": cfg.data.resolution, "settings": fitted.estimate.settings,
           "predicted": _predicted(fitted.estimate), "fits_cap": fitted.fits,
           "measured_by": f"torch.cuda on {info.name}"}
    clear_sessions()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with quiet():
            train(cfg, output=out, plan=fitted.plan, progress=False, overwrite=True)
        status = "ok"
    except torch.cuda.OutOfMemoryError as err:  # outside the loop (the loop's own become one UserError line)
        status = f"oom: {str(err).splitlines()[0]}"
    except UserError as err:
        if "out of memory" not in str(err):
            raise
        status = f"oom: {err}"
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    gc.collect()
    torch.cuda.empty_cache()
    return row | {"measured": {"cuda_max_allocated": allocated, "cuda_max_reserved": reserved, "cpu_counter": None},
                  "ratio_allocated": allocated / row["predicted"]["tensor_peak"],
                  "ratio_reserved": reserved / row["predicted"]["total"], "status": status}
