"""Backward for fake CUDA tensors, driven from Python: torch's engine needs a real CUDA context for them
(pytorch/pytorch#92627). Nodes run in the engine's order (highest sequence number first; a Python autograd.Function's
node, such as peft's LoHa weight, through its `apply`), gradients are reduced and cast as the engine's
validate_outputs does, accumulated in place where the engine would, and each node's saved tensors are released right
after it runs (through saved-tensor hooks, which keep values, not the tensors' graph), without grad mode, as the
engine runs them."""
from __future__ import annotations

import heapq
import weakref

import torch

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
        # The values only: a saved output would hold its own node (node → box → tensor → node, a cycle through C++
        # that gc cannot see), so a graph never run backward (peft's DoRA init) would stay alive.
        box = _Box(tensor.detach())
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


SAVED = _SavedTensors()


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


def graph_task_id() -> int:
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
            outs = node(*inputs_) if callable(node) else node.apply(*inputs_)  # a Python Function's node: .apply
        del inputs_
        SAVED.release(node._sequence_nr())
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
