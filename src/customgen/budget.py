"""GPU memory budgets: what each card offers, and what a count of tensors misses (customgen.peak counts tensors).

A card's memory is the total capacity torch reports for it (cudaDeviceProp.totalGlobalMem: torch's out-of-memory
message prints it as "GPU 0 has a total capacity of X GiB"); the CUDA context lives inside it. The fixed costs are
added to a predicted tensor peak before it is compared with a card; each says where its size comes from. Until
`customgen bench --jobs memory` has measured a card, a prediction is a prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from customgen.errors import UserError

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    """A card: its name, the bytes torch sees, whether it computes bf16 (Ampere and newer), 8-bit Adam's odds."""

    name: str
    total_bytes: int
    bf16: bool
    source: str
    bnb: bool = True  # bitsandbytes' 8-bit Adam assumed to work (installed): not on Pascal, with its failure history

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


OOM_MESSAGE = "torch's out-of-memory message ('total capacity of X GiB') on that card"
GPUS = {  # --gpu names; capacity as torch reports it, and where that figure was seen
    "t4": Gpu("Tesla T4", int(14.56 * GIB), False, f"{OOM_MESSAGE}: github.com/Zheng-Chong/CatVTON/issues/133 "
              "(older drivers: 14.76 GiB); Kaggle's accelerator"),
    "p100": Gpu("Tesla P100-PCIE-16GB", int(15.89 * GIB), False,
                f"{OOM_MESSAGE}: github.com/vllm-project/vllm/issues/13255", bnb=False),
    "l4": Gpu("NVIDIA L4", int(22.05 * GIB), True, f"{OOM_MESSAGE}: github.com/vllm-project/vllm/issues/20214 "
              "(vLLM's L4 CI runners)"),
    "a10": Gpu("NVIDIA A10G", int(21.98 * GIB), True, f"{OOM_MESSAGE}, AWS g5 instances (public deployment logs)"),
    "a100-40": Gpu("NVIDIA A100-SXM4-40GB", int(39.39 * GIB), True, f"{OOM_MESSAGE} (public training logs)"),
    "a100-80": Gpu("NVIDIA A100 80GB", int(79.14 * GIB), True, f"{OOM_MESSAGE} (public training logs)"),
    "h100": Gpu("NVIDIA H100 80GB HBM3", int(79.18 * GIB), True, f"{OOM_MESSAGE} (public training logs)"),
}


@dataclass(frozen=True)
class FixedCost:
    """Memory on the card that no tensor holds: its size (bytes, or a fraction of the tensor peak) and source."""

    name: str
    bytes: int
    fraction: float
    source: str

    def of(self, tensor_peak: int) -> int:
        return self.bytes + math.ceil(self.fraction * tensor_peak)


FIXED = (
    FixedCost("CUDA context", 512 * MIB, 0.0,
              "287 MB measured with lazy module loading (pytorch/pytorch#86509), ~400 MB (pytorch/pytorch#109888), "
              "426 MiB with torch 2.10+cu130 (unslothai/unsloth-zoo#1053); 512 MiB taken"),
    FixedCost("cuBLAS + cuBLASLt workspaces", 41 * MIB, 0.0,
              "cuBLAS 8,519,680 B per handle (discuss.pytorch.org, 'unexpected 8519680B allocation'); cuBLASLt "
              "1 MiB, 4 MiB on Ampere >= 24 GB, 32 MiB on Hopper (pytorch/pytorch#120925)"),
    FixedCost("cuDNN convolution workspace", 0, 0.0,
              "none reserved: PyTorch falls back to a convolution algorithm whose workspace fits "
              "(pytorch/pytorch#558, #49207); a tight card runs slower convolutions, it does not fail"),
    FixedCost("allocator slack", 0, 0.10,
              "reserved minus allocated, assumed 10% of the tensor peak until `customgen bench --jobs memory` measures "
              "max_memory_reserved / max_memory_allocated; the caching allocator rounds segments to 2 MiB and "
              "packs 1-10 MiB requests into 20 MiB blocks (c10/cuda/CUDACachingAllocator.cpp)"),
)


def fixed_costs(tensor_peak: int) -> list[dict]:
    """Each fixed cost for a tensor peak: name, bytes, source."""
    return [{"name": f.name, "bytes": f.of(tensor_peak), "source": f.source} for f in FIXED]


def total_bytes(tensor_peak: int) -> int:
    """A tensor peak plus every fixed cost: what the card must hold."""
    return tensor_peak + sum(f.of(tensor_peak) for f in FIXED)


def parse_gpu(text: str) -> Gpu:
    """--gpu: a name from GPUS, or a memory size in GiB (a bare number)."""
    key = str(text).strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(key)
    except ValueError:
        raise UserError(f"--gpu {text!r}: choose one of {', '.join(GPUS)}, or a memory size in GiB") from None
    if not math.isfinite(gib) or gib <= 0 or gib > 4096:
        raise UserError(f"--gpu {text!r}: a memory size must be a number of GiB between 0 and 4096")
    return Gpu(f"{gib:g} GiB", int(gib * GIB), True, "the size given with --gpu")


def device_gpu(name: str, total_bytes: int, *, bf16: bool, bnb: bool) -> Gpu:
    """The card this process runs on, as the probe found it."""
    return Gpu(name, int(total_bytes), bf16, "this GPU (torch.cuda.get_device_properties)", bnb=bnb)
