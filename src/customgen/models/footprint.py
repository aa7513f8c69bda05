"""Peak GPU memory of one sampling call at a model's shapes, predicted on a fake CUDA device (customgen.peak).

    peak = sampling_peak(comps, kind="img2img", size=512, batch=2, dtype=torch.float16, slicing=True)

`sample_once` is what one stock pipeline call allocates: the prompt encoding (with classifier-free guidance), one
denoising step (every step peaks the same) and the VAE decode (sliced or tiled when asked), plus the VAE encode of
the input for img2img. It runs on the caller's modules (training validation: the run's own, adapters included);
`sampling_peak` builds the architecture from the components' configs (no weights) and caches its answer per
(architecture, kind, size, batch, dtype, slicing, tiling), so a demo click costs a dictionary lookup.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import warnings

import torch
from PIL import Image
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from customgen.models.builders import Components
from customgen.models.loading import quiet_loading
from customgen.models.pipelines import build_pipeline
from customgen.peak import LiveBytes, fake_cuda, materialize

CFG_GUIDANCE = 7.5  # any guidance > 1 doubles the UNet batch (classifier-free guidance); its value costs nothing


@contextlib.contextmanager
def quiet():
    """A count runs real code: its libraries' chatter (dtype casts, random-weight loss networks) is not the user's."""
    previous = logging.root.manager.disable
    with quiet_loading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def architecture(comps: Components) -> Components:
    """The same architecture without weights (meta tensors): configs, tokenizer and schedulers of `comps`."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(comps.unet.config)
        vae = AutoencoderKL.from_config(comps.vae.config)
        text_encoder = CLIPTextModel(copy.deepcopy(comps.text_encoder.config))
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=comps.tokenizer,
                      noise_scheduler=comps.noise_scheduler, scheduler=comps.scheduler, ref=comps.ref, kind=comps.kind)


def shape_key(comps: Components) -> str:
    """A short hash of the three modules' configs: what the memory of a call depends on besides its settings."""
    configs = [dict(comps.unet.config), dict(comps.vae.config), comps.text_encoder.config.to_dict()]
    blob = json.dumps(configs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sample_once(comps: Components, *, kind: str, size: int | tuple[int, int], batch: int,
                guidance: float = CFG_GUIDANCE) -> None:
    """One stock pipeline call's allocations with the modules where they are: prompt, one DDIM step, VAE decode.

    DDIM stands in for the request's scheduler: a scheduler's arithmetic is a few latent-sized tensors, and DDIM's
    step needs no data-dependent index lookup (the fake device has no values)."""
    height, width = (size, size) if isinstance(size, int) else size
    pipe = build_pipeline(comps, kind=kind)
    pipe.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=[""] * batch, guidance_scale=guidance, num_inference_steps=1, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(0))
    if kind == "img2img":
        latents = pipe(image=[Image.new("RGB", (width, height))] * batch, strength=1.0, **common).images
    else:
        latents = pipe(height=height, width=width, **common).images
    del pipe
    comps.vae.decode(latents / comps.vae.config.scaling_factor, return_dict=False)  # as the pipeline decodes


def sampling_peak(comps: Components, *, kind: str, size: int | tuple[int, int], batch: int, dtype: torch.dtype,
                  slicing: bool = False, tiling: bool = False) -> int:
    """Peak bytes on the GPU of one call with `comps`' architecture in `dtype` (weights included) at `size` (a side,
    or (height, width)), cached."""
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return _cached_peak(shape_key(comps), _Arch(comps), kind, hw, int(batch), dtype, bool(slicing), bool(tiling))


class _Arch:
    """Components passed through the cache without being part of its key (the key is their shape hash)."""

    def __init__(self, comps: Components):
        self.comps = comps

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Arch)


@functools.lru_cache(maxsize=256)
def _cached_peak(key: str, arch: _Arch, kind: str, size: tuple[int, int], batch: int, dtype: torch.dtype,
                 slicing: bool, tiling: bool) -> int:
    comps = architecture(arch.comps)
    with quiet(), fake_cuda() as mode, LiveBytes("cuda") as live:
        for m in (comps.unet, comps.vae, comps.text_encoder):
            materialize(m, "cuda", dtype, mode)
            live.add_all(m)
        if slicing:
            comps.vae.enable_slicing()
        if tiling:
            comps.vae.enable_tiling()
        with torch.no_grad():  # what inference_mode allocates too (fake tensors refuse inference-mode copies)
            sample_once(comps, kind=kind, size=size, batch=batch)
        return live.peak
