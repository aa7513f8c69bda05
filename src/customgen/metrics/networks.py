"""Metric networks (CLIP, LPIPS backbone, Inception, DINO): real weights when cached or downloadable, else smoke.

Every builder looks for weights in the local caches first and never touches the network when offline
(``offline=True`` or ``HF_HUB_OFFLINE=1``); without weights it builds a seeded random network, marks it
``smoke=True`` and logs one line saying so. Numbers from smoke networks check plumbing, not quality.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from torchvision.models import AlexNet_Weights, VGG16_Weights

from customgen.memory import seeded
from customgen.metrics.dino_network import DINO_MODEL, DinoEncoder, build_dino_encoder
from customgen.metrics.features import FeatureCache, ImageEncoder
from customgen.metrics.loading import default_device, hub_checkpoint, quiet
from customgen.network import hub_reachable, is_offline, reachable  # noqa: F401 - reachable: re-exported

log = logging.getLogger("customgen.metrics")

# Tiny ViT for smoke CLIP: same open_clip code path as ViT-B-32, ~3M parameters, 64 px input.
SMOKE_CLIP_KWARGS = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
)
# torch-fidelity's FID Inception weights (what torchmetrics' FrechetInceptionDistance loads).
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------- CLIP (open_clip)
class OpenClipEmbedder:
    """open_clip image tower as an ImageEncoder, and its text tower for CLIP-T (Radford et al. 2021; Cherti et
    al. 2023). `arch` is the open_clip model name whose tokenizer the text tower reads."""

    def __init__(self, model: torch.nn.Module, preprocess, *, name: str, smoke: bool, source: str, device: str,
                 arch: str = "ViT-B-32"):
        self.model, self.preprocess, self.arch = model.eval().to(device), preprocess, arch
        self.name, self.smoke, self.source, self.device = name, smoke, source, device

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, S, S)
        return self.model.encode_image(x).float().cpu().numpy()  # (B, D)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text features (N, D) in the image features' space."""
        import open_clip  # lazy: open_clip is heavy and only needed when CLIP metrics run

        tokens = open_clip.get_tokenizer(self.arch)(list(texts)).to(self.device)  # (N, 77)
        return self.model.encode_text(tokens).float().cpu().numpy()  # (N, D)


def cached_clip_checkpoint(model: str, pretrained: str, cache_dir: str | None = None) -> str | None:
    """Local file for open_clip weights (a path, or the HF-hub cache entry for a tag), without downloading."""
    import open_clip  # lazy: open_clip is heavy and only needed when CLIP metrics run
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME  # lazy: as above

    if os.path.isfile(pretrained):
        return pretrained
    hf_hub = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "")
    if not hf_hub:
        return None
    repo_id, filename = os.path.split(hf_hub)
    names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else [filename]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _real_clip(model: str, pretrained: str, cache_dir: str | None, offline: bool):
    """(model, preprocess, source) from cached weights, a download (online), or None if unavailable."""
    import open_clip  # lazy: open_clip is heavy and only needed when CLIP metrics run

    if model.startswith(("local-dir:", "hf-hub:")):
        if model.startswith("hf-hub:") and offline:
            return None
        m, _, pre = open_clip.create_model_and_transforms(model, cache_dir=cache_dir)
        return m, pre, model
    path = cached_clip_checkpoint(model, pretrained, cache_dir)
    if path is not None:
        cfg = open_clip.get_pretrained_cfg(model, pretrained)  # {} for a file path
        pp = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        m, _, pre = open_clip.create_model_and_transforms(  # the tag's preprocessing and QuickGELU, no download
            model, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu", False)), **pp)
        return m, pre, f"file:{path}"
    if offline or not hub_reachable():
        return None
    m, _, pre = open_clip.create_model_and_transforms(model, pretrained=pretrained, cache_dir=cache_dir)
    return m, pre, f"download:{pretrained}"


def build_clip_embedder(*, model: str = "ViT-B-32", pretrained: str = "openai", cache_dir: str | None = None,
                        device: str | None = None, smoke: bool = False, offline: bool | None = None,
                        seed: int = 0) -> OpenClipEmbedder:
    """open_clip embedder with real weights if available, else a tiny seeded random one (smoke)."""
    import open_clip  # lazy: open_clip is heavy and only needed when CLIP metrics run

    device = device or default_device()
    reason = "smoke mode requested"
    if not smoke:
        try:
            real = _real_clip(model, pretrained, cache_dir, is_offline(offline))
            if real is not None:
                m, pre, source = real
                return OpenClipEmbedder(m, pre, name=f"open_clip:{model}:{pretrained}", smoke=False,
                                        source=source, device=device, arch=model)
            reason = f"no cached weights for {model}/{pretrained} and offline (or huggingface.co unreachable)"
        except Exception as e:  # network, checksum or config failure: fall back, say why
            reason = f"loading {model}/{pretrained} failed ({type(e).__name__}: {str(e)[:120]})"
        log.warning("metrics: CLIP uses a tiny random ViT (smoke, numbers are plumbing checks): %s", reason)
    with seeded(seed), quiet():
        m, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, **SMOKE_CLIP_KWARGS)
    return OpenClipEmbedder(m, pre, name=f"open_clip:tiny-random-seed{seed}", smoke=True,
                            source=f"random ({reason})", device=device)


