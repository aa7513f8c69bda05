"""Cost of a method: warm time per image, artifact size on disk (peak memory: customgen.memory.peak_memory)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

from customgen.memory import sync


def time_per_image(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, images_per_call: int = 1) -> float:
    """Median warm wall-clock seconds per image of ``fn()`` (warm-up calls are not timed)."""
    if repeats < 1:
        raise ValueError("time_per_image: repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) / images_per_call)
    return statistics.median(times)


def artifact_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a file, or the sum over all files below a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    raise FileNotFoundError(f"artifact not found: {p}")
