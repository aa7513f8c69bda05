"""Set-level metrics: FID, KID (on features or images) and ArtFID."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torchmetrics.image.kid import poly_mmd

from customgen.metrics.features import FeatureCache, ImageEncoder, encode_images
from customgen.metrics.images import ImageLike, is_degenerate
from customgen.metrics.networks import get_default_networks
from customgen.metrics.result import MetricResult


def _as_features(x) -> torch.Tensor:
    """(N, D) numpy/torch features → float64 CPU tensor."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to a (N, D) and b (M, D), Heusel et al. 2017.

    Written here (3 lines) because torchmetrics keeps it private (`_compute_fid`); same method:
    Tr sqrt(Σa Σb) = Σ sqrt(eig(Σa Σb)). The eigenvalues are real and ≥ 0 in exact arithmetic
    (Σa Σb is similar to Σa^½ Σb Σa^½); rounding can leave tiny negative or complex parts,
    which `.sqrt().real` drops. Unlike scipy.linalg.sqrtm this needs no eps offset when N ≤ D
    and the covariances are singular.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D), unbiased (N − 1) like np.cov
    tr_sqrt = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    d = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(float(d), 0.0)  # FID ≥ 0; clip rounding noise (~1e-12) below zero


def fid(features_a, features_b, *, smoke: bool = False) -> MetricResult:
    """FID between two (N, D) feature sets (Heusel et al. 2017); ↓ better. Unreliable for N ≲ 1000."""
    a, b = _as_features(features_a), _as_features(features_b)
    n, n_ref, dim = a.shape[0], b.shape[0], a.shape[1]
    if b.shape[1] != dim:
        raise ValueError(f"fid: feature dims differ ({dim} vs {b.shape[1]})")
    if min(n, n_ref) < 2:
        return MetricResult("fid", math.nan, smoke=smoke, n=n, n_ref=n_ref, flag="too_few_samples")
    note = None
    if min(n, n_ref) <= dim:
        note = f"n={min(n, n_ref)} <= dim={dim}: singular covariances, FID biased upward; report KID beside it"
    return MetricResult("fid", frechet_distance(a, b), smoke=smoke, n=n, n_ref=n_ref, note=note)


def kid(features_a, features_b, *, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0,
        smoke: bool = False) -> MetricResult:
    """KID: unbiased MMD² with cubic polynomial kernel, mean ± std over subsets (Bińkowski et al. 2018); ↓ better.

    The MMD itself is torchmetrics' `poly_mmd`; subsets are drawn with a seeded numpy generator.
    std is over subsets with ddof=0, as torchmetrics' KernelInceptionDistance reports it.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    n, n_ref = a.shape[0], b.shape[0]
    m = min(subset_size, n, n_ref)
    if m < 2:
        return MetricResult("kid", math.nan, smoke=smoke, n=n, n_ref=n_ref, flag="too_few_samples")
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n_subsets):
        ia, ib = rng.choice(n, m, replace=False), rng.choice(n_ref, m, replace=False)
        scores.append(float(poly_mmd(a[ia], b[ib], degree=3, gamma=None, coef=1.0)))
    s = np.asarray(scores)
    note = f"subset_size reduced to {m} (fewer samples than {subset_size})" if m < subset_size else None
    return MetricResult("kid", float(s.mean()), smoke=smoke, n=n, n_ref=n_ref, std=float(s.std()),
                        per_item=tuple(scores), note=note)


def _set_features(images: Sequence[ImageLike], encoder: ImageEncoder, cache: FeatureCache | None):
    """Features of the non-degenerate images, and how many degenerate ones were left out."""
    keep = [x for x in images if is_degenerate(x) is None]
    if not keep:
        return None, len(images)
    return encode_images(keep, encoder, cache=cache), len(images) - len(keep)


def _image_set_metric(metric, outputs, references, extractor, cache, **kwargs) -> MetricResult:
    """Encode both sets (degenerate outputs left out), then FID or KID on the features."""
    if extractor is None or cache is None:
        nets = get_default_networks()
        extractor = extractor if extractor is not None else nets.inception
        cache = cache if cache is not None else nets.feature_cache
    fa, dropped = _set_features(outputs, extractor, cache)
    fb, dropped_ref = _set_features(references, extractor, cache)
    name = metric.__name__
    if fa is None or fb is None:
        return MetricResult(name, math.nan, smoke=extractor.smoke, n=0, n_ref=0, flag="all_degenerate")
    r = metric(fa, fb, smoke=extractor.smoke, **kwargs)
    if dropped or dropped_ref:
        extra = f"left out {dropped} degenerate outputs, {dropped_ref} degenerate references"
        r = MetricResult(**{**r.__dict__, "note": "; ".join(x for x in (r.note, extra) if x)})
    return r


def fid_images(outputs: Sequence[ImageLike], references: Sequence[ImageLike], *,
               extractor: ImageEncoder | None = None, cache: FeatureCache | None = None) -> MetricResult:
    """FID on images via an ImageEncoder (default: FID Inception, or a smoke CNN offline)."""
    return _image_set_metric(fid, outputs, references, extractor, cache)


def kid_images(outputs: Sequence[ImageLike], references: Sequence[ImageLike], *,
               extractor: ImageEncoder | None = None, cache: FeatureCache | None = None,
               subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> MetricResult:
    """KID on images via an ImageEncoder (default: FID Inception, or a smoke CNN offline)."""
    return _image_set_metric(kid, outputs, references, extractor, cache,
                             subset_size=subset_size, n_subsets=n_subsets, seed=seed)


def art_fid(lpips: float | MetricResult, fid: float | MetricResult) -> MetricResult:
    """ArtFID = (1 + LPIPS(content, output)) × (1 + FID(outputs, style set)), Wright & Ommer 2022; ↓ better.

    Hand-written (a formula; no library has it). Plain form on whatever FID it is given: the
    reference code fits FID on 5,000 samples by default, so small-set values are not comparable.
    """
    parts = [x for x in (lpips, fid) if isinstance(x, MetricResult)]
    n = fid.n if isinstance(fid, MetricResult) else 1
    n_ref = fid.n_ref if isinstance(fid, MetricResult) else 1
    flag = next((p.flag for p in parts if p.flag), None)
    return MetricResult("art_fid", (1.0 + float(lpips)) * (1.0 + float(fid)), smoke=any(p.smoke for p in parts),
                        n=n, n_ref=n_ref, flag=flag)
