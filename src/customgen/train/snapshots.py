"""Snapshot planning: at which steps a run writes snapshots, how many stay, and whether they fit on the disk.

A snapshot (train.snapshot_every = N) is a whole artifact of the run at step N, 2N, ... under
`<artifact>/snapshots/step-NNNNNN/` (customgen.kinds.manifest; written by customgen.train.artifact). Before the
first step, the disk check estimates one snapshot from the kind's own count of what it saves (`Method.saved_bytes`:
the trained tensors × the files it writes, from the base model's shapes) and refuses, in one line, a setting whose
kept snapshots and final artifact would not fit in the free space of the output disk.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from customgen.config import Config
from customgen.errors import UserError
from customgen.kinds import SNAPSHOTS
from customgen.metrics.cost import artifact_bytes

# Bytes per artifact beyond its tensors: safetensors headers (~150 B per tensor: SD v1.5's subject LoRA has 400 per
# file), kohya's metadata, config.yaml and style.json. Checked against written snapshots in tests/test_snapshots.py.
OVERHEAD = 256 * 1024
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

__all__ = ["OVERHEAD", "artifact_bytes", "check_space", "human_bytes", "kept_snapshots", "snapshot_steps"]


def human_bytes(n: int) -> str:
    """A byte count in binary units: 512 B, 1.5 KiB, 3.2 GiB."""
    size, unit = float(n), 0
    while size >= 1024 and unit < len(UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {UNITS[unit]}"


def snapshot_steps(cfg: Config) -> range:
    """The steps a run writes snapshots at: multiples of train.snapshot_every below train.steps (the final step is
    the artifact itself); none when snapshot_every is 0."""
    every = cfg.train.snapshot_every
    return range(every, cfg.train.steps, every) if every else range(0)


def kept_snapshots(cfg: Config) -> int:
    """How many snapshots a finished run keeps: all of them, or the newest train.keep_snapshots."""
    n = len(snapshot_steps(cfg))
    return min(n, cfg.train.keep_snapshots) if cfg.train.keep_snapshots else n


def existing_parent(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (the disk a new folder will be on)."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def check_space(cfg: Config, out: Path, saved_bytes: int) -> str:
    """Refuse (one line: the numbers and what to change) snapshots that would not fit beside the final artifact on
    the output disk; returns the plan line to print ("" without snapshots). At the peak the kept snapshots and one
    more artifact exist together (a new snapshot is written before the oldest goes; the final artifact after the
    last snapshot), less what snapshots a resumed run already holds."""
    n = kept_snapshots(cfg)
    if not n:
        return ""
    per, where = saved_bytes + OVERHEAD, existing_parent(out)
    present = artifact_bytes(out / SNAPSHOTS) if (out / SNAPSHOTS).is_dir() else 0
    free, need = shutil.disk_usage(where).free, (n + 1) * per
    every = cfg.train.snapshot_every
    if need - present > free:
        fit = (free + present) // per - 1  # snapshots that fit beside the final artifact
        advice = ["raise train.snapshot_every"] + ([f"set train.keep_snapshots={fit}"] if fit >= 1 else [])
        raise UserError(f"train.snapshot_every={every} keeps {n} snapshots of about {human_bytes(per)} each: with the "
                        f"final artifact {human_bytes(need - present)} needed, {human_bytes(free)} free on {where}; "
                        f"{', '.join(advice)}, or free disk space (train.snapshot_every=0 turns snapshots off)")
    steps = f"{every} steps" if every > 1 else "step"
    return (f"snapshots: every {steps}, {n} kept, about {human_bytes(per)} each ({human_bytes(need)} with the final "
            f"artifact; {human_bytes(free)} free on {where})")