# ---------------------------------------------------------------- LPIPS backbone
class LpipsScorer:
    """lpips.LPIPS wrapped: two (H, W, 3) float images in [0, 1] → distance (Zhang et al. 2018).

    `features` and `distance` split lpips.LPIPS.forward (same operations, same order) so a reference's backbone
    features are computed once for all the outputs compared with it, and outputs go through in batches."""

    def __init__(self, model: torch.nn.Module, *, net: str, smoke: bool, source: str, device: str):
        self.model, self.net, self.smoke, self.source, self.device = model.eval().to(device), net, smoke, source, device

    @torch.inference_mode()
    def features(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Unit-normalised backbone features per layer, each (B, C_l, h_l, w_l), of (H, W, 3) images in [0, 1]."""
        import lpips as lpips_pkg  # lazy: only when LPIPS is asked for

        x = torch.stack([torch.from_numpy(np.ascontiguousarray(a)).float().permute(2, 0, 1) for a in images])
        x = 2 * x.to(self.device) - 1  # (B, 3, H, W) in [-1, 1], as LPIPS(normalize=True)
        return [lpips_pkg.normalize_tensor(f) for f in self.model.net.forward(self.model.scaling_layer(x))]

    @torch.inference_mode()
    def distance(self, feats: list[torch.Tensor], reference: list[torch.Tensor]) -> np.ndarray:
        """Distances (B,) between features and a reference's features (batch 1, broadcast)."""
        from lpips.lpips import spatial_average  # lazy: as above

        val = 0
        for lin, f, r in zip(self.model.lins, feats, reference):
            val += spatial_average(lin((f - r) ** 2), keepdim=True)
        return val.flatten().float().cpu().numpy()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.distance(self.features([a]), self.features([b]))[0])


def build_lpips_scorer(*, net: str = "alex", device: str | None = None, smoke: bool = False,
                       offline: bool | None = None, seed: int = 0) -> LpipsScorer:
    """LPIPS with torchvision ImageNet backbone if cached/downloadable, else a random backbone (smoke)."""
    import lpips as lpips_pkg  # lazy: only when LPIPS is asked for (loss or metric)

    urls = {"alex": AlexNet_Weights.IMAGENET1K_V1.url, "vgg": VGG16_Weights.IMAGENET1K_V1.url}
    if net not in urls:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {sorted(urls)}")
    device = device or default_device()
    reason = "smoke mode requested"
    if not smoke:
        cached = hub_checkpoint(urls[net])
        if cached is None and is_offline(offline):
            reason = f"no cached {net} backbone in {Path(torch.hub.get_dir()) / 'checkpoints'} and offline"
        else:
            try:
                with quiet():  # torchvision reads the hub cache first, downloads only when missing
                    m = lpips_pkg.LPIPS(net=net, pnet_rand=False, verbose=False)
                return LpipsScorer(m, net=net, smoke=False, source=str(cached or urls[net]), device=device)
            except Exception as e:
                reason = f"loading the {net} backbone failed ({type(e).__name__}: {str(e)[:120]})"
        log.warning("metrics: LPIPS uses a random %s backbone (smoke, numbers are plumbing checks): %s", net, reason)
    with seeded(seed), quiet():  # linear heads still load from the lpips package; only the trunk is random
        m = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False)
    return LpipsScorer(m, net=net, smoke=True, source=f"random backbone ({reason})", device=device)


# ---------------------------------------------------------------- FID/KID features
class SmokeCNN:
    """Seeded random 3-layer CNN, 64-d pooled features: offline stand-in for Inception (smoke only)."""

    def __init__(self, *, seed: int = 0, device: str = "cpu"):
        with seeded(seed):
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            ).eval().to(device)
        self.name, self.smoke, self.device = f"smoke-cnn-64d-seed{seed}", True, device
        self.source = "random"

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = torch.stack([torch.from_numpy(np.asarray(im.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0)
                         .permute(2, 0, 1) for im in images]).to(self.device)  # (B, 3, 64, 64)
        return self.net(x).cpu().numpy()  # (B, 64)


class InceptionEncoder:
    """torchmetrics' FID Inception-v3 (torch-fidelity weights), 2048-d pool features (Heusel et al. 2017)."""

    def __init__(self, model: torch.nn.Module, *, source: str, device: str):
        self.model, self.source, self.device = model.eval().to(device), source, device
        self.name, self.smoke = "inception-v3-compat-2048", False

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for im in images:  # one at a time: sizes may differ; the network resizes to 299 itself
            x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)[None].to(self.device)  # (1, 3, H, W)
            out.append(self.model(x).float().cpu().numpy())  # (1, 2048)
        return np.concatenate(out)


