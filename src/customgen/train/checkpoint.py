"""Checkpoints that a kill at any moment cannot corrupt, and resume that refuses what does not fit.

A checkpoint folder is written under a temporary name and renamed when complete, so a folder named
`step-NNNNNN` is always whole; a write that fails (disk full) removes its temporary folder and says so in one
line (`write_folder`, which snapshots use too). It holds the trainable tensors (trainable.safetensors), the
optimizer and LR-scheduler states without pickle (optimizer.safetensors + JSON in state.json,
customgen.train.statefile), the step and the resolved config.
Data order, noise and timesteps are functions of (seed, step), so no RNG state is needed for an exact resume.

Resume reads and checks the whole checkpoint before restoring anything: a damaged one is refused (`--resume
auto` falls back to the previous one with a note), one with other tensor names or shapes is refused, and one
made with another config is refused unless forced (`--resume-force`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from customgen.config import Config, to_dict
from customgen.errors import Notice, UserError, disk_problem
from customgen.models import canonical_text_encoder
from customgen.train.statefile import decode, encode

PATTERN = re.compile(r"^step-(\d{6,})$")
TRAINABLE, STATES, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"
PICKLES = ("optimizer.pt", "scheduler.pt")  # what checkpoints of customgen ≤ 0.1 held; never loaded
# Config keys that do not change the trained weights: resuming with other values is not "another config".
RESUME_IGNORED = ("name", "preset", "train.output", "train.checkpoint_every", "train.checkpoint_minutes",
                  "train.keep_checkpoints", "train.snapshot_every", "train.keep_snapshots", "train.validate_every",
                  "train.validate_every_epochs", "train.log_every", "train.latent_cache_dir", "train.attention_slicing",
                  "train.vae_slicing", "train.vae_tiling", "validation.", "eval.")  # memory helpers: same math


class CheckpointDamaged(UserError):
    """A checkpoint whose files cannot be read back (truncated, missing, not what customgen wrote)."""


@dataclass
class Checkpoint:
    """Everything one checkpoint holds, read and checked, nothing restored yet."""

    path: Path
    state: dict  # state.json: step, config_hash, config, optimizer/scheduler trees
    trainable: dict  # name → tensor
    optimizer: dict
    scheduler: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`/checkpoints, oldest first."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def save_checkpoint(folder: Path, *, step: int, tensors: dict, optimizer, lr_scheduler, info: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep`."""
    final = Path(folder) / "checkpoints" / f"step-{step:06d}"
    write_folder(final, lambda tmp: _write(tmp, step, tensors, optimizer, lr_scheduler, info), what="checkpoint",
                 advice="free disk space (train.keep_checkpoints limits how many are kept) and run again: --resume "
                        "auto continues from the last one")
    prune(checkpoints(folder), keep)
    return final


def write_folder(final: Path, fill: Callable[[Path], None], *, what: str, advice: str) -> Path:
    """Make folder `final` atomically: `fill(tmp)` writes a temporary sibling `.tmp-NAME`, renamed into place when
    complete (an older `final` is moved aside first, then removed). A failed fill removes its temporary folder; one
    that ran out of disk says so in one line (`advice`: what to do). Leftovers of killed writes go first."""
    root = final.parent
    tmp, old = root / f".tmp-{final.name}", root / f".old-{final.name}"
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")] if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)  # the output lock says no other run writes here
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why = disk_problem(err)
        if why is None:
            raise
        raise UserError(f"cannot write {what} {final} ({why}); {advice}") from err
    if final.exists():  # re-made after a resume: a kill between the two renames leaves only `.old-NAME`
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def prune(folders: list[Path], keep: int) -> None:
    """Remove all but the last `keep` of `folders` (oldest first); 0 keeps all."""
    for old in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _write(tmp: Path, step: int, tensors: dict, optimizer, lr_scheduler, info: dict) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TRAINABLE))
    states: dict = {}
    trees = {"optimizer": encode(optimizer.state_dict(), states, "optimizer"),
             "scheduler": encode(lr_scheduler.state_dict(), states, "scheduler")}
    save_file(states, str(tmp / STATES))
    (tmp / STATE).write_text(json.dumps({"format": 2, "step": step, **info, **trees}, indent=1, default=str))


