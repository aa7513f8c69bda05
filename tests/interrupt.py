"""A training run stopped at an optimizer step, as a kill stops it there (the checkpoints before that step are on
disk, nothing after it is): the resume tests' one way to cut a run."""
from __future__ import annotations

import contextlib

import pytest

from customgen.train import loop


@contextlib.contextmanager
def killed_at(monkeypatch, step: int):
    """Inside the block, the loop raises at optimizer step `step` (0-based, as `loop.optimizer_step` counts) and the
    block must end by that error; afterwards the loop steps as usual."""
    real = loop.optimizer_step

    def killed(run, s):
        if s == step:
            raise RuntimeError("killed")
        return real(run, s)

    monkeypatch.setattr(loop, "optimizer_step", killed)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield
    finally:
        monkeypatch.setattr(loop, "optimizer_step", real)
