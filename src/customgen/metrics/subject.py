"""Subject metrics as DreamBooth defines them (Ruiz et al. 2023): identity (DINO, CLIP-I), prompt fidelity
(CLIP-T), diversity (DIV) and prior preservation (PRES).

Written by hand: the paper gives the formulas and no library ships them. The features come from the package's
encoders (DINO ViT-S/16: customgen.metrics.dino_network; open_clip: the CLIP the style metrics use; LPIPS), cached by
image hash. Identity metrics take `(output(s), instances, *, encoder, cache)`; see docs/evaluation_metrics.md.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch

from customgen.metrics.clip import cosine_distance
from customgen.metrics.features import FeatureCache, ImageEncoder, encode_images
from customgen.metrics.images import ImageLike, is_degenerate, resize_to, to_array
from customgen.metrics.networks import get_default_networks
from customgen.metrics.result import MetricResult, summarize

BATCH = 16  # images per LPIPS call


def fidelity_prompt(prompt: str, token: str) -> str:
    """The prompt CLIP-T compares with: the rare token removed as a whole word (`a sks dog on the beach` →
    `a dog on the beach`), whitespace tidied. Without a token, the prompt unchanged (tidied)."""
    text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt) if token else prompt
    return re.sub(r"\s+([,.;:!?])", r"\1", " ".join(text.split()))


def similarity_result(name: str, feature: np.ndarray | None, ref_features: np.ndarray, *, smoke: bool,
                      flag: str | None = None) -> MetricResult:
    """Mean cosine similarity of one output's feature (D,) to reference features (M, D); per reference in
    `per_item` (nan for a NaN output, which cannot be embedded)."""
    n_ref = len(ref_features)
    if flag == "nan" or feature is None:
        return MetricResult(name, math.nan, smoke=smoke, n_ref=n_ref, flag=flag)
    cos = 1.0 - cosine_distance(feature, ref_features)  # (M,)
    return MetricResult(name, float(cos.mean()), smoke=smoke, n_ref=n_ref, per_item=tuple(float(x) for x in cos),
                        flag=flag)


def _identity(name: str, output: ImageLike, instances: Sequence[ImageLike], encoder: ImageEncoder,
              cache: FeatureCache | None) -> MetricResult:
    """Shared body of DINO and CLIP-I: flag degenerate outputs, embed output + instances, mean cosine."""
    if len(instances) == 0:
        raise ValueError(f"{name}: no instance images given")
    flag = is_degenerate(output)
    if flag == "nan":
        return similarity_result(name, None, np.zeros((len(instances), 1)), smoke=encoder.smoke, flag=flag)
    feats = encode_images([output, *instances], encoder, cache=cache)  # (1 + M, D)
    return similarity_result(name, feats[0], feats[1:], smoke=encoder.smoke, flag=flag)


def dino(output: ImageLike, instances: Sequence[ImageLike], *, encoder: ImageEncoder | None = None,
         cache: FeatureCache | None = None) -> MetricResult:
    """DINO = mean over instance photos r of cos(DINO(output), DINO(r)), ViT-S/16 CLS (Ruiz et al. 2023); ↑ = the
    subject's identity kept."""
    nets = get_default_networks()
    return _identity("dino", output, instances, encoder or nets.dino, cache or nets.feature_cache)


def clip_i(output: ImageLike, instances: Sequence[ImageLike], *, encoder: ImageEncoder | None = None,
           cache: FeatureCache | None = None) -> MetricResult:
    """CLIP-I = mean over instance photos r of cos(CLIP(output), CLIP(r)) (Ruiz et al. 2023); ↑ = identity kept."""
    nets = get_default_networks()
    return _identity("clip_i", output, instances, encoder or nets.clip, cache or nets.feature_cache)


def pres(class_outputs: Sequence[ImageLike], instances: Sequence[ImageLike], *, encoder: ImageEncoder | None = None,
         cache: FeatureCache | None = None) -> MetricResult:
    """PRES = mean DINO similarity between class-prompt images of the adapted model ("a photo of a dog") and the
    instance photos (Ruiz et al. 2023); ↓ = the class kept its variety (high: it collapsed onto the subject)."""
    nets = get_default_networks()
    encoder, cache = encoder or nets.dino, cache or nets.feature_cache
    per = [_identity("pres", o, instances, encoder, cache) for o in class_outputs]
    s = summarize(per)
    return MetricResult("pres", s.mean, smoke=encoder.smoke, n=s.n, n_ref=len(instances), std=s.std,
                        per_item=tuple(float(r) for r in per), flag="all_degenerate" if per and not s.n else None)


def clip_t(output: ImageLike, prompt: str, *, token: str, encoder=None, cache: FeatureCache | None = None
           ) -> MetricResult:
    """CLIP-T = cos(CLIP image(output), CLIP text(prompt without the rare token)) (Ruiz et al. 2023); ↑ = the image
    follows its prompt. `encoder` is an OpenClipEmbedder (it needs the text tower)."""
    nets = get_default_networks()
    encoder, cache = encoder or nets.clip, cache or nets.feature_cache
    flag = is_degenerate(output)
    text = encoder.encode_text([fidelity_prompt(prompt, token)])  # (1, D)
    feature = None if flag == "nan" else encode_images([output], encoder, cache=cache)[0]
    return similarity_result("clip_t", feature, text, smoke=encoder.smoke, flag=flag)


def pairwise_distances(arrays: list[np.ndarray], net, *, batch_size: int = BATCH) -> list[float]:
    """LPIPS of every pair i < j of same-size (H, W, 3) images, in that order: backbone features once per image."""
    chunks = [net.features(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    feats = [torch.cat(layer) for layer in zip(*chunks)]  # per layer (N, C, h, w)
    out: list[float] = []
    for i in range(len(arrays) - 1):
        out += net.distance([f[i + 1:] for f in feats], [f[i:i + 1] for f in feats]).tolist()
    return out


def div(outputs: Sequence[ImageLike], *, net="alex", batch_size: int = BATCH) -> MetricResult:
    """DIV = mean LPIPS over the pairs of images generated for one prompt with different seeds (Ruiz et al. 2023);
    ↑ = more varied. Degenerate images are left out; images are resized to the first one's size."""
    if isinstance(net, str):
        net = get_default_networks().lpips(net)
    arrays = [to_array(o) for o in outputs]
    kept = [a for a in arrays if is_degenerate(a) is None]
    if len(kept) < 2:
        return MetricResult("div", math.nan, smoke=net.smoke, n=len(kept), flag="too_few_samples")
    kept = [resize_to(a, kept[0].shape[:2]) for a in kept]
    pairs = pairwise_distances(kept, net, batch_size=batch_size)
    note = f"left out {len(arrays) - len(kept)} degenerate images" if len(kept) < len(arrays) else None
    return MetricResult("div", float(np.mean(pairs)), smoke=net.smoke, n=len(kept), per_item=tuple(pairs), note=note)
