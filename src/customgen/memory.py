"""GPU probe and precision choice: what this device can do; the memory plan a run uses (customgen.train.fit
chooses it under `train.memory: auto`).

T4 (sm_75) and P100 (sm_60) have no bf16: they train in fp16 autocast with fp32 trainables.
Kaggle's default torch (CUDA 12.8+ builds) ships no sm_60 kernels, so a P100 cannot run it.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from customgen.budget import GPUS, device_gpu
from customgen.errors import Notice, UserError

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


def sync() -> None:
    """Wait for queued CUDA work, so wall-clock time covers it (a no-op without an initialised GPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU RNG seeded, then restore the caller's RNG state (builds random networks
    reproducibly without moving anybody else's random stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class PeakMemory:
    """Filled on exit of `peak_memory()`: peak CUDA bytes allocated (None without CUDA) and the process's peak
    resident set during the block (Linux; None where it cannot be measured)."""

    device: str | None = None
    peak_bytes: int | None = None
    rss_bytes: int | None = None
    start_bytes: int | None = None  # CUDA bytes allocated when the block began (peak − start: what it added)
    rss_start_bytes: int | None = None  # resident set when the block began

    @property
    def bytes(self) -> int | None:
        """CUDA peak on a GPU, else peak RSS: the figure a user of this device cares about."""
        return self.peak_bytes if self.peak_bytes is not None else self.rss_bytes


def _vm_status(key: str = "VmHWM") -> int | None:
    """A size from /proc/self/status in bytes (Linux): VmHWM the peak resident set, VmRSS the current one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: str | torch.device | None = None):
    """Peak memory inside the block: `with peak_memory() as peak: ...; peak.peak_bytes, peak.rss_bytes`."""
    result = PeakMemory()
    dev = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    if cuda:
        dev = dev or torch.device("cuda", torch.cuda.current_device())
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result.device, result.start_bytes = str(dev), int(torch.cuda.memory_allocated(dev))
    rss = _reset_hwm()
    result.rss_start_bytes = _vm_status("VmRSS") if rss else None
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
            result.peak_bytes = int(torch.cuda.max_memory_allocated(dev))
        result.rss_bytes = _vm_status() if rss else None


@dataclass(frozen=True)
class MemoryPlan:
    """Settings for training's memory, with the reason shown to the user (customgen.train.fit chooses them under
    `train.memory: auto`; `plan_memory` takes them as given)."""

    mixed_precision: str  # no | fp16 | bf16
    gradient_checkpointing: bool
    optimizer: str  # adamw | adamw8bit | prodigy
    offload: bool = True  # text encoder / VAE leave the GPU after caching when nothing needs them
    batch_size: int | None = None  # images per micro-step (None: train.batch_size)
    grad_accum: int | None = None  # micro-steps per optimizer step (None: train.grad_accum, or 1)
    predicted_bytes: int | None = None  # the estimate of the peak on the GPU, fixed costs included (None: none made)
    how: str = "settings as given"  # who chose: "memory auto", "settings as given", ...

    def describe(self, info: DeviceInfo) -> str:
        """One line: the device, who chose, every choice and the predicted peak."""
        where = f"{info.name} ({info.total_gib:.1f} GiB)" if info.total_bytes else info.device
        text = (f"device {where}, {self.how}: mixed precision {self.mixed_precision}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, optimizer {self.optimizer}")
        if info.device != "cpu":
            text += f", text encoder/VAE {'off the GPU after caching' if self.offload else 'kept on the GPU'}"
        if self.batch_size is not None:
            text += f", batch {self.batch_size} x {self.grad_accum} accumulation"
        if self.predicted_bytes is not None:
            text += f"; predicted peak {self.predicted_bytes / 2**30:.2f} GiB"
        return text

    def apply(self, cfg):
        """`cfg` with this plan's choices written into train.* (what the run uses and saves). The optimizer stays as
        asked (`auto`, `adamw8bit`): the one used is the plan's, and style.json records both."""
        train = replace(cfg.train, gradient_checkpointing=self.gradient_checkpointing,
                        batch_size=self.batch_size or cfg.train.batch_size,
                        grad_accum=self.grad_accum or cfg.train.grad_accum or 1)
        return replace(cfg, train=train)


def out_of_memory(step: int, phase: str, plan: MemoryPlan) -> UserError:
    """The one line a CUDA out-of-memory error becomes: where, the predicted and the real peak, what to do."""
    predicted = f"{plan.predicted_bytes / 2**30:.2f} GiB" if plan.predicted_bytes else "not estimated (memory manual)"
    real = "unknown (no CUDA device)"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        real = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    return UserError(f"CUDA out of memory at step {step} ({phase}): predicted peak {predicted}, real peak {real}; "
                     "`customgen plan CONFIG` shows what fits (e.g. train.gradient_checkpointing=true, "
                     "train.batch_size=1)")


def bnb_works(device: str) -> bool:
    """Whether bitsandbytes imports and runs an 8-bit Adam step on `device` (Pascal has a history of failures)."""
    if not device.startswith("cuda"):
        return False
    try:
        import bitsandbytes as bnb  # lazy: optional, CUDA only (and may fail to import on old GPUs)

        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        return bool(torch.isfinite(p).all())
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


def precision(train_cfg, info: DeviceInfo) -> str:
    """train.mixed_precision resolved: bf16 where the GPU has it, fp16 on T4/P100, none on CPU."""
    mp = train_cfg.mixed_precision
    if mp == "auto":
        mp = "no" if info.device == "cpu" else ("bf16" if info.dtype == torch.bfloat16 else "fp16")
    if mp == "bf16" and info.device != "cpu" and not info.bf16:
        raise UserError(f"{info.name} has no bf16: set train.mixed_precision=fp16")
    return mp


def plan_memory(train_cfg, info: DeviceInfo) -> MemoryPlan:
    """The settings as given (train.memory: manual, or no GPU): checkpointing only when set, 8-bit Adam when asked
    for or (optimizer auto) when bitsandbytes works on this GPU."""
    opt, works = train_cfg.optimizer, False
    if opt in ("auto", "adamw8bit"):
        works = bnb_works(info.device)
        if opt == "adamw8bit" and not works:
            warnings.warn("8-bit Adam unavailable here (bitsandbytes missing or failing on this GPU); using AdamW", Notice)
    return MemoryPlan(precision(train_cfg, info), bool(train_cfg.gradient_checkpointing),
                      optimizer_used(opt, bnb=works))


def optimizer_used(asked: str, *, bnb: bool) -> str:
    """The optimizer a run uses for train.optimizer `asked`: 8-bit AdamW for auto or adamw8bit where bitsandbytes
    works (`bnb`), else AdamW; adamw and prodigy as asked."""
    if asked in ("auto", "adamw8bit"):
        return "adamw8bit" if bnb else "adamw"
    return asked


@contextlib.contextmanager
def moved(*modules, device):
    """Move modules to `device` for the block and back to where each was afterwards."""
    homes = [(m, next(m.parameters()).device) for m in modules if m is not None]
    for m, _ in homes:
        m.to(device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m, home in homes:
            m.to(home)


def default_gpu():
    """The card a plan is for when none is named: the GPU this process runs on, else a Kaggle T4 (customgen's
    users' card)."""
    if not torch.cuda.is_available():
        return GPUS["t4"]
    info = probe()
    return device_gpu(info.name, info.total_bytes, bf16=info.bf16, bnb=bnb_works(info.device))
