"""Pairwise image similarity: SSIM (torchmetrics) and LPIPS (the lpips package)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from customgen.metrics.images import ImageLike, is_degenerate, resize_to, to_array
from customgen.metrics.networks import get_default_networks
from customgen.metrics.result import MetricResult

SSIM_SIGMA = 1.5  # Gaussian window σ of the standard definition (Wang et al. 2004)
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # 5: window 11×11, truncated at 3.5σ like scikit-image


def _pair(output: ImageLike, reference: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    """Both as (H, W, 3) float64 in [0, 1], the output resized to the reference's size if they differ."""
    ref = to_array(reference)
    return resize_to(to_array(output), ref.shape[:2]), ref


def ssim(output: ImageLike, reference: ImageLike) -> MetricResult:
    """Mean SSIM over RGB channels, Gaussian window σ=1.5, data range 1 (Wang et al. 2004); ↑ = structure kept."""
    flag = is_degenerate(output)
    if flag == "nan":
        return MetricResult("ssim", math.nan, flag=flag)
    a, b = _pair(output, reference)
    if min(b.shape[:2]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim: images must be at least {2 * SSIM_RADIUS + 1} px on each side, got {b.shape[:2]}")
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None] for x in (a, b))  # (1, 3, H, W) f64
    _, ssim_map = structural_similarity_index_measure(
        ta, tb, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=2 * SSIM_RADIUS + 1, data_range=1.0,
        return_full_image=True)
    # torchmetrics averages over the reflect-padded full map; scikit-image (and Wang et al.'s reference
    # code) average only where the window fits inside the image. Cropping the border makes them agree.
    r = SSIM_RADIUS
    return MetricResult("ssim", float(ssim_map[..., r:-r, r:-r].mean()), flag=flag)


def lpips(output: ImageLike, reference: ImageLike, *, net="alex") -> MetricResult:
    """LPIPS distance (Zhang et al. 2018), AlexNet by default; ↓ = perceptually closer.

    ``net`` is "alex" / "vgg" (from the default metric networks) or a built ``LpipsScorer``.
    The output is resized to the reference's size if they differ.
    """
    if isinstance(net, str):
        net = get_default_networks().lpips(net)
    flag = is_degenerate(output)
    if flag == "nan":
        return MetricResult("lpips", math.nan, smoke=net.smoke, flag=flag)
    a, b = _pair(output, reference)
    return MetricResult("lpips", net(a, b), smoke=net.smoke, flag=flag)
