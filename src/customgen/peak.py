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
- backward runs in `backward()` below: torch's engine needs a real CUDA context for fake CUDA tensors
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
import heapq
import math
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

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


class _Values(TorchDispatchMode):
    """Values where the code needs them: ops on CPU tensors with no fake input run for real (data order, random
    draws, optimizer step counters, masks keep their values); data-dependent reads of fake tensors take their worst
    case (a count is 1, a check passes, a boolean mask keeps every element)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if not any(isinstance(a, FakeTensor) for a in leaves):
            if _on_cpu(leaves, kwargs) and _small(func, args, kwargs, leaves):
                with _disable_current_modes():
                    return func(*args, **kwargs)
            return func(*args, **kwargs)
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            t = args[0]
            return True if t.dtype == torch.bool or func is aten.is_nonzero.default else (
                1.0 if t.is_floating_point() else 1)
        if func is aten.nonzero.default:
            return _every_index(args[0].shape, args[0].device)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            args = (args[0], _long_indices(args[0], args[1]), *args[2:])
        return func(*args, **kwargs)


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


class _Box:
    """One packed saved tensor; the node holds the box, the registry only a weak reference to it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class _SavedTensors:
    """Saved-tensor hooks that let the Python backward release a node's saved tensors after it ran (what the
    engine's release_variables does): each box is filed under the sequence number of the node that saved it."""

    def __init__(self):
        self.by_node: dict[int, list] = {}

    def pack(self, tensor):
        box = _Box(tensor)
        seq = torch._C._autograd._get_sequence_nr() - 1  # the node being built took the last number
        self.by_node.setdefault(seq, []).append(weakref.ref(box))
        return box

    def unpack(self, box):
        return box.tensor

    def release(self, seq: int) -> None:
        for ref in self.by_node.pop(seq, []):
            box = ref()
            if box is not None:
                box.tensor = None


_SAVED = _SavedTensors()


def _dependencies(roots: list) -> dict:
    """How many edges point to each node reachable from `roots`."""
    deps, seen, stack = {}, set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                deps[nxt] = deps.get(nxt, 0) + 1
                stack.append(nxt)
    return deps


def _accumulate(slot: dict, nr: int, grad, owners: dict) -> None:
    """Add `grad` into a node's input buffer, in place where nothing else holds the old gradient."""
    old = slot.get(nr)
    if old is None:
        slot[nr] = grad
        owners[id(grad)] = owners.get(id(grad), 0) + 1
    elif owners.get(id(old), 0) == 1 and old._base is None and old is not grad and old.shape == grad.shape:
        old.add_(grad)
    else:
        owners[id(old)] -= 1
        slot[nr] = old + grad
        owners[id(slot[nr])] = 1


_TASK = [-1]  # the id of the Python backward running now (-1: none), what checkpoint asks the engine for


def _graph_task_id() -> int:
    """torch._C._current_graph_task_id for the Python backward: non-reentrant checkpointing recomputes a region
    once per graph task, and outside the C++ engine torch would give every unpack a new id."""
    return _TASK[-1]


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **_):
    """torch.autograd.backward for fake tensors, driven from Python (see the module docstring)."""
    _TASK.append(max(_TASK) + 1)
    try:
        _run_backward(tensors, grad_tensors)
    finally:
        _TASK.pop()


def _run_backward(tensors, grad_tensors) -> None:
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    grads = [grad_tensors] if isinstance(grad_tensors, torch.Tensor) else list(grad_tensors or [None] * len(tensors))
    buffers, owners = {}, {}
    for t, g in zip(tensors, grads):
        if t.grad_fn is not None:
            _accumulate(buffers.setdefault(t.grad_fn, {}), t.output_nr, torch.ones_like(t) if g is None else g, owners)
    deps = _dependencies(list(buffers))
    ready = [(-n._sequence_nr(), id(n), n) for n in buffers if deps.get(n, 0) == 0]
    heapq.heapify(ready)
    del tensors, grads
    while ready:
        node = heapq.heappop(ready)[2]
        slot = buffers.pop(node, {})
        for g in slot.values():
            owners[id(g)] = owners.get(id(g), 1) - 1
        inputs_ = [slot.get(i) for i in range(len(node._input_metadata))]
        del slot
        with torch.no_grad():  # as the engine runs nodes without create_graph: no graph of the backward itself
            outs = node(*inputs_)
        del inputs_
        _SAVED.release(node._sequence_nr())
        for (nxt, nr), g in zip(node.next_functions, outs if isinstance(outs, tuple) else (outs,)):
            if nxt is None:
                continue
            if g is not None:
                meta = nxt._input_metadata[nr]
                if tuple(g.shape) != tuple(meta.shape):
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
                _accumulate(buffers.setdefault(nxt, {}), nr, g, owners)
            deps[nxt] -= 1
            if deps[nxt] == 0:
                heapq.heappush(ready, (-nxt._sequence_nr(), id(nxt), nxt))
        deps.pop(node, None)
        del outs, node


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
        stack.enter_context(_patched(torch._C, "_current_graph_task_id", _graph_task_id))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_SAVED.pack, _SAVED.unpack))
        stack.enter_context(mode)
        stack.enter_context(_Values())
        yield mode
