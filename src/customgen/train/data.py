"""Training data: which images, in which order, with which randomness (stateless per step, so resume is exact;
per example, so the split into batch, accumulation and processes does not change what is trained), class images."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from customgen.data import ImageDataset, ImageRecord, LatentCache, find_kaggle_roots, scan_images
from customgen.data.cache import randn_rows
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


def sample_ids(*, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """The run-wide indices of micro-step `step`'s examples on process `rank`: example i is the i-th drawn by the
    run, so batch 4, batch 1 × accumulation 4 and batch 2 on two processes see the same examples in the same order."""
    return [(step * world + rank) * batch_size + j for j in range(batch_size)]


def batch_positions(n: int, *, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Dataset positions for micro-step `step`: a fresh seeded permutation per epoch, a disjoint slice per rank."""
    out = []
    for p in sample_ids(step=step, batch_size=batch_size, rank=rank, world=world):
        epoch, k = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[k]))
    return out


def sample_generators(seed: int, ids: list[int], *, stream: int) -> list[torch.Generator]:
    """One CPU generator per example (`ids` from sample_ids), seeded from (seed, stream, id) through numpy's
    SeedSequence hash; `stream` keeps instance, class and content examples of the same id apart."""
    states = [np.random.SeedSequence([seed, stream, i]).generate_state(1, np.uint64)[0] for i in ids]
    return [torch.Generator().manual_seed(int(s)) for s in states]


def flip_mask(generators: list[torch.Generator], *, on: bool) -> torch.Tensor:
    """(B,) bool: flip example i with probability 1/2 from its own generator; all False when `on` is False."""
    if not on:
        return torch.zeros(len(generators), dtype=torch.bool)
    return torch.stack([torch.rand((), generator=g) < 0.5 for g in generators])


@dataclass
class ImageSet:
    """A dataset with its cached latent distributions (when caching is on)."""

    dataset: ImageDataset
    latents: object | None  # CachedLatents

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, positions: list[int], *, vae, flip: torch.Tensor, need_pixels: bool,
              generators: list[torch.Generator]) -> dict:
        """Latents (B,4,h,w), captions and (if asked) pixels (B,3,H,W) for dataset positions; `flip` (B,) bool;
        example i's latent sample drawn from generators[i]."""
        index = [self.dataset.order[p] for p in positions]
        captions = [self.dataset.caption_of(i) for i in index]
        pixels = torch.stack([self.dataset[p]["pixel_values"] for p in positions]) if need_pixels or self.latents is None else None
        if self.latents is not None:
            latents = self.latents.sample(index, generator=generators)
        else:
            with torch.no_grad():
                dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
                eps = randn_rows(generators, dist.mean.shape[1:]).to(dist.mean.device, dist.mean.dtype)
                latents = (dist.mean + dist.std * eps).float() * vae.config.scaling_factor
        mask = flip.view(-1, 1, 1, 1)
        latents = torch.where(mask.to(latents.device), latents.flip(-1), latents)  # the VAE is ~flip-equivariant
        if pixels is not None:
            pixels = torch.where(mask, pixels.flip(-1), pixels)
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
