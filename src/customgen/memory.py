"""GPU probe and precision choice: what this device can do and what fits a 16 GB T4.

T4 (sm_75) and P100 (sm_60) have no bf16: they train in fp16 autocast with fp32 trainables.
Kaggle's default torch (CUDA 12.8+ builds) ships no sm_60 kernels, so a P100 cannot run it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from customgen.errors import UserError

P100_FIX = (
    "this torch build has no kernels for the P100 (sm_60): in Kaggle's notebook settings choose "
    "'GPU T4 x2' as the accelerator, or install a torch build with sm_60 kernels"
)


@dataclass(frozen=True)
class DeviceInfo:
    """What the probe found: device, name, memory and the precision it picked."""

    device: str
    name: str
    total_bytes: int
    capability: tuple[int, int] | None
    dtype: torch.dtype
    bf16: bool

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def check_cuda_arch(capability: tuple[int, int], arch_list: list[str]) -> None:
    """Refuse a GPU whose compute capability this torch build has no kernels for (the P100 trap)."""
    major, minor = capability
    wanted = {f"sm_{major}{minor}", f"compute_{major}{minor}"}
    # PTX for an older arch is JIT-compiled for newer GPUs, so only an exact/older-major miss is fatal.
    have_older_ptx = any(a.startswith("compute_") and int(a.split("_")[1]) <= major * 10 + minor for a in arch_list)
    if arch_list and not (wanted & set(arch_list)) and not have_older_ptx:
        if (major, minor) == (6, 0):
            raise UserError(P100_FIX)
        raise UserError(
            f"this torch build has no kernels for this GPU (sm_{major}{minor}; build has {' '.join(arch_list)}): "
            "install a torch build for it or switch the accelerator"
        )


def probe(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> DeviceInfo:
    """Pick the device (CUDA if present) and dtype: bf16 where supported, fp16 on T4/P100, fp32 on CPU."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return DeviceInfo(str(device), "cpu", 0, None, _dtype(dtype) or torch.float32, False)
    index = device.index or 0
    cap = torch.cuda.get_device_capability(index)
    check_cuda_arch(cap, torch.cuda.get_arch_list())
    props = torch.cuda.get_device_properties(index)
    bf16 = cap >= (8, 0) and torch.cuda.is_bf16_supported()
    chosen = _dtype(dtype) or (torch.bfloat16 if bf16 else torch.float16)
    if chosen == torch.bfloat16 and not bf16:
        raise UserError(f"{props.name} has no bf16: use dtype fp16 (fp16 autocast with fp32 trainable weights)")
    return DeviceInfo(str(device), props.name, props.total_memory, cap, chosen, bf16)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    return DTYPES[dtype]


@contextlib.contextmanager
def peak_memory(device: str | torch.device | None = None):
    """Measure peak CUDA memory inside the block: `with peak_memory() as peak: ...; peak["bytes"]`."""
    out = {"bytes": 0}
    cuda = torch.cuda.is_available() and torch.device(device or "cuda").type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["bytes"] = torch.cuda.max_memory_allocated()
