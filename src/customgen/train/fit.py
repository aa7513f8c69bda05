"""Fit before you run: `train.memory: auto` and `customgen plan` choose, from the predicted peak
(customgen.train.estimate + customgen.budget's fixed costs), the cheapest settings that fit a card.

The ladder, cheapest first, each rung kept once taken: the settings as given (latents and fixed prompts are always
cached unless train.cache_latents is false), gradient checkpointing, 8-bit Adam (where bitsandbytes works), the
text encoder and VAE off the GPU after caching, then a smaller micro-batch with gradient accumulation (the same
images per optimizer step). A key the user set (train.gradient_checkpointing, train.optimizer, train.grad_accum)
is never changed: its rung is skipped with a notice. Where nothing fits, the refusal comes before any weight
loads and names the smallest predicted peak and what to change.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from customgen.budget import GIB, Gpu, device_gpu, total_bytes
from customgen.config import Config
from customgen.errors import Notice, UserError
from customgen.kinds import make_method
from customgen.memory import DeviceInfo, MemoryPlan, bnb_works, optimizer_used, plan_memory, precision
from customgen.train.estimate import Estimate, estimate_training


@dataclass
class Fitted:
    """A plan for a card: its estimate, the total with fixed costs, whether it fits, how it was reached."""

    plan: MemoryPlan
    estimate: Estimate
    gpu: Gpu
    total: int
    fits: bool
    mode: str  # auto | manual
    tried: list[dict] = field(default_factory=list)  # every candidate estimated: its rung and total
    notes: list[str] = field(default_factory=list)  # user-set keys the ladder left alone


def ladder(cfg: Config, mp: str, gpu: Gpu) -> Iterator[tuple[str, MemoryPlan]]:
    """(rung, plan) from the cheapest settings to the smallest footprint; a user-set key stays as set and its rung
    comes out as "skip:KEY=VALUE"."""
    t = cfg.train
    asked = "adamw" if t.optimizer == "auto" else t.optimizer  # auto starts from AdamW: 8-bit Adam is a rung
    plan = MemoryPlan(mp, bool(t.gradient_checkpointing), optimizer_used(asked, bnb=gpu.bnb), offload=False,
                      batch_size=t.batch_size, grad_accum=t.grad_accum or 1, how="memory auto")
    if t.optimizer == "adamw8bit" and not gpu.bnb:
        yield "skip:train.optimizer=adamw8bit (bitsandbytes does not work here: AdamW instead)", plan
    yield "as set", plan
    if t.gradient_checkpointing is None:
        plan = replace(plan, gradient_checkpointing=True)
        yield "gradient checkpointing", plan
    elif not t.gradient_checkpointing:
        yield "skip:train.gradient_checkpointing=false", plan
    if t.optimizer == "auto" and gpu.bnb:
        plan = replace(plan, optimizer="adamw8bit")
        yield "8-bit Adam", plan
    elif t.optimizer in ("adamw", "prodigy"):
        yield f"skip:train.optimizer={t.optimizer}", plan
    plan = replace(plan, offload=True)
    yield "text encoder/VAE off the GPU", plan
    if t.grad_accum is not None:
        yield f"skip:train.grad_accum={t.grad_accum}", plan
        return
    for micro in sorted((d for d in range(1, t.batch_size) if t.batch_size % d == 0), reverse=True):
        yield f"batch {micro} x {t.batch_size // micro}", replace(plan, batch_size=micro, grad_accum=t.batch_size // micro)


def fit(cfg: Config, gpu: Gpu, *, estimate: Callable[..., Estimate] = estimate_training) -> Fitted:
    """The first plan of the ladder whose predicted total fits `gpu` (else the smallest one, `fits` False)."""
    mp = "bf16" if gpu.bf16 and cfg.train.mixed_precision == "auto" else precision(cfg.train, _info(gpu))
    best, tried, notes = None, [], []
    for rung, plan in ladder(cfg, mp, gpu):
        if rung.startswith("skip:"):
            notes.append(f"{rung[5:]} is set: memory auto leaves it (it would lower the peak)"
                         if "(" not in rung else rung[5:])
            continue
        est = estimate(cfg, plan)
        total = total_bytes(est.peak)
        tried.append({"rung": rung, "total_bytes": total, "settings": est.settings})
        candidate = Fitted(replace(plan, predicted_bytes=total), est, gpu, total, total <= gpu.total_bytes, "auto",
                           tried, notes)
        if candidate.fits:
            return candidate
        best = candidate if best is None or total < best.total else best
    return best


def fit_as_set(cfg: Config, gpu: Gpu, *, estimate: Callable[..., Estimate] = estimate_training) -> Fitted:
    """`train.memory: manual`: the settings exactly as set, predicted on `gpu`."""
    mp = "bf16" if gpu.bf16 and cfg.train.mixed_precision == "auto" else precision(cfg.train, _info(gpu))
    plan = MemoryPlan(mp, bool(cfg.train.gradient_checkpointing), optimizer_used(cfg.train.optimizer, bnb=gpu.bnb))
    est = estimate(cfg, plan)
    total = total_bytes(est.peak)
    return Fitted(replace(plan, predicted_bytes=total), est, gpu, total, total <= gpu.total_bytes, "manual",
                  [{"rung": "as set", "total_bytes": total, "settings": est.settings}])


def plan_for(cfg: Config, gpu: Gpu) -> Fitted:
    """What `customgen plan` shows: auto's choice for `gpu`, or the settings as set under train.memory=manual."""
    return fit(cfg, gpu) if cfg.train.memory == "auto" else fit_as_set(cfg, gpu)


