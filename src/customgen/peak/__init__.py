"""Peak device memory of real code without the device: a live-bytes counter and a fake CUDA device.

    with fake_cuda(), LiveBytes("cuda") as live:   # modules built and moved inside the block are fake
        ...the real training step or pipeline call...
    live.peak                                         # bytes, as the CUDA caching allocator would count them

`LiveBytes` is a TorchDispatchMode: every tensor an op returns adds its storage's bytes once, rounded up to the
CUDA caching allocator's 512-byte blocks (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp), and a weakref
finalizer subtracts them when the storage dies — what `torch.cuda.max_memory_allocated` counts for tensors. The
same counter runs on real CPU tensors (device "cpu"), which is how tests hold the fake prediction against a real
run. What a tensor count misses (CUDA context, cuBLAS workspaces, allocator slack) is added by customgen.budget.

`fake_cuda()` is torch's FakeTensorMode (shapes, dtypes and devices without storage) plus what SD training needs
on a machine without a GPU, each written here because torch has no switch for it:
- `Module._apply` replaces fake parameters instead of swapping them (`.to()` cannot swap fake tensors);
- `F.scaled_dot_product_attention` runs `aten._scaled_dot_product_efficient_attention`, the kernel CUDA picks for
  SD's shapes (output + fp32 logsumexp, no L×L matrix) — the dispatcher itself needs a real device;
- CUDA autocast is allowed (torch disables it when no GPU is present) and reports bf16 as supported;
- backward runs in `backward()` (customgen.peak.backward): torch's engine needs a real CUDA context for fake CUDA tensors
  (pytorch/pytorch#92627). It calls the graph's nodes in the engine's order (highest sequence number first),
  reduces and casts gradients as the engine's validate_outputs does, accumulates them in place where the engine
  would, and releases each node's saved tensors right after it runs (through saved-tensor hooks); the nodes run
  without grad mode, as the engine runs them;
- small CPU tensors made without fake inputs stay real (data order, random draws, step counters keep values);
  data-dependent reads of fake tensors (`.item()`, `bool(t)`, boolean masks) take their worst case: a count is 1,
  a check passes, a mask keeps every element.
The patches are process-wide while the block runs: nothing else in the process should run models meanwhile
(training plans before it loads weights; inference plans under the session lock). Backward with checkpointing
also needs `torch._C._current_graph_task_id` answered per Python backward (checkpoint recomputes once per task).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from customgen.peak.backward import SAVED, backward, graph_task_id
from customgen.peak.values import Values

BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes (kMinBlockSize)
aten = torch.ops.aten


def blocks(nbytes: int) -> int:
    """Bytes rounded up to the caching allocator's 512-byte blocks."""
    return -(-int(nbytes) // BLOCK) * BLOCK


class LiveBytes(TorchDispatchMode):
    """Live storage bytes on one device type, and their peak (see the module docstring)."""

    def __init__(self, device: str = "cuda"):
        super().__init__()
        self.device, self.live, self.peak, self._sizes = device, 0, 0, {}

    def add(self, tensor) -> None:
        """Count `tensor`'s storage once (also for tensors made before the counter started)."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = size = blocks(storage.nbytes())
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def add_all(self, *modules) -> None:
        """Count the parameters and buffers of modules that exist already."""
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                self.add(t)

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> int:
        """Start a new peak at what is live now; returns it."""
        self.peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.add(t)
        return out


def _apply(self, fn, recurse=True):
    """Module._apply for fake tensors: new parameters and buffers replace the old ones (no swap)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, p in list(self._parameters.items()):
        if p is None:
            continue
        with torch.no_grad():
            new = fn(p)
        if new is not p:
            self._parameters[key] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
    for key, b in list(self._buffers.items()):
        if b is not None:
            self._buffers[key] = fn(b)
    return self


def materialize(module: torch.nn.Module, device, dtype: torch.dtype, mode: FakeTensorMode) -> None:
    """A meta module's parameters and buffers as fake tensors on `device` (floating ones in `dtype`), made directly
    from their meta tensors: what `.to(device, dtype)` makes, without an op per tensor (a model has thousands).
    Count them with `LiveBytes.add_all` afterwards."""
    device = torch.device(device)
    with _disable_current_modes():
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for name, t in list(table.items()):
                    if t is None or not t.is_meta:
                        continue
                    meta = t.detach().to(dtype) if t.is_floating_point() else t.detach()
                    fake = mode.fake_tensor_converter.from_meta_and_device(mode, meta, device)
                    table[name] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if table is m._parameters \
                        else fake


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """F.scaled_dot_product_attention as CUDA's memory-efficient kernel runs it (output + fp32 logsumexp)."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p, is_causal,
                                                        scale=scale)[0]


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode with CUDA training working on any machine (see the module docstring)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.nn.Module, "_apply", _apply))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", efficient_attention))
        stack.enter_context(_patched(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False))
        stack.enter_context(_patched(torch.cuda, "is_bf16_supported", lambda *a, **k: True))
        stack.enter_context(_patched(torch.autograd, "backward", backward))
        stack.enter_context(_patched(torch._C, "_current_graph_task_id", graph_task_id))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(SAVED.pack, SAVED.unpack))
        stack.enter_context(mode)
        stack.enter_context(Values())
        yield mode
