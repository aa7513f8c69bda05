"""Adapter validation on load: every tensor of a style's weights file is checked against the base model before
any of it reaches the pipeline, so a broken file is one line naming the file, the tensor and what to do, never a
traceback from deep inside peft or a silent black image.

Checks (header first, values last): a readable safetensors file; floating-point dtypes (F16/BF16/F32/F64 are
cast by the loaders; integers and booleans are refused); the expected number of dimensions; shapes against the
target layers of this model (LoRA in/out features and matching ranks, TI embedding width, DreamBooth parameter
shapes); finite values (a NaN or inf weight turns every output into a flat black image).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from customgen.errors import UserError
from customgen.kinds.files import readable

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names the loaders cast to the model's dtype
RETRAIN = "retrain the style or re-copy its folder"
LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora\.down|lora\.up|lora_linear_layer\.down|"
                      r"lora_linear_layer\.up|lora_A|lora_B)\.weight$")


def refuse(path: Path, what: str) -> UserError:
    """One line: the file, what is wrong with it, what to do."""
    return UserError(f"{path}: {what}; {RETRAIN}")


def check_dtype(path: Path, key: str, dtype: str) -> None:
    """Floating-point weights only (the loaders cast them); integer or boolean weights are not an adapter."""
    if dtype not in FLOAT_DTYPES:
        raise refuse(path, f"tensor {key} has dtype {dtype}, adapter weights must be floating point "
                           f"({', '.join(FLOAT_DTYPES)})")


def check_finite(path: Path, keys: list[str] | None = None) -> None:
    """Every value finite, read one tensor at a time (NaN/inf weights give flat black images)."""
    with readable(path) as f:
        for key in f.keys() if keys is None else keys:
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise refuse(path, f"tensor {key} holds NaN or infinite values (a diverged or damaged training)")


def check_finite_state(path: Path, state: dict) -> None:
    """`check_finite` for tensors already in memory (DreamBooth loads its whole file at once)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise refuse(path, f"tensor {key} holds NaN or infinite values (a diverged or damaged training)")


def _lora_alphas(path: Path, metadata: dict | None) -> None:
    """The rank/alpha metadata diffusers reads back: alpha must be a finite number (NaN scales every output)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except ValueError:
        raise refuse(path, "its lora_adapter_metadata is not valid JSON") from None
    for key, value in meta.items() if isinstance(meta, dict) else ():
        if key.endswith("lora_alpha") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not math.isfinite(value)):
            raise refuse(path, f"metadata {key} is {value!r}, not a finite number")


def _lora_layer(path: Path, modules: dict, owner: str, module_path: str):
    """The target layer, with or without CLIPTextModel's `text_model.` level (whether the installed transformers
    has it varies; both forms name the same layer)."""
    for candidate in (module_path, module_path.removeprefix("text_model."), f"text_model.{module_path}"):
        try:
            return modules[owner].get_submodule(candidate)
        except AttributeError:
            continue
    raise UserError(f"{path}: layer {owner}.{module_path} is not in this model "
                    "(the style was trained for another base model)")


def _lora_matrix(path: Path, key: str, shape: list, part: str, layer) -> tuple[int, int]:
    """(rank, features) of one LoRA matrix: down/A is (r, in[, k, k]), up/B is (out, r[, 1, 1])."""
    layer = getattr(layer, "base_layer", layer)  # a layer peft already wrapped for another LoRA style
    want_ndim = 4 if isinstance(layer, torch.nn.Conv2d) else 2
    if len(shape) != want_ndim:
        raise refuse(path, f"tensor {key} has {len(shape)} dimension(s) {tuple(shape)}, a LoRA matrix for this "
                           f"layer has {want_ndim}")
    down = part.endswith(("down", "_A"))
    rank, features = (shape[0], shape[1]) if down else (shape[1], shape[0])
    want = getattr(layer, ("in_features" if down else "out_features"),
                   getattr(layer, "in_channels" if down else "out_channels", None))
    if want is not None and want != features:
        raise UserError(f"{path}: {key} has {features} features in the style but {want} in this model "
                        "(the style was trained for another base model)")
    return rank, features


def check_lora(path: Path, modules: dict) -> None:
    """A LoRA file against this model: float 2-D matrices whose in/out features match their layers, the same
    rank in each down/up pair, finite values and alpha; at least one matrix for a layer of this model."""
    ranks: dict[str, dict[str, int]] = {}
    with readable(path) as f:
        _lora_alphas(path, f.metadata())
        for key in f.keys():
            m = LORA_KEY.match(key)
            if not m or modules.get(m.group(1)) is None:
                continue
            owner, module_path, part = m.groups()
            layer = _lora_layer(path, modules, owner, module_path)
            tensor = f.get_slice(key)
            check_dtype(path, key, tensor.get_dtype())
            rank, _ = _lora_matrix(path, key, tensor.get_shape(), part, layer)
            ranks.setdefault(f"{owner}.{module_path}", {})[part] = rank
    if not ranks:
        raise refuse(path, "holds no LoRA matrices for this model's layers")
    for module, by_part in ranks.items():
        if len(set(by_part.values())) > 1:
            raise refuse(path, f"{module} has LoRA matrices of different ranks {sorted(by_part.values())}")
    check_finite(path)


def check_embeddings(path: Path, dim: int) -> None:
    """Textual Inversion vectors: float, (dim,) or (n_vectors, dim) with this text encoder's width, finite."""
    with readable(path) as f:
        keys = list(f.keys())
        if not keys:
            raise refuse(path, "holds no embedding")
        for key in keys:
            tensor = f.get_slice(key)
            check_dtype(path, key, tensor.get_dtype())
            shape = tensor.get_shape()
            if len(shape) not in (1, 2) or 0 in shape:
                raise refuse(path, f"embedding {key} has shape {tuple(shape)}, expected (n_vectors, {dim})")
            if shape[-1] != dim:
                raise UserError(f"{path}: embedding width {shape[-1]}, this text encoder has {dim} "
                                "(the style was trained for another base model)")
    check_finite(path, keys)


def check_weights(path: Path, params: dict) -> None:
    """Full weights (DreamBooth) from the header: every key a parameter of this model, same shape, float."""
    with readable(path) as f:
        keys = list(f.keys())
        if not keys:
            raise refuse(path, "holds no weights")
        for key in keys:
            if key not in params:
                raise UserError(f"{path}: key {key} is not in this UNet (was it trained on another base model?)")
            tensor = f.get_slice(key)
            check_dtype(path, key, tensor.get_dtype())
            shape = tuple(tensor.get_shape())
            if shape != tuple(params[key].shape):
                raise UserError(f"{path}: {key} has shape {shape}, this UNet has {tuple(params[key].shape)} "
                                "(the style was trained for another base model)")
