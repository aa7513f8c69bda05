"""Peak GPU memory of one sampling call at a model's shapes, predicted on a fake CUDA device (customgen.peak).

    peak = sampling_peak(comps, kind="img2img", size=512, batch=2, dtype=torch.float16, slicing=True)

`sample_once` is what one stock pipeline call allocates: the prompt encoding (with classifier-free guidance), one
denoising step (every step peaks the same) and the VAE decode (sliced or tiled when asked), plus the VAE encode of
the input for img2img. It runs on the caller's modules (training validation: the run's own, adapters included);
`sampling_peak` builds the architecture from the components' configs (no weights) and caches its answer per
(architecture, kind, size, batch, dtype, slicing, tiling, add-ons), so a demo click costs a dictionary lookup.

Add-ons (`Addons`, by shape): a ControlNet runs the stock ControlNet img2img pipeline (its weights, its residuals
beside the UNet's); an IP-Adapter is loaded into the pipeline as stylize loads it (the session's state dict and the
attention processors' copies of it, the image encoder, one encoded style image).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import warnings
import weakref

from dataclasses import dataclass

import torch
from PIL import Image
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline,
                       UNet2DConditionModel)
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

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


@dataclass(frozen=True)
class Addons:
    """A sampling call's add-ons by shape, as JSON (hashable: part of the cache key): a ControlNet's config; an
    IP-Adapter's image-encoder config and state-dict shapes."""

    controlnet: str | None = None
    ip_adapter: str | None = None


def addon_shapes(controlnet=None, ip_adapter=None) -> Addons | None:
    """Addons of a loaded ControlNet and/or IP-Adapter (state, encoder, processor); None when neither is used."""
    if controlnet is None and ip_adapter is None:
        return None
    net = json.dumps(dict(controlnet.config), sort_keys=True, default=str) if controlnet is not None else None
    ip = None
    if ip_adapter is not None:
        state, encoder, _ = ip_adapter
        ip = json.dumps({"encoder": encoder.config.to_dict(),
                         "state": {p: {k: list(v.shape) for k, v in d.items()} for p, d in state.items()}},
                        sort_keys=True, default=str)
    return Addons(net, ip)


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
                guidance: float = CFG_GUIDANCE, controlnet=None, ip_adapter=None) -> None:
    """One stock pipeline call's allocations with the modules where they are: prompt, one DDIM step, VAE decode;
    with a ControlNet (img2img) and an IP-Adapter (state, encoder, processor) as stylize uses them.

    DDIM stands in for the request's scheduler: a scheduler's arithmetic is a few latent-sized tensors, and DDIM's
    step needs no data-dependent index lookup (the fake device has no values)."""
    height, width = (size, size) if isinstance(size, int) else size
    pipe = build_pipeline(comps, kind=kind) if controlnet is None else StableDiffusionControlNetImg2ImgPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        controlnet=controlnet, scheduler=comps.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=[""] * batch, guidance_scale=guidance, num_inference_steps=1, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(0))
    if controlnet is not None:
        common["control_image"] = [Image.new("RGB", (width, height))] * batch
    with _ip_loaded(pipe, ip_adapter) as ip_kwargs:
        if kind == "img2img":
            latents = pipe(image=[Image.new("RGB", (width, height))] * batch, strength=1.0, **common,
                           **ip_kwargs).images
        else:
            latents = pipe(height=height, width=width, **common, **ip_kwargs).images
    del pipe
    comps.vae.decode(latents / comps.vae.config.scaling_factor, return_dict=False)  # as the pipeline decodes


@contextlib.contextmanager
def _ip_loaded(pipe, ip_adapter):
    """The IP-Adapter loaded into `pipe` as stylize loads it (low_cpu_mem_usage off: accelerate's meta loading
    cannot make fake tensors), every block at scale 1 (stylize's InstantStyle scales turn some off: an upper bound);
    yields the call's extra arguments."""
    if ip_adapter is None:
        yield {}
        return
    state, encoder, processor = ip_adapter
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    pipe.load_ip_adapter(state, subfolder=None, weight_name="ip-adapter.safetensors", image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    try:
        yield {"ip_adapter_image": Image.new("RGB", (encoder.config.image_size,) * 2)}
    finally:
        pipe.unload_ip_adapter()


def sampling_peak(comps: Components, *, kind: str, size: int | tuple[int, int], batch: int, dtype: torch.dtype,
                  slicing: bool = False, tiling: bool = False, addons: Addons | None = None) -> int:
    """Peak bytes on the GPU of one call with `comps`' architecture in `dtype` (weights included, the add-ons' too)
    at `size` (a side, or (height, width)), cached."""
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return _cached_peak(shape_key(comps), _Arch(comps), kind, hw, int(batch), dtype, bool(slicing), bool(tiling),
                        addons)


class _Arch:
    """Components passed through the cache without being part of its key (the key is their shape hash), by a weak
    reference: the cache keeps the first caller's `_Arch`, and a strong one would keep a dropped session's weights
    (GBs at SD v1.5) alive for as long as the process runs. Only a cache miss reads it, while its caller holds them."""

    def __init__(self, comps: Components):
        self.comps = weakref.ref(comps)

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Arch)


@functools.lru_cache(maxsize=256)
def _cached_peak(key: str, arch: _Arch, kind: str, size: tuple[int, int], batch: int, dtype: torch.dtype,
                 slicing: bool, tiling: bool, addons: Addons | None = None) -> int:
    comps = architecture(arch.comps())
    with quiet(), fake_cuda() as mode, LiveBytes("cuda") as live:
        for m in (comps.unet, comps.vae, comps.text_encoder):
            materialize(m, "cuda", dtype, mode)
            live.add_all(m)
        controlnet, ip_adapter = _fake_addons(addons, dtype, mode, live)
        if slicing:
            comps.vae.enable_slicing()
        if tiling:
            comps.vae.enable_tiling()
        with torch.no_grad():  # what inference_mode allocates too (fake tensors refuse inference-mode copies)
            sample_once(comps, kind=kind, size=size, batch=batch, controlnet=controlnet, ip_adapter=ip_adapter)
        return live.peak


def _fake_addons(addons: Addons | None, dtype: torch.dtype, mode, live: LiveBytes) -> tuple:
    """The add-ons as fake CUDA modules (counted), built from their shapes: (ControlNet | None, IP-Adapter | None)."""
    if addons is None:
        return None, None
    net = ip = None
    if addons.controlnet is not None:
        with torch.device("meta"):
            net = ControlNetModel.from_config(json.loads(addons.controlnet))
        materialize(net, "cuda", dtype, mode)
        live.add_all(net)
    if addons.ip_adapter is not None:
        spec = json.loads(addons.ip_adapter)
        with torch.device("meta"):
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(spec["encoder"]))
        materialize(encoder, "cuda", dtype, mode)
        live.add_all(encoder)
        with torch.device("cuda"):  # the session's copy of the state dict, on the device (inference.adapters)
            state = {p: {k: torch.empty(shape, dtype=dtype) for k, shape in d.items()}
                     for p, d in spec["state"].items()}
        size = encoder.config.image_size
        ip = (state, encoder, CLIPImageProcessor(size=size, crop_size=size))
    return net, ip
