"""Optimizer and LR-scheduler state without pickle: tensors in a safetensors file, everything else as JSON.

`torch.save` pickles, and loading a pickle can run code; checkpoints travel between machines (Kaggle datasets,
shared folders), so they hold nothing that executes. A state dict becomes a JSON tree whose tensors are names in
the safetensors file; dicts keep their key types (optimizer states are keyed by int) and tuples stay tuples.
"""
from __future__ import annotations

import torch

SCALARS = (str, int, float, bool, type(None))


def encode(obj, tensors: dict[str, torch.Tensor], name: str = "s"):
    """`obj` as a JSON-able tree; tensors go into `tensors` under unique names. Anything else is a TypeError
    (a state that needs pickle is not stored)."""
    if isinstance(obj, torch.Tensor):
        key = f"{name}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, SCALARS):
                raise TypeError(f"state key {k!r} of type {type(k).__name__} cannot be stored without pickle")
        return {"dict": [[k, encode(v, tensors, f"{name}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, SCALARS):
        return obj
    raise TypeError(f"state value of type {type(obj).__name__} cannot be stored without pickle")


def decode(node, tensors: dict[str, torch.Tensor]):
    """The state `encode` wrote (KeyError/TypeError/ValueError for a tree it did not write)."""
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if isinstance(node, dict):
        (kind, value), = node.items()  # exactly one marker per JSON object
        if kind == "tensor":
            return tensors[value]
        if kind == "tuple":
            return tuple(decode(v, tensors) for v in value)
        if kind == "dict":
            return {k: decode(v, tensors) for k, v in value}
        raise ValueError(f"unknown state node {kind!r}")
    if isinstance(node, SCALARS):
        return node
    raise TypeError(f"unexpected state node of type {type(node).__name__}")
