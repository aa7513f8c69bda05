"""Freeze everything, then unfreeze by name; report trainable / total counts. A kind's `Method.setup` does this
(the kinds own it, so training, one layer up, imports it and nothing here imports training).

Trainable parameters are always returned as a *list*: a `filter()` iterator is consumed by the
optimizer and a later `clip_grad_norm_` silently gets nothing (a real bug in diffusers' LoRA example).
"""
from __future__ import annotations

import torch

from customgen.errors import UserError

SCOPES = {  # DreamBooth scopes: which UNet parameter names train
    "attention": (".attn1.", ".attn2."),
    "cross_attention": (".attn2.",),
    "full": ("",),
}


def freeze(*modules: torch.nn.Module) -> None:
    """requires_grad_(False) on every parameter of every module."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False)


def scope_names(unet: torch.nn.Module, scope: str) -> list[str]:
    """UNet parameter names inside a DreamBooth scope (attention | cross_attention | full)."""
    if scope not in SCOPES:
        raise UserError(f"unknown DreamBooth scope {scope!r}; choose from {', '.join(SCOPES)}")
    return [n for n, _ in unet.named_parameters() if any(key in f".{n}" for key in SCOPES[scope])]


def unfreeze(module: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    """Set requires_grad on exactly `names` and return those parameters as a list."""
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise UserError(f"no parameter named {missing[0]} in {type(module).__name__}")
    for n in names:
        params[n].requires_grad_(True)
    return [params[n] for n in names]


def parameter_report(**modules: torch.nn.Module) -> str:
    """One line per module: trainable / total parameters (and the percentage)."""
    rows = []
    for name, m in modules.items():
        if m is None:
            continue
        total = sum(p.numel() for p in m.parameters())
        train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows.append(f"{name}: {train:,} trainable / {total:,} ({100 * train / max(total, 1):.3f}%)")
    return "\n".join(rows)
