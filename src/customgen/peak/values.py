"""Values where fake-CUDA code needs them (customgen.peak.fake_cuda): small CPU tensors made without fake inputs stay
real, data-dependent reads of fake tensors take their worst case, and fake tensors known to hold only zeros answer
as zeros (what Prodigy's `p.any()` asks of a zero-initialised LoRA B before it keeps a copy)."""
from __future__ import annotations

import math
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


class Values(TorchDispatchMode):
    """Values where the code needs them: ops on CPU tensors with no fake input run for real (data order, random
    draws, optimizer step counters, masks keep their values); data-dependent reads of fake tensors take their worst
    case (a count is 1, a check passes, a boolean mask keeps every element) unless the tensor is known to hold only
    zeros (then they read zero)."""

    def __init__(self):
        super().__init__()
        self.zeros = Zeros()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if not any(isinstance(a, FakeTensor) for a in leaves):
            if _on_cpu(leaves, kwargs) and _small(func, args, kwargs, leaves):
                with _disable_current_modes():
                    return func(*args, **kwargs)
            return self.zeros.track(func, args, kwargs, func(*args, **kwargs))
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            t, zero = args[0], self.zeros.holds(args[0])
            if t.dtype == torch.bool or func is aten.is_nonzero.default:
                return not zero
            return (0.0 if zero else 1.0) if t.is_floating_point() else (0 if zero else 1)
        if func is aten.nonzero.default:
            return _every_index(args[0].shape, args[0].device)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            args = (args[0], _long_indices(args[0], args[1]), *args[2:])
        return self.zeros.track(func, args, kwargs, func(*args, **kwargs))


MAKES_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.zero_.default)
KEEPS_ZEROS = (aten._to_copy.default, aten.clone.default, aten.copy_.default, aten.any.default, aten.abs.default)


class Zeros:
    """Storages of fake tensors known to hold only zeros: made by zeros/zero_, or copied (moved, cast, cloned) from a
    tensor of zeros, fake or real; any other write to a storage forgets it. Views share their base's storage."""

    def __init__(self):
        self.keys: set[int] = set()

    def holds(self, t) -> bool:
        if isinstance(t, FakeTensor):
            return t.untyped_storage()._cdata in self.keys
        if isinstance(t, torch.Tensor) and not t.is_meta:
            with _disable_current_modes():
                return not bool(t.any())
        return False

    def track(self, func, args, kwargs, out):
        """Update the known zeros after `func(*args, **kwargs)` returned `out`; returns `out`. A written input is
        zero only if `func` zeroes it; a new storage only if `func` makes or copies zeros; views keep their base's."""
        if func in MAKES_ZEROS:
            zero = True
        elif func in KEEPS_ZEROS:
            zero = self.holds(args[1] if func is aten.copy_.default else args[0])
        else:
            zero = False
        schema = func._schema.arguments
        written = [v for a, v in zip(schema, args) if a.alias_info is not None and a.alias_info.is_write]
        written += [v for k, v in kwargs.items() if k == "out"]
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, FakeTensor)}
        new = [t for t in tree_leaves(out) if isinstance(t, FakeTensor) and t.untyped_storage()._cdata not in inputs]
        for t in [t for t in tree_leaves(written) if isinstance(t, FakeTensor)] + new:
            key = t.untyped_storage()._cdata
            if zero and _whole(t):
                self._mark(t)
            elif not zero:  # zeros written into part of a storage leave it as known as it was
                self.keys.discard(key)
        return out

    def _mark(self, t: FakeTensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.keys:
            self.keys.add(key)
            weakref.finalize(storage, self.keys.discard, key)


def _whole(t: torch.Tensor) -> bool:
    """Whether `t` spans its whole storage (a write to it writes every byte)."""
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def _on_cpu(leaves: list, kwargs: dict) -> bool:
    """Whether an op without fake inputs works on (or makes) CPU tensors only."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    return all(a.device.type == "cpu" for a in leaves if isinstance(a, torch.Tensor))


SMALL = 2**16  # CPU tensors made from nothing stay real up to this many elements (indices, counters, masks)


def _small(func, args, kwargs, leaves) -> bool:
    """Whether a CPU op without fake inputs works on values: it has real (so small) tensor inputs, or it makes at
    most SMALL elements. Larger CPU tensors (weights of a module built on the CPU, then moved) stay fake."""
    if any(isinstance(a, torch.Tensor) for a in leaves):
        return True
    named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    if "size" in named:
        return math.prod(named["size"]) <= SMALL
    if "n" in named:
        return named["n"] <= SMALL
    if "end" in named:
        start, step = named.get("start", 0), named.get("step", 1) or 1
        return abs((named["end"] - start) / step) <= SMALL
    return False


def _every_index(shape, device) -> torch.Tensor:
    """nonzero() of a mask whose every element is true: (numel, ndim) indices."""
    if not len(shape):
        return torch.zeros((1, 0), dtype=torch.long, device=device)
    grid = torch.meshgrid(*[torch.arange(n, device=device) for n in shape], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def _long_indices(target: torch.Tensor, indices: list) -> list:
    """Boolean index tensors as long indices: a real mask's own, a fake mask's worst case (every element)."""
    out, dim = [], 0
    for idx in indices:
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            if isinstance(idx, FakeTensor):
                out += list(_every_index(target.shape[dim:dim + idx.dim()], target.device).unbind(1))
            else:
                with _disable_current_modes():
                    out += list(idx.nonzero().unbind(1))
            dim += idx.dim()
        else:
            out.append(idx)
            dim += 1
    return out