def fit_memory(cfg: Config, info: DeviceInfo) -> MemoryPlan:
    """The plan a training run uses: memory auto on a GPU (refusing, before any weight loads, when nothing fits),
    else the settings as given."""
    if cfg.train.memory == "manual":
        return plan_memory(cfg.train, info)
    if info.device == "cpu":
        return replace(plan_memory(cfg.train, info), how="memory auto (no GPU here: settings as given)")
    gpu = device_gpu(info.name, info.total_bytes, bf16=info.bf16, bnb=bnb_works(info.device))
    fitted = fit(cfg, gpu)
    for note in fitted.notes:
        warnings.warn(note, Notice, stacklevel=2)
    if not fitted.fits:
        raise UserError(refusal(cfg, fitted))
    return fitted.plan


def refusal(cfg: Config, fitted: Fitted) -> str:
    """One line: nothing fits, the smallest predicted peak and its settings, what to change."""
    return (f"nothing fits {fitted.gpu.name} ({fitted.gpu.total_gib:.2f} GiB): the smallest predicted peak is "
            f"{fitted.total / GIB:.2f} GiB ({describe(fitted.estimate.settings)}); change {', '.join(savers(cfg))}")


def savers(cfg: Config) -> list[str]:
    """Changes that shrink a run, the method's own first, then the generic ones that apply."""
    out = make_method(cfg).memory_savers()
    if cfg.train.gradient_checkpointing is False:
        out.append("train.gradient_checkpointing=true")
    if cfg.prompt.prior:
        out.append("prompt.prior=false")
    if cfg.train.batch_size > 1:
        out.append("train.batch_size=1")
    if cfg.data.resolution > 384:
        out.append("data.resolution=384")
    return out or ["--model to a smaller model"]


def describe(settings: dict) -> str:
    """A plan's settings in words."""
    w, h = settings.get("image") or (settings["resolution"],) * 2
    size = f"{settings['resolution']} px" if w == h == settings["resolution"] else f"{w}×{h} px bucket"
    parts = [size, f"batch {settings['batch_size']} x {settings['grad_accum']}",
             settings["mixed_precision"], "checkpointing" if settings["gradient_checkpointing"] else "no checkpointing",
             settings["optimizer"]]
    if settings.get("prior"):
        parts.append("prior preservation")
    if settings.get("offload"):
        parts.append("text encoder/VAE off the GPU")
    return ", ".join(parts)


def _info(gpu: Gpu) -> DeviceInfo:
    return DeviceInfo("cuda:0", gpu.name, gpu.total_bytes, (8, 0) if gpu.bf16 else (7, 5),
                      torch.bfloat16 if gpu.bf16 else torch.float16, gpu.bf16)
