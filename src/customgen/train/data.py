"""Training data: which images, in which order (stateless per step, so resume is exact), class images."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from customgen.data import ImageDataset, ImageRecord, LatentCache, find_kaggle_roots, scan_images
from customgen.errors import UserError
from customgen.models import build_pipeline


def training_records(cfg) -> list[ImageRecord]:
    """The training images of `cfg.data`: one WikiArt style, an instance folder or kohya folders."""
    d = cfg.data
    root = d.root or (find_kaggle_roots().get("wikiart") if d.layout == "wikiart" else None)
    if not root:
        raise UserError("data.root is not set: pass --set data.root=PATH (a WikiArt root, photo folder or kohya root)")
    scan = scan_images(root, layout=d.layout, min_size=d.min_size, max_pixels=d.max_pixels)
    records = scan.records
    if d.layout == "wikiart":
        styles = scan.counts()
        if not d.style:
            raise UserError(f"data.style is not set; available styles: {', '.join(list(styles)[:12])}")
        if d.style not in styles:
            raise UserError(f"style {d.style!r} not found under {root}; available: {', '.join(list(styles)[:12])}")
        records = [r for r in records if r.label == d.style]
    if not records:
        raise UserError(f"no usable training images under {root} (layout {d.layout}); run `customgen data scan` to see why")
    records = sorted(records, key=lambda r: r.path)
    if len(records) > d.max_images:
        records = sorted(random.Random(d.seed).sample(records, d.max_images), key=lambda r: r.path)
    return records


def batch_positions(n: int, *, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Dataset positions for micro-step `step`: a fresh seeded permutation per epoch, a disjoint slice per rank."""
    out = []
    for j in range(batch_size):
        p = (step * world + rank) * batch_size + j
        epoch, k = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[k]))
    return out


@dataclass
class ImageSet:
    """A dataset with its cached latent distributions (when caching is on)."""

    dataset: ImageDataset
    latents: object | None  # CachedLatents

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, positions: list[int], *, vae, flip: torch.Tensor, need_pixels: bool) -> dict:
        """Latents (B,4,h,w), captions and (if asked) pixels (B,3,H,W) for dataset positions; `flip` (B,) bool."""
        index = [self.dataset.order[p] for p in positions]
        captions = [self.dataset.caption_of(i) for i in index]
        pixels = torch.stack([self.dataset[p]["pixel_values"] for p in positions]) if need_pixels or self.latents is None else None
        if self.latents is not None:
            latents = self.latents.sample(index)
        else:
            with torch.no_grad():
                p = pixels.to(vae.device, vae.dtype)
                latents = vae.encode(p).latent_dist.sample().float() * vae.config.scaling_factor
        # the VAE is ~flip-equivariant; the mask follows the latents (on the GPU when they were encoded there)
        latents = torch.where(flip.view(-1, 1, 1, 1).to(latents.device), latents.flip(-1), latents)
        if pixels is not None:
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        return {"latents": latents, "captions": captions, "pixels": pixels}


def image_set(records, cfg, vae, *, cache_dir: str = "") -> ImageSet:
    """ImageDataset over `records` (+ latent cache when `train.cache_latents`)."""
    d = cfg.data
    ds = ImageDataset(records, resolution=d.resolution, center_crop=d.center_crop or cfg.train.cache_latents,
                      random_flip=False, caption=None, max_pixels=d.max_pixels)
    latents = None
    if cfg.train.cache_latents:
        latents = LatentCache(vae, cache_dir=cache_dir or None, dtype=vae.dtype).get(ds)
    return ImageSet(ds, latents)


@torch.no_grad()
def ensure_class_images(comps, cfg, folder: Path, *, is_main: bool) -> list[ImageRecord]:
    """Class images for prior preservation: generate the missing ones with the *base* model, once."""
    p = cfg.prompt
    if not p.class_prompt:
        raise UserError("prompt.prior is on but prompt.class_prompt is empty (e.g. 'a photo of person')")
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(x for x in folder.iterdir() if x.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if is_main and len(have) < p.num_class_images:
        pipe = build_pipeline(comps, kind="txt2img")
        res = cfg.data.resolution
        for i in range(len(have), p.num_class_images):
            g = torch.Generator("cpu").manual_seed(cfg.train.seed * 7919 + i)
            image = pipe(p.class_prompt, num_inference_steps=p.class_steps, generator=g, height=res, width=res).images[0]
            image.save(folder / f"class-{i:05d}.png")
        have = sorted(x for x in folder.iterdir() if x.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [ImageRecord(path=str(x), caption=p.class_prompt) for x in have[: p.num_class_images]]
