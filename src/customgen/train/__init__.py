"""Training: `train(config)` runs the one loop for any kind and returns the artifact folder.

    train/run.py         train(), the output folder, the artifact at the end
    train/build.py       run assembly: accelerator, components, method, data, optimizer (the Run dataclass)
    train/loop.py        the one loop: encode → add noise → UNet → loss → step; snapshots, checkpoints, logs
    train/artifact.py    what a run saves: the final artifact and its snapshots (train.snapshot_every)
    train/snapshots.py   snapshot steps, how many are kept, the disk check before the first step
    train/checkpoint.py  atomic checkpoints and resume
    train/data.py        training images, their order per step, class images
    train/losses.py      per-sample loss terms; train/perceptual.py the decoder-based terms
    train/freeze.py      freeze everything, unfreeze by name (the kinds' training halves use it)
    train/validation.py  validation images; train/plots.py the loss curve

Names are imported on first use (PEP 562): `customgen.kinds` uses train.freeze, so importing that module must
not pull in the whole training stack (which itself uses the kinds).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"train": "run", "prepare_output": "run", "finish": "run", "build_run": "build", "Run": "build"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