def build_inception_encoder(*, device: str | None = None, smoke: bool = False, offline: bool | None = None,
                            seed: int = 0) -> ImageEncoder:
    """FID Inception if torch-fidelity and its weights are available, else SmokeCNN (smoke)."""
    device = device or default_device()
    reason = "smoke mode requested"
    if not smoke:
        try:
            import torch_fidelity  # noqa: F401 - lazy: optional; torchmetrics' Inception needs it
        except ImportError:
            reason = "torch-fidelity is not installed (pip install torch-fidelity)"
        else:
            cached = hub_checkpoint(FID_INCEPTION_FILE)
            if cached is None and is_offline(offline):
                reason = f"no cached {FID_INCEPTION_FILE} and offline"
            else:
                try:
                    from torchmetrics.image.fid import NoTrainInceptionV3  # lazy: needs torch-fidelity (above)

                    m = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                           feature_extractor_weights_path=str(cached) if cached else None)
                    return InceptionEncoder(m, source=str(cached or "download"), device=device)
                except Exception as e:
                    reason = f"loading Inception failed ({type(e).__name__}: {str(e)[:120]})"
        log.warning("metrics: FID/KID use a random small CNN (smoke, numbers are plumbing checks): %s", reason)
    enc = SmokeCNN(seed=seed, device=device)
    enc.source = f"random ({reason})"
    return enc


# ---------------------------------------------------------------- the bundle
class MetricNetworks:
    """Lazily built metric networks sharing one feature cache; each falls back to smoke on its own."""

    def __init__(self, *, smoke: bool = False, offline: bool | None = None, device: str | None = None,
                 clip_model: str = "ViT-B-32", clip_pretrained: str = "openai", clip_cache_dir: str | None = None,
                 feature_cache_dir: str | Path | None = None, seed: int = 0, dino_model: str = DINO_MODEL):
        self.force_smoke, self.offline, self.device, self.seed = smoke, offline, device or default_device(), seed
        self.clip_model, self.clip_pretrained, self.clip_cache_dir = clip_model, clip_pretrained, clip_cache_dir
        self.dino_model = dino_model
        self.feature_cache = FeatureCache(feature_cache_dir)
        self._clip: OpenClipEmbedder | None = None
        self._dino: DinoEncoder | None = None
        self._lpips: dict[str, LpipsScorer] = {}
        self._inception: ImageEncoder | None = None

    @property
    def clip(self) -> OpenClipEmbedder:
        if self._clip is None:
            self._clip = build_clip_embedder(
                model=self.clip_model, pretrained=self.clip_pretrained, cache_dir=self.clip_cache_dir,
                device=self.device, smoke=self.force_smoke, offline=self.offline, seed=self.seed)
        return self._clip

    def lpips(self, net: str = "alex") -> LpipsScorer:
        if net not in self._lpips:
            self._lpips[net] = build_lpips_scorer(net=net, device=self.device, smoke=self.force_smoke,
                                                  offline=self.offline, seed=self.seed)
        return self._lpips[net]

    @property
    def inception(self) -> ImageEncoder:
        if self._inception is None:
            self._inception = build_inception_encoder(device=self.device, smoke=self.force_smoke,
                                                      offline=self.offline, seed=self.seed)
        return self._inception

    @property
    def dino(self) -> DinoEncoder:
        if self._dino is None:
            self._dino = build_dino_encoder(model=self.dino_model, device=self.device, smoke=self.force_smoke,
                                            offline=self.offline, seed=self.seed)
        return self._dino

    def describe(self) -> dict:
        """Which networks were built and where their weights came from (for the results manifest)."""
        built = {"clip": self._clip, "inception": self._inception, "dino": self._dino,
                 **{f"lpips_{k}": v for k, v in self._lpips.items()}}
        return {k: {"name": getattr(v, "name", getattr(v, "net", "")), "smoke": v.smoke, "source": v.source}
                for k, v in built.items() if v is not None}


_DEFAULT: MetricNetworks | None = None


def get_default_networks() -> MetricNetworks:
    """The process-wide bundle used when a metric is called without a network (built on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MetricNetworks()
    return _DEFAULT


def set_default_networks(networks: MetricNetworks | None) -> None:
    """Replace the process-wide bundle (e.g. ``MetricNetworks(smoke=True)`` in notebooks' smoke runs)."""
    global _DEFAULT
    _DEFAULT = networks
