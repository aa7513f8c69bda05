"""The run's optimizer, as the memory plan names it: torch's AdamW (fused on CUDA), bitsandbytes' 8-bit AdamW, or
Prodigy (prodigyopt). `customgen.train.estimate` counts the same objects on a fake CUDA device.

Which AdamW implementation: torch picks its multi-tensor (`foreach`) AdamW for CUDA tensors by default, whose step
holds `_foreach_sqrt` of every second moment at once — one fp32 copy of the trainable parameters on top of the
weights, gradients and both moments (3.2 GiB for the whole SD v1.5 UNet). The fused kernel (`fused=True`, torch's
`_fused_adamw_`) updates parameters and moments in place and allocates nothing; the for-loop implementation
(`foreach=False`) holds at most a few tensors of one parameter's size. All three compute the same update to fp32
rounding (tests/test_train.py holds them against each other and the published formula). So: fused where every
parameter is on CUDA, the for-loop implementation elsewhere (what torch itself runs on a CPU).
"""
from __future__ import annotations

import warnings

import torch

from customgen.errors import Notice, UserError
from customgen.memory import MemoryPlan

# diffusers' advanced DreamBooth-LoRA script (examples/advanced_diffusion_training): its Prodigy defaults
PRODIGY_SETTINGS = {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True}
PRODIGY_INSTALL = "pip install prodigyopt"


def make_optimizer(groups: list[dict], plan: MemoryPlan, *, weight_decay: float):
    """The plan's optimizer over the method's parameter groups."""
    if plan.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # lazy: optional, only when the probe found it working

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if plan.optimizer == "prodigy":
        return prodigy(groups, weight_decay=weight_decay)
    return adamw(groups, weight_decay=weight_decay)


def adamw(groups: list[dict], *, weight_decay: float, fused: bool | None = None) -> torch.optim.AdamW:
    """torch's AdamW (Loshchilov & Hutter 2019): the fused kernel when `fused` (None: every parameter on CUDA), else
    the for-loop implementation; a device or dtype without the fused kernel gets the for-loop one (module docstring)."""
    if fused is None:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    if fused:
        try:  # the constructor writes its defaults into the group dicts: each attempt gets copies
            optimizer = torch.optim.AdamW([dict(g) for g in groups], weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for these tensors (dtype, device): the for-loop AdamW below
            pass
        else:
            # fp16's GradScaler would hand an overflowing step to the fused kernel to skip, and accelerate would not
            # see the skip (it watches whether step() is called) and advance the LR schedule: let GradScaler skip
            # step() itself, as for any other optimizer (the loop's clipping has unscaled the gradients already)
            optimizer._step_supports_amp_scaling = False
            return optimizer
    return torch.optim.AdamW([dict(g) for g in groups], weight_decay=weight_decay, foreach=False)


def prodigy_class():
    """prodigyopt's Prodigy, or one line saying how to install it."""
    try:
        from prodigyopt import Prodigy  # lazy: only train.optimizer=prodigy needs it; a missing install is one line
    except ImportError as err:
        raise UserError(f"train.optimizer=prodigy needs the prodigyopt package, which is not installed: run "
                        f"`{PRODIGY_INSTALL}` (it is in requirements.txt) or choose train.optimizer=adamw") from err
    return Prodigy


def check_optimizer(cfg) -> None:
    """Refuse, before any weight loads, an optimizer whose package is missing."""
    if cfg.train.optimizer == "prodigy":
        prodigy_class()


def prodigy(groups: list[dict], *, weight_decay: float):
    """Prodigy (Mishchenko & Defazio 2023): Adam whose step size it estimates (d); `lr` multiplies it. Settings as
    diffusers' advanced script: decoupled weight decay, bias correction, safeguard warm-up. Prodigy takes one lr for
    every group: as that script does for its text encoder, every group trains at the largest (a notice says so)."""
    optimizer_class = prodigy_class()
    lr = max(g["lr"] for g in groups)
    others = sorted({g["lr"] for g in groups} - {lr})
    if others:
        warnings.warn(f"train.optimizer=prodigy takes one learning rate: parameters set to lr {others} train at "
                      f"{lr} (as diffusers' advanced script does)", Notice, stacklevel=2)
    if lr <= 0.1:
        warnings.warn(f"train.optimizer=prodigy with lr {lr}: Prodigy's lr multiplies the step size it estimates; "
                      "diffusers' advanced script recommends train.lr=1.0", Notice, stacklevel=2)
    return optimizer_class([{**g, "lr": lr} for g in groups], lr=lr, weight_decay=weight_decay, **PRODIGY_SETTINGS)
