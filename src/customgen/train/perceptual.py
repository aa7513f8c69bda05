"""Decoder-based loss terms for style LoRA: LPIPS to the source and Gram to the style set on the
decoded x0 prediction, optionally on content images noised to the img2img strength.

The VAE decoder pass is the expensive part (its forward and backward over the decoded pixels are most of a
perceptual step's extra cost: `customgen bench --jobs perceptual` times the pieces): terms run every N steps,
below a timestep threshold, optionally on a random latent crop; with both weights at 0 this module is never
built. The loss networks are frozen: gradients flow through them to the image, never into their weights.
"""
from __future__ import annotations

import torch

from customgen.metrics.networks import build_lpips_scorer
from customgen.train.losses import VGGFeatures, gram_loss, lpips_loss, predicted_x0, style_grams


class Perceptual:
    """LPIPS and Gram terms on decoded x0 predictions (weights from cfg.loss). `pretrained=False` builds the loss
    networks with random weights and never looks for, or downloads, their ImageNet weights: what a memory estimate
    needs (shapes only) and why `customgen plan` makes no network request."""

    def __init__(self, cfg, style_pixels: torch.Tensor | list[torch.Tensor], device, *, pretrained: bool = True):
        self.cfg = cfg.loss
        self.lpips = build_lpips_scorer(net=self.cfg.lpips_net, device=str(device), smoke=not pretrained).model \
            if self.cfg.lpips > 0 else None
        self.vgg = VGGFeatures(pretrained=None if pretrained else False).to(device) if self.cfg.gram > 0 else None
        for net in filter(None, (self.lpips, self.vgg)):
            net.requires_grad_(False).eval()  # LPIPS' linear heads train by default: no weight gradients, only x's
        groups = [style_pixels] if isinstance(style_pixels, torch.Tensor) else style_pixels  # one per image shape
        self.grams = style_grams(self.vgg, [g.to(device) for g in groups]) if self.vgg is not None else None
        self.smoke = bool(getattr(self.vgg, "smoke", False))

    def active(self, step: int) -> bool:
        return step % max(1, self.cfg.perceptual_every) == 0

    def _crop(self, x0: torch.Tensor, pixels: torch.Tensor | None):
        """A random latent crop of `decode_crop` (at most the latent's height and width; and the matching pixel crop):
        decode less."""
        c, (h, w) = self.cfg.decode_crop, x0.shape[-2:]
        if not c or (c >= h and c >= w):
            return x0, pixels
        ch, cw = min(c, h), min(c, w)
        i, j = int(torch.randint(0, h - ch + 1, (1,))), int(torch.randint(0, w - cw + 1, (1,)))
        x0 = x0[..., i:i + ch, j:j + cw]
        return x0, None if pixels is None else pixels[..., 8 * i:8 * (i + ch), 8 * j:8 * (j + cw)]

    def terms(self, vae, noisy, eps, t, alphas_cumprod, pixels, *, threshold: bool = True) -> dict[str, torch.Tensor]:
        """{'lpips': (b,), 'gram': (b,)} on the samples with t below the threshold (maybe none)."""
        keep = t < self.cfg.perceptual_max_timestep if threshold else torch.ones_like(t, dtype=torch.bool)
        if not keep.any():
            return {}
        x0 = predicted_x0(noisy[keep], eps[keep], alphas_cumprod, t[keep])  # (b, 4, h, w)
        x0, pixels = self._crop(x0, None if pixels is None else pixels[keep])
        image = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()  # (b, 3, H, W) in ~[-1, 1]
        out = {}
        if self.lpips is not None and pixels is not None:
            out["lpips"] = lpips_loss(self.lpips, image, pixels.to(image.device))
        if self.vgg is not None:
            out["gram"] = gram_loss(self.vgg(image), self.grams)
        return out
