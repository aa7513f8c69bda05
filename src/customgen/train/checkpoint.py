"""Checkpoints that a kill at any moment cannot corrupt, and resume.

A checkpoint folder is written under a temporary name and renamed when complete, so a folder named
`step-NNNNNN` is always whole. It holds the trainable tensors (safetensors), optimizer and LR
scheduler states and the step. Data order, noise and timesteps are functions of (seed, step), so
no RNG state is needed for an exact resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customgen.errors import UserError

PATTERN = re.compile(r"^step-(\d{6,})$")


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`/checkpoints, oldest first."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def save_checkpoint(folder: Path, *, step: int, tensors: dict, optimizer, lr_scheduler, info: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep`."""
    root = Path(folder) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(folder: Path, resume: str) -> Path | None:
    """`auto` → the latest complete checkpoint (or None); `never` → None; else a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no state.json inside)")
    return path


def load_checkpoint(path: Path, *, tensors: dict, optimizer, lr_scheduler) -> dict:
    """Restore trainable tensors, optimizer and scheduler from `path`; returns its state.json."""
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(tensors):
        missing = sorted(set(tensors) ^ set(saved))[:1]
        raise UserError(f"checkpoint {path} does not match this run (e.g. {missing}); was it made with another config?")
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(saved[name].to(t.device, t.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())
