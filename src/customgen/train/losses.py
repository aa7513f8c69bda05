"""Training losses. Every term is a pure function returning one value per sample (B,);
`combine` returns the dict {"loss", "l2", "lpips", "gram", "prior"} so logging needs no extra code.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchvision.models import VGG19_Weights, vgg19

from customgen.data.cache import randn_rows
from customgen.errors import Notice
from customgen.metrics.networks import hub_checkpoint
from customgen.network import is_offline, reachable

GRAM_LAYERS = (1, 6, 11, 20, 29)  # VGG19 relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (Gatys et al. 2016)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def noise_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE per sample (Ho et al. 2020), in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, generators, *, offset: float,
                 adaptive: float = 0.0) -> torch.Tensor:
    """Noise offset (Guttenberg 2023, crosslabs.org "Diffusion with offset noise"; diffusers' and kohya's train
    scripts): noise + o·z, z ~ N(0, 1) of shape (B, C, 1, 1), row i drawn from generators[i]; o = offset, or with
    kohya's adaptive_noise_scale a: o = max(0, offset + a·|mean over H, W of the latents|) per sample and channel."""
    z = randn_rows(generators, (noise.shape[1], 1, 1))  # (B, C, 1, 1)
    o = torch.full_like(z, offset)
    if adaptive:
        o = torch.clamp(offset + adaptive * latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu(), min=0.0)
    return noise + (o * z).to(noise.device, noise.dtype)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Gram matrix of (B, C, H, W) features, normalised by C·H·W (Gatys et al. 2016)."""
    b, c, h, w = feat.shape
    f = feat.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)  # (B, C, C)


def gram_loss(feats: list[torch.Tensor], target_grams: list[torch.Tensor]) -> torch.Tensor:
    """Gram-matrix style loss per sample: Σ_layers ‖G(x) − G_style‖², G_style averaged over the style set."""
    terms = [F.mse_loss(gram_matrix(f), g.expand(f.shape[0], -1, -1).to(f.device), reduction="none").flatten(1).sum(1)
             for f, g in zip(feats, target_grams)]
    return torch.stack(terms).sum(0)


def lpips_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS per sample (Zhang et al. 2018); x, y in [-1, 1], (B, 3, H, W)."""
    return net(x.float(), y.float()).flatten()


def _vgg19_weights():
    """torchvision's ImageNet VGG19 weights if cached or downloadable now, else None (offline: no attempt)."""
    w = VGG19_Weights.IMAGENET1K_V1
    if hub_checkpoint(w.url) is not None:
        return w
    if is_offline() or not reachable("download.pytorch.org"):
        return None
    try:
        w.get_state_dict(progress=False)  # downloads into the torch hub cache
        return w
    except Exception:  # noqa: BLE001 - any download failure means "no weights"
        return None


class VGGFeatures(torch.nn.Module):
    """VGG19 activations at GRAM_LAYERS for images in [-1, 1]; frozen. `pretrained` None: ImageNet weights when cached
    or downloadable (a notice when neither); False: random weights, nothing looked up."""

    def __init__(self, *, pretrained: bool | None = None):
        super().__init__()
        weights = _vgg19_weights() if pretrained is not False else None
        if weights is None and pretrained is not False:
            warnings.warn("Gram loss uses a random-weight VGG19 (ImageNet weights neither cached nor downloadable): "
                          "plumbing only", Notice)
        self.smoke = weights is None
        self.layers = vgg19(weights=weights).features[: max(GRAM_LAYERS) + 1]
        self.layers.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in GRAM_LAYERS:
                feats.append(x)
        return feats


@torch.no_grad()
def style_grams(vgg: VGGFeatures, images: torch.Tensor | list[torch.Tensor], *, batch: int = 8) -> list[torch.Tensor]:
    """Mean Gram matrix per layer over a style reference set (N, 3, H, W) in [-1, 1], or several such tensors of
    different shapes (aspect-ratio buckets; a Gram matrix is C × C whatever the shape) → [(1, C, C)]."""
    groups = [images] if isinstance(images, torch.Tensor) else images
    sums = None
    for chunk in (c for g in groups for c in g.split(batch)):
        grams = [gram_matrix(f).sum(0, keepdim=True) for f in vgg(chunk)]
        sums = grams if sums is None else [s + g for s, g in zip(sums, grams)]
    return [s / sum(len(g) for g in groups) for s in sums]


def predicted_x0(noisy: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from an ε-prediction: (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15)."""
    a = alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    return (noisy.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def combine(*, l2: torch.Tensor, weights, lpips: torch.Tensor | None = None, gram: torch.Tensor | None = None,
            prior: torch.Tensor | None = None, prior_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """α·L2 + β·LPIPS + γ·Gram (+ w·prior) averaged over the batch; every term reported."""
    zero = torch.zeros((), device=l2.device)
    terms = {"l2": l2.mean(), "lpips": lpips.mean() if lpips is not None else zero,
             "gram": gram.mean() if gram is not None else zero, "prior": prior.mean() if prior is not None else zero}
    terms["loss"] = (weights.l2 * terms["l2"] + weights.lpips * terms["lpips"] + weights.gram * terms["gram"]
                     + prior_weight * terms["prior"])
    return terms
