"""Training: `train(config)` runs the one loop for any kind and returns the artifact folder.

    train/run.py         train(), the output folder, the artifact at the end
    train/build.py       run assembly: accelerator, components, method, data, optimizer (the Run dataclass)
    train/loop.py        the one loop: encode → add noise → UNet → loss → step; snapshots, checkpoints, logs
    train/artifact.py    what a run saves: the final artifact and its snapshots (train.snapshot_every)
    train/snapshots.py   snapshot steps, how many are kept, the disk check before the first step
    train/checkpoint.py  atomic checkpoints and resume
    train/data.py        training images, their order per step, class images
    train/losses.py      per-sample loss terms; train/perceptual.py the decoder-based terms
    train/validation.py  validation images; train/plots.py the loss curve

Freezing (freeze everything, unfreeze by name) is the kinds' own: customgen/kinds/freeze.py.
"""
from __future__ import annotations

from customgen.train.build import Run, build_run
from customgen.train.run import finish, prepare_output, train

__all__ = ["Run", "build_run", "finish", "prepare_output", "train"]
