"""Side-by-side timing in one process: alternating runs (A B B A A B ...), a ratio per repeat and their median, peak
memory per side, FLOPs counted by torch's FlopCounterMode, and achieved FLOP/s against the device's datasheet peak.

Alternating keeps the ratio honest on a shared or throttling machine: both sides see the same load, so the
per-repeat ratio moves much less than either time.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from customgen.memory import peak_memory, sync

# Dense fp16/bf16 tensor-core TFLOPS from the vendors' datasheets (no sparsity), matched on the CUDA device
# name in this order (H100 PCIe before H100). FLOP bounds below use them; other devices: "unknown".
DEVICE_PEAKS = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bH200\b", "H200", 989.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bT4\b", "T4", 65.0),
    (r"\bP100\b", "P100", 18.7),  # fp16 (no tensor cores)
)
BOUND_DEVICES = ("T4", "A100", "H100 SXM")  # FLOP lower bounds reported for every job


def device_peak(name: str) -> tuple[str, float] | None:
    """(label, dense half-precision TFLOPS) for a CUDA device name, or None when it is not in the table."""
    for pattern, label, tflops in DEVICE_PEAKS:
        if re.search(pattern, name):
            return label, tflops
    return None


def flop_bounds(flops: int | None) -> dict[str, float | None]:
    """Seconds the job needs at least on the reference GPUs at their datasheet peak (FLOPs / peak)."""
    peaks = {label: tflops for _, label, tflops in DEVICE_PEAKS}
    return {d: (flops / (peaks[d] * 1e12) if flops else None) for d in BOUND_DEVICES}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Side:
    """One side of a pair: what runs, and what the runs measured."""

    label: str
    run: Callable[[], Any]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # the largest CUDA peak (or peak RSS on CPU) over the timed runs
    start_bytes: int | None = None  # what was resident when that run began (both sides' models included)
    flops: int | None = None
    output: Any = None  # the last run's result (pixel checks)

    def timed(self) -> None:
        """Run once between two syncs, recording time, peak memory and the output."""
        with peak_memory() as mem:
            sync()
            start = time.perf_counter()
            self.output = self.run()
            sync()
            self.seconds.append(time.perf_counter() - start)
        peak = mem.peak_bytes if mem.peak_bytes is not None else mem.rss_bytes
        if peak is not None and (self.peak_bytes is None or peak > self.peak_bytes):
            self.peak_bytes = peak
            self.start_bytes = mem.start_bytes if mem.peak_bytes is not None else mem.rss_start_bytes

    def summary(self) -> dict:
        return {"label": self.label, "seconds": [round(s, 6) for s in self.seconds],
                "median_seconds": statistics.median(self.seconds), "peak_bytes": self.peak_bytes,
                "start_bytes": self.start_bytes, "flops": self.flops}


def alternate(ours: Side, stock: Side, *, repeats: int, warmup: int = 1, flops: bool = True) -> dict:
    """Warm both up, then `repeats` pairs in the order A B, B A, A B, ... (neither side always runs first, so a
    warm cache or a clock that drifts favours nobody); per-repeat ratios ours/stock and their median."""
    for _ in range(warmup):
        ours.run()
        stock.run()
    for i in range(repeats):
        for side in (ours, stock) if i % 2 == 0 else (stock, ours):
            side.timed()
    if flops:
        ours.flops, stock.flops = count_flops(ours.run), count_flops(stock.run)
    ratios = [a / b for a, b in zip(ours.seconds, stock.seconds)]
    return {"ours": ours.summary(), "stock": stock.summary(), "ratios": [round(r, 4) for r in ratios],
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}


def utilisation(flops: int | None, seconds: float, peak: tuple[str, float] | None) -> dict:
    """Achieved TFLOP/s and its fraction of the device's peak (None where either is unknown)."""
    achieved = flops / seconds / 1e12 if flops and seconds > 0 else None
    return {"achieved_tflops": achieved,
            "fraction_of_peak": achieved / peak[1] if achieved is not None and peak is not None else None}


class ModelClock:
    """Seconds spent inside given modules' forward calls (synchronised hooks): what is *not* overhead."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.seconds = {name: 0.0 for name in modules}
        self._start: dict[str, float] = {}
        self._hooks = []
        for name, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._enter(n)))
            self._hooks.append(module.register_forward_hook(lambda *_, n=name: self._leave(n)))

    def _enter(self, name: str) -> None:
        sync()
        self._start[name] = time.perf_counter()

    def _leave(self, name: str) -> None:
        sync()
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def model_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules whose time counts as model time in a Stable Diffusion pipeline: UNet, text encoder, VAE."""
    vae = pipe.vae
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae_encoder": vae.encoder,
             "vae_decoder": vae.decoder}
    for name in ("quant_conv", "post_quant_conv"):
        if getattr(vae, name, None) is not None:
            parts[f"vae_{name}"] = getattr(vae, name)
    return parts
