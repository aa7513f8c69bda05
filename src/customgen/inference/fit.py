"""Batch size and VAE slicing/tiling from the predicted peak of one call, on the card a session runs on or under
a cap (`--cap-gib`): stylize, generate, evaluate and the demo ask here before each pipeline call.

The prediction is customgen.models.footprint's (the model's architecture on a fake CUDA device, cached per
architecture, size, batch, dtype and VAE mode) plus customgen.budget's fixed costs. The ladder, cheapest first:
as asked, VAE slicing (decodes one image at a time, the same pixels), a smaller batch (stylize only: generate's
images share one generator), VAE tiling (changes pixels slightly at tile seams). On a CPU without a cap nothing is
predicted and the call runs as asked. The active styles' own tensors are in it (a LoRA adapter, whether an artifact or
a file; new embedding rows; a file merged into the weights adds nothing). A ControlNet or an IP-Adapter the call
uses is in the prediction (its weights
and what it allocates: models.footprint.Addons).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from customgen.budget import GIB, total_bytes
from customgen.errors import UserError
from customgen.models.footprint import Addons, sampling_peak


@dataclass(frozen=True)
class SamplingFit:
    """What one call runs with, and the prediction behind it (None where nothing was predicted)."""

    batch: int
    slicing: bool = False
    tiling: bool = False
    predicted_bytes: int | None = None
    cap_bytes: int | None = None


def card_bytes(session, cap_gib: float | None) -> int | None:
    """The memory to plan for: --cap-gib, else the session's GPU; None on a CPU without a cap."""
    if cap_gib:
        return int(float(cap_gib) * GIB)
    device = session.comps.unet.device
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def styles_bytes(session) -> int:
    """What the active styles keep on the device beside the base weights (their kinds say: LoRA adapters, new
    embedding rows; a merged file nothing)."""
    active = session.active or ()
    return sum(session.loaded[key].kind.resident_bytes(session, session.loaded[key]) for key, _ in active
               if key in session.loaded)


def candidates(batch: int, split: bool) -> list[tuple[int, bool, bool]]:
    """(batch, slicing, tiling) from the fastest to the smallest footprint."""
    out = [(batch, False, False)] + ([(batch, True, False)] if batch > 1 else [])
    b = batch
    while split and b > 1:
        b = (b + 1) // 2
        out.append((b, b > 1, False))
    out.append((b, b > 1, True))
    return out


def ladder(comps, *, kind: str, size: tuple[int, int], batch: int, dtype: torch.dtype, split: bool = True,
           addons: Addons | None = None, styles: int = 0):
    """(batch, slicing, tiling, predicted bytes) of each candidate, fastest first: the card must hold that total
    (fixed costs included) for the candidate to run."""
    for b, slicing, tiling in candidates(batch, split):
        yield b, slicing, tiling, total_bytes(sampling_peak(comps, kind=kind, size=size, batch=b, dtype=dtype,
                                                            slicing=slicing, tiling=tiling, addons=addons) + styles)


def too_big(kind: str, size: tuple[int, int], need: int, batch: int, cap: int, split: bool) -> str:
    """The line when even the smallest candidate does not fit."""
    return (f"one {kind} call of {size[1]}x{size[0]} px needs {need / GIB:.2f} GiB on the GPU (predicted, VAE "
            f"tiling, batch {batch}), more than {cap / GIB:.2f} GiB: use a smaller --size"
            + ("" if split else " or fewer --num-images"))


def fit_sampling(session, *, kind: str, size: tuple[int, int], batch: int, cap_gib: float | None = None,
                 split: bool = True, addons: Addons | None = None) -> SamplingFit:
    """The first (batch, slicing, tiling) predicted to fit; one line when nothing does."""
    cap = card_bytes(session, cap_gib)
    if cap is None:
        return SamplingFit(batch)
    for b, slicing, tiling, need in ladder(session.comps, kind=kind, size=size, batch=batch,
                                           dtype=session.comps.unet.dtype, split=split, addons=addons,
                                           styles=styles_bytes(session)):
        if need <= cap:
            return SamplingFit(b, slicing, tiling, need, cap)
    raise UserError(too_big(kind, size, need, b, cap, split))


def use(session, fit: SamplingFit) -> None:
    """Switch the session's VAE to the fit's slicing and tiling (every call sets both, so none leaks into the next)."""
    vae = session.comps.vae
    vae.enable_slicing() if fit.slicing else vae.disable_slicing()
    vae.enable_tiling() if fit.tiling else vae.disable_tiling()
