"""DINO ViT-S/16 image embeddings (Caron et al. 2021), the identity features DreamBooth scores subjects with
(Ruiz et al. 2023): the CLS token of the last layer of transformers' `ViTModel`.

Weights come from a local folder (a `save_pretrained` copy of facebook/dino-vits16), the Hugging Face cache, or a
download when online; otherwise a seeded random ViT-S/16 is built from a config and marked smoke, as the other
metric networks do (customgen.metrics.networks).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from customgen.memory import seeded
from customgen.metrics.loading import default_device, quiet
from customgen.network import hub_reachable, is_offline

log = logging.getLogger("customgen.metrics")

DINO_MODEL = "facebook/dino-vits16"  # DINO ViT-S/16, the network of the DreamBooth paper's DINO score
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINO's normalisation
DINO_SIZE = 224  # input side of facebook/dino-vits16 (its preprocessor_config.json)
# ViT-S/16 (width 384, 12 layers, 6 heads, MLP 1536, patch 16) at 64-px input for smoke runs: the same network
# code and depth on 4×4 patches, so offline runs stay fast. Random weights: numbers are plumbing checks.
SMOKE_DINO = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  patch_size=16, image_size=64)
PREPROCESSOR = "preprocessor_config.json"


class DinoEncoder:
    """A ViTModel as an ImageEncoder: RGB images → CLS embeddings of the last layer (N, hidden size)."""

    def __init__(self, model: torch.nn.Module, processor, *, name: str, smoke: bool, source: str, device: str):
        self.model, self.processor = model.float().eval().to(device), processor
        self.name, self.smoke, self.source, self.device = name, smoke, source, device

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)  # (B, 3, S, S)
        return self.model(pixel_values=x).last_hidden_state[:, 0].float().cpu().numpy()  # (B, D)


def dino_processor(size: int = DINO_SIZE) -> ViTImageProcessor:
    """Resize to size × size (bilinear), scale to [0, 1], ImageNet normalisation: facebook/dino-vits16's settings."""
    return ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, do_normalize=True,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def load_dino(ref: str, *, local_files_only: bool) -> tuple[torch.nn.Module, ViTImageProcessor]:
    """ViTModel (no pooler: DINO has none) and its image processor from a folder or a Hub id."""
    model = ViTModel.from_pretrained(ref, add_pooling_layer=False, local_files_only=local_files_only)
    folder = Path(ref)
    if folder.is_dir() and not (folder / PREPROCESSOR).is_file():
        return model, dino_processor(int(model.config.image_size))
    return model, ViTImageProcessor.from_pretrained(ref, local_files_only=local_files_only)


def _real_dino(model: str, offline: bool) -> tuple | None:
    """(model, processor, source) from a local folder, the Hub cache, or a download (online); None if unavailable."""
    if Path(model).expanduser().is_dir():
        folder = str(Path(model).expanduser().resolve())
        return (*load_dino(folder, local_files_only=True), f"folder:{folder}")
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return (*load_dino(model, local_files_only=True), f"cache:{model}")
    if offline or not hub_reachable():
        return None
    return (*load_dino(model, local_files_only=False), f"download:{model}")


def build_dino_encoder(*, model: str = DINO_MODEL, device: str | None = None, smoke: bool = False,
                       offline: bool | None = None, seed: int = 0) -> DinoEncoder:
    """DINO with real weights if available (folder, cache, download), else a seeded random ViT-S/16 (smoke)."""
    device = device or default_device()
    reason = "smoke mode requested"
    if not smoke:
        try:
            real = _real_dino(model, is_offline(offline))
            if real is not None:
                m, processor, source = real
                return DinoEncoder(m, processor, name=f"dino:{model}", smoke=False, source=source, device=device)
            reason = f"no local folder or cached weights for {model} and offline (or huggingface.co unreachable)"
        except Exception as e:  # network, file or config failure: fall back, say why
            reason = f"loading {model} failed ({type(e).__name__}: {str(e)[:120]})"
        log.warning("metrics: DINO uses a random ViT-S/16 (smoke, numbers are plumbing checks): %s", reason)
    with seeded(seed), quiet():
        m = ViTModel(ViTConfig(**SMOKE_DINO), add_pooling_layer=False)
    return DinoEncoder(m, dino_processor(SMOKE_DINO["image_size"]), name=f"dino:vit-s16-64px-random-seed{seed}",
                       smoke=True, source=f"random ({reason})", device=device)
