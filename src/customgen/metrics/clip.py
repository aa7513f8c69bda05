"""CLIP-based scores: CLIP-content, CLIP-style and Style Strength.

Written by hand (no library ships these scores); the embeddings come from open_clip
(Radford et al. 2021) through any ImageEncoder, cached by image hash.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from customgen.metrics.features import FeatureCache, ImageEncoder, encode_images
from customgen.metrics.images import ImageLike, is_degenerate
from customgen.metrics.networks import get_default_networks
from customgen.metrics.result import MetricResult

ZERO_BASELINE = 1e-6  # a baseline CLIP-content at or below this is treated as zero (ratio undefined)


def _resolve(embedder: ImageEncoder | None, cache: FeatureCache | None) -> tuple[ImageEncoder, FeatureCache]:
    """Default to the process-wide networks' CLIP and feature cache."""
    nets = get_default_networks()
    return (embedder if embedder is not None else nets.clip), (cache if cache is not None else nets.feature_cache)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 − cos between a (D,) and each row of b (M, D), in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    cos = (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))
    return 1.0 - cos  # (M,)


def clip_result(name: str, feature: np.ndarray | None, ref_features: np.ndarray, *, smoke: bool,
                flag: str | None = None) -> MetricResult:
    """Mean cosine distance of one output's CLIP feature (D,) to reference features (M, D), as a MetricResult
    (nan for a NaN output, which cannot be embedded; the row is excluded anyway)."""
    n_ref = len(ref_features)
    if flag == "nan" or feature is None:
        return MetricResult(name, math.nan, smoke=smoke, n_ref=n_ref, flag=flag)
    d = cosine_distance(feature, ref_features)  # (M,)
    return MetricResult(name, float(d.mean()), smoke=smoke, n_ref=n_ref, per_item=tuple(float(x) for x in d),
                        flag=flag)


def _clip_distance(name: str, output: ImageLike, refs: Sequence[ImageLike], embedder, cache) -> MetricResult:
    """Shared body: flag degenerate outputs, embed output + references, mean cosine distance."""
    if len(refs) == 0:
        raise ValueError(f"{name}: no reference images given")
    embedder, cache = _resolve(embedder, cache)
    flag = is_degenerate(output)
    if flag == "nan":
        return clip_result(name, None, np.zeros((len(refs), 1)), smoke=embedder.smoke, flag=flag)
    feats = encode_images([output, *refs], embedder, cache=cache)  # (1 + M, D)
    return clip_result(name, feats[0], feats[1:], smoke=embedder.smoke, flag=flag)


def clip_content(output: ImageLike, content: ImageLike, *, embedder: ImageEncoder | None = None,
                 cache: FeatureCache | None = None) -> MetricResult:
    """CLIP-content = 1 − cos(CLIP(output), CLIP(content)); ↓ = content kept (CLIP space, Radford et al. 2021)."""
    return _clip_distance("clip_content", output, [content], embedder, cache)


def clip_style(output: ImageLike, style_refs: Sequence[ImageLike], *, embedder: ImageEncoder | None = None,
               cache: FeatureCache | None = None) -> MetricResult:
    """CLIP-style = mean over references of 1 − cos(CLIP(output), CLIP(ref)); ↓ = closer to the style."""
    return _clip_distance("clip_style", output, list(style_refs), embedder, cache)


def style_strength(clip_content: float | MetricResult, baseline_clip_content: float | MetricResult, *,
                   zero_baseline: float = ZERO_BASELINE) -> MetricResult:
    """Style Strength = CLIP-content / CLIP-content of plain SD img2img (same content, seed, strength)."""
    results = [x for x in (clip_content, baseline_clip_content) if isinstance(x, MetricResult)]
    smoke = any(r.smoke for r in results)
    flag = next((r.flag for r in results if r.flag), None)
    num, den = float(clip_content), float(baseline_clip_content)
    if not math.isfinite(den) or abs(den) <= zero_baseline:  # nan with a reason, never inf
        return MetricResult("style_strength", math.nan, smoke=smoke, flag=flag or "zero_baseline",
                            note=f"baseline CLIP-content {den:.3g} is zero or not finite: the ratio is undefined")
    return MetricResult("style_strength", num / den, smoke=smoke, flag=flag)
