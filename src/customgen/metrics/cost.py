"""Cost of a method: warm time per image, peak GPU memory, artifact size on disk."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


def _sync() -> None:
    """Wait for queued CUDA work so wall-clock time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_per_image(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, images_per_call: int = 1) -> float:
    """Median warm wall-clock seconds per image of ``fn()`` (warm-up calls are not timed)."""
    if repeats < 1:
        raise ValueError("time_per_image: repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) / images_per_call)
    return statistics.median(times)


@dataclass
class PeakMemory:
    """Filled on exit of ``peak_memory()``: peak allocated bytes on the device, None without CUDA."""

    device: str | None = None
    peak_bytes: int | None = None


@contextlib.contextmanager
def peak_memory(device: str | torch.device | None = None):
    """Context manager measuring peak CUDA memory allocated inside the block (None on CPU)."""
    result = PeakMemory()
    if not torch.cuda.is_available():
        yield result
        return
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result.device = str(dev)
    try:
        yield result
    finally:
        torch.cuda.synchronize(dev)
        result.peak_bytes = int(torch.cuda.max_memory_allocated(dev))


def artifact_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a file, or the sum over all files below a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    raise FileNotFoundError(f"artifact not found: {p}")
