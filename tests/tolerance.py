"""Rounding-error bounds that the tolerances in tests/ are derived from, instead of numbers tuned on one CPU.

Notation and results from N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM 2002:
u is the unit roundoff (§2.1), γ_n = n·u/(1 − n·u) bounds n roundings in a row (§3.1, Lemma 3.1), and an
inner product of length n computed in any order errs by at most γ_n·Σ|x_i·y_i| (§3.1, eq. 3.5), so a matrix
product errs by at most γ_n·|A|·|B| componentwise (§3.5, eq. 3.13). These hold on every IEEE CPU whatever
the summation order, blocking or FMA use of its kernels, which is what differs between AVX2, AVX-512 and AMX.
"""
from __future__ import annotations

import math

import numpy as np
import torch

PIXEL_LEVELS = 255  # diffusers and PIL store images as round(255·x), x in [0, 1]


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-t = eps/2: one rounding to nearest errs by at most u relative (Higham 2002, §2.1, Thm 2.2)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n·u/(1 − n·u), the bound on n roundings in a row (Higham 2002, §3.1, Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) undefined in {dtype}: n·u = {nu} >= 1")
    return nu / (1 - nu)


def matmul_bound(abs_a: torch.Tensor, abs_b: torch.Tensor, dtype: torch.dtype, *, extra: int = 0) -> torch.Tensor:
    """γ_{n+extra}·|A|·|B| for fl(A·B), n the inner dimension, `extra` further roundings (Higham 2002, eq. 3.13)."""
    n = abs_a.shape[-1]
    return gamma(n + extra, dtype) * (abs_a.double() @ abs_b.double())


def pixel_levels(delta: float) -> int:
    """Most uint8 levels round(255·x) and round(255·y) can differ by when |x − y| ≤ delta (a rounding step is 1)."""
    return math.floor(PIXEL_LEVELS * delta) + 1


def ssim_moment_rounding(radius: int = 5) -> float:
    """Bound on a float64 SSIM window moment (μ, E[x²], E[xy] of values in [0, 1], Gaussian weights summing to
    1): a (2r+1)²-term sum, or two (2r+1)-term passes, plus the product and the weights: γ_{(2r+1)²+5}."""
    return gamma((2 * radius + 1) ** 2 + 5, torch.float64)


def ssim_rounding(x, y, *, radius: int = 5, sigma: float = 1.5, c1: float = 1e-4, c2: float = 9e-4) -> float:
    """How far two float64 SSIM implementations can differ on images x, y (H, W, 3) in [0, 1] (Wang et al. 2004).

    Each window moment is within g = ssim_moment_rounding() of exact; each factor of S = N/D (≤ 3 in size,
    ≤ 5 terms of ≤ 2 moments) within 8g; so N and D within 7·8g and |δS| ≤ 112g/D per pixel, |δ mean S| ≤
    112g·mean(1/D), twice for two implementations (Higham 2002, §3.1). D from scipy's Gaussian filter (scikit-image's
    window), over the pixels whose window fits (those SSIM averages)."""
    from scipy.ndimage import gaussian_filter  # lazy: only the SSIM tests need scipy

    blur = lambda a: np.stack([gaussian_filter(a[..., c], sigma=sigma, truncate=radius / sigma)  # noqa: E731
                               for c in range(a.shape[-1])], -1)[radius:-radius, radius:-radius]
    mx, my = blur(x), blur(y)
    var = np.maximum(blur(x * x) - mx ** 2, 0) + np.maximum(blur(y * y) - my ** 2, 0)
    d = (mx ** 2 + my ** 2 + c1) * (var + c2)
    return 2 * 112 * ssim_moment_rounding(radius) * float(np.mean(1 / d))


def longest_reduction(model: torch.nn.Module) -> int:
    """The longest inner product any Linear or Conv layer of `model` computes (in_features; in_channels/groups·∏k)."""
    linear = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    conv = [m.in_channels // m.groups * math.prod(m.kernel_size) for m in model.modules()
            if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return max(linear + conv)