def read_checkpoint(path: Path) -> Checkpoint:
    """Read every file of a checkpoint (CheckpointDamaged in one line when one cannot be read)."""
    path = Path(path)
    if not (path / STATES).is_file() and any((path / p).exists() for p in PICKLES):
        raise UserError(f"checkpoint {path} stores its optimizer state as a pickle ({PICKLES[0]}), which customgen "
                        "never loads (a pickle can run code); resume from a newer checkpoint or pass --resume never")
    try:
        state = json.loads((path / STATE).read_text())
        states = load_file(str(path / STATES))
        trainable = canonical_text_encoder(load_file(str(path / TRAINABLE)), prefix="text_encoder.")  # any release's names
        ck = Checkpoint(path, state, trainable, decode(state["optimizer"], states), decode(state["scheduler"], states))
        int(state["step"])
    except Exception as err:  # noqa: BLE001 - json, safetensors and the tree decoder raise many types
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({_reason(err)})") from err
    bad = next((k for k, t in ck.trainable.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({bad} holds NaN or infinite values)")
    return ck


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0][:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def config_differences(saved: dict | None, current: dict) -> list[str]:
    """`key: saved → current` for every config key that changes the trained weights. A key the saved config lacks
    (added to customgen since) counts as its default: a new setting's default keeps what older runs did."""
    flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in  # noqa: E731
                            (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
    plain = lambda d: flat(json.loads(json.dumps(d, default=str)))  # noqa: E731
    a, b = plain(saved or {}), plain(current)
    if saved:
        a = {k: v for k, v in plain(to_dict(Config())).items() if k in b} | a
    keys = sorted((k for k in a.keys() | b.keys() if not k.startswith(RESUME_IGNORED) and a.get(k) != b.get(k)),
                  key=lambda k: (k not in ("method", "model.ref"), k))  # the method and model first: they say most
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys]


def check_fits(ck: Checkpoint, tensors: dict, *, config: dict, config_hash: str, force: bool) -> None:
    """Refuse (one line) a checkpoint of another run: other tensors, other shapes, other config unless forced."""
    if "config" in ck.state:
        diff = config_differences(ck.state["config"], config)
    else:  # written before checkpoints stored their config: only the hash can be compared
        diff = [] if ck.state.get("config_hash") == config_hash else [f"config hash {ck.state.get('config_hash')!r} "
                                                                      f"→ {config_hash!r}"]
    hint = f" (it was made with {diff[0]})" if diff else ""
    if set(ck.trainable) != set(tensors):
        other = sorted(set(tensors) ^ set(ck.trainable))[0]
        raise UserError(f"checkpoint {ck.path} holds other trainable tensors than this run (e.g. {other}){hint}; "
                        "resume from a checkpoint of this method or pass --resume never")
    for name, t in tensors.items():
        if tuple(ck.trainable[name].shape) != tuple(t.shape):
            raise UserError(f"checkpoint {ck.path} holds {name} of shape {tuple(ck.trainable[name].shape)}, this run "
                            f"has {tuple(t.shape)}{hint}; resume with that config or pass --resume never")
    if diff and not force:
        more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
        raise UserError(f"checkpoint {ck.path} was made with another config ({diff[0]}{more}); pass --resume-force "
                        "to resume with this config anyway, or --resume never to start over")
    if diff:
        warnings.warn(f"resuming {ck.path} with another config ({'; '.join(diff[:3])}): forced", Notice, stacklevel=3)


def restore(ck: Checkpoint, *, tensors: dict, optimizer, lr_scheduler) -> None:
    """Load the checked checkpoint into this run's tensors, optimizer and scheduler."""
    try:
        optimizer.load_state_dict(same_implementation(ck.optimizer, optimizer))
        lr_scheduler.load_state_dict(ck.scheduler)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise UserError(f"checkpoint {ck.path}: its optimizer state does not fit this run ({_reason(err)}); "
                        "pass --resume never to start over") from err
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(ck.trainable[name].to(t.device, t.dtype))


IMPLEMENTATION = ("fused", "foreach")  # torch's AdamW: which kernel runs; the math is the same (train/optimizers.py)


def same_implementation(saved: dict, optimizer) -> dict:
    """`saved` (an optimizer state dict) with this run's implementation switches in every parameter group: a
    checkpoint written by another AdamW implementation (an older customgen, another device) resumes with the one this
    run chose, its step counters moved where that one keeps them (torch's load_state_dict reads the switches)."""
    groups = [{**g, **{k: now[k] for k in IMPLEMENTATION if k in now}}
              for g, now in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups + saved["param_groups"][len(groups):]}


def candidates(folder: Path, resume: str) -> list[Path]:
    """Checkpoints to try, newest first: `auto` → every complete one; `never` → none; else the one named."""
    if resume == "never":
        return []
    if resume == "auto":
        return checkpoints(folder)[::-1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no {STATE} inside)")
    return [path]


def load_latest(folder: Path, resume: str) -> Checkpoint | None:
    """The checkpoint to resume from; with `auto`, damaged ones are skipped with a note (None: start at 0)."""
    tried = []
    for path in candidates(folder, resume):
        try:
            return read_checkpoint(path)
        except CheckpointDamaged as err:
            if resume != "auto":
                raise UserError(f"{err}; resume from another checkpoint (--resume auto skips damaged ones) or "
                                "pass --resume never") from err
            tried.append(path.name)
            warnings.warn(f"{err}; trying the previous checkpoint", Notice, stacklevel=2)
    if tried:
        raise UserError(f"no intact checkpoint in {Path(folder) / 'checkpoints'} ({', '.join(tried)} damaged); "
                        "pass --resume never to start over")
    return None
