"""Training data: which images, in which order, with which randomness (stateless per step, so resume is exact;
per example, so the split into batch, accumulation and processes does not change what is trained), aspect-ratio
buckets, class images."""
from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from customgen.data import ImageDataset, ImageRecord, LatentCache, find_kaggle_roots, scan_images
from customgen.data.buckets import Placement, Size, bucket_report, format_buckets, spec_of
from customgen.data.cache import randn_rows
from customgen.errors import Notice, UserError
from customgen.models import build_pipeline


def settle_data(cfg):
    """`cfg` with its data settings as a run uses them: the bucket settings checked (min/max rounded to the step, one
    notice), and the latent cache off under random crops, with one notice (kohya's is_latent_cacheable). Runs before
    the memory plan, so the plan counts what the run does; a settled config passes through unchanged."""
    d, t = cfg.data, cfg.train
    spec = spec_of(d)
    if spec is not None:
        d = dataclasses.replace(d, min_bucket=spec.min_bucket, max_bucket=spec.max_bucket)
    if not d.center_crop and t.cache_latents:
        warnings.warn("data.center_crop=false: random crops change every step, so train.cache_latents is off (as "
                      "kohya's sd-scripts turn latent caching off for random crops)", Notice, stacklevel=2)
        t = dataclasses.replace(t, cache_latents=False)
    return dataclasses.replace(cfg, data=d, train=t)


def training_records(cfg) -> list[ImageRecord]:
    """The training images of `cfg.data`: one WikiArt style, an instance folder or kohya folders."""
    d = cfg.data
    root = d.root or (find_kaggle_roots().get("wikiart") if d.layout == "wikiart" else None)
    if not root:
        raise UserError("data.root is not set: pass --set data.root=PATH (a WikiArt root, photo folder or kohya root)")
    scan = scan_images(root, layout=d.layout, min_size=d.min_size, max_pixels=d.max_pixels,
                       caption_extension=d.caption_extension)
    records = scan.records
    if d.layout == "wikiart":
        styles = scan.counts()
        if not d.style:
            raise UserError(f"data.style is not set; available styles: {', '.join(list(styles)[:12])}")
        if d.style not in styles:
            raise UserError(f"style {d.style!r} not found under {root}; available: {', '.join(list(styles)[:12])}")
        records = [r for r in records if r.label == d.style]
    spec = spec_of(d)
    if spec is not None and spec.no_upscale:  # a side below the step has no bucket: small, skipped
        records = [r for r in records if spec.place(r.width, r.height) is not None]
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


def bucket_epoch(buckets: list[Size], *, seed: int, epoch: int, chunk: int) -> list[int]:
    """Dataset positions of one epoch with buckets: each bucket's positions shuffled, cut into chunks of `chunk` (the
    effective batch: an optimizer step's examples share a bucket, however batch, accumulation and processes split
    it), a bucket's last chunk filled up from its own start; the chunks shuffled. Seeded by (seed, epoch)."""
    groups: dict[Size, list[int]] = {}
    for p, b in enumerate(buckets):
        groups.setdefault(b, []).append(p)
    chunks = []
    for k, b in enumerate(sorted(groups), start=1):
        shuffled = [groups[b][i] for i in torch.randperm(len(groups[b]), generator=_seeded(seed, epoch, k)).tolist()]
        filled = [shuffled[i % len(shuffled)] for i in range(-(-len(shuffled) // chunk) * chunk)]
        chunks += [filled[i:i + chunk] for i in range(0, len(filled), chunk)]
    return [p for i in torch.randperm(len(chunks), generator=_seeded(seed, epoch, 0)).tolist() for p in chunks[i]]


def _seeded(*key: int) -> torch.Generator:
    """A CPU generator seeded from `key` through numpy's SeedSequence hash (as sample_generators)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


@dataclass
class ImageSet:
    """A dataset with its cached latent distributions (when caching is on)."""

    dataset: ImageDataset
    latents: object | None  # CachedLatents
    epochs: dict = dataclasses.field(default_factory=dict, repr=False)  # (seed, chunk, epoch) → bucket_epoch, memo

    def __len__(self) -> int:
        return len(self.dataset)

    def positions(self, *, step: int, batch_size: int, seed: int, chunk: int, rank: int = 0,
                  world: int = 1) -> list[int]:
        """Dataset positions of micro-step `step` (batch_positions; with buckets, from bucket_epoch's order)."""
        if self.dataset.placements is None:
            return batch_positions(len(self), step=step, batch_size=batch_size, seed=seed, rank=rank, world=world)
        buckets = [self.dataset.placements[i].bucket for i in self.dataset.order]
        length = sum(-(-n // chunk) * chunk for n in _sizes(buckets))
        out = []
        for p in sample_ids(step=step, batch_size=batch_size, rank=rank, world=world):
            epoch, k = divmod(p, length)
            if (seed, chunk, epoch) not in self.epochs:
                self.epochs.clear()  # one epoch at a time (resume and the next epoch recompute theirs)
                self.epochs[seed, chunk, epoch] = bucket_epoch(buckets, seed=seed, epoch=epoch, chunk=chunk)
            out.append(self.epochs[seed, chunk, epoch][k])
        return out

    def batch(self, positions: list[int], *, vae, flip: torch.Tensor, need_pixels: bool,
              generators: list[torch.Generator], crops: list[torch.Generator] | None = None) -> dict:
        """Latents (B,4,h,w), captions, paths and (if asked) pixels (B,3,H,W) for dataset positions; `flip` (B,) bool;
        example i's latent sample drawn from generators[i], its random crop in a bucket from crops[i]."""
        index = [self.dataset.order[p] for p in positions]
        captions = [self.dataset.caption_of(i) for i in index]
        pixels = None
        if need_pixels or self.latents is None:
            pixels = torch.stack([self.dataset.pixels(i, crops[j] if crops else None) for j, i in enumerate(index)])
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
        return {"latents": latents, "captions": captions, "pixels": pixels,
                "paths": [self.dataset.records[i].path for i in index]}


def _sizes(buckets: list[Size]) -> list[int]:
    """How many entries each bucket holds, buckets in sorted order."""
    return [buckets.count(b) for b in sorted(set(buckets))]


def bucket_examples(records: list[ImageRecord], placements: list[Placement] | None) -> tuple[int, ...]:
    """Examples (images × repeats) per bucket, in the table's order; () without buckets."""
    if placements is None:
        return ()
    return tuple(_sizes([p.bucket for r, p in zip(records, placements) for _ in range(r.repeats)]))


def run_shape(cfg) -> Size:
    """(width, height) of the largest images a run trains on: its largest bucket (BucketSpec.largest), else the square
    resolution (what the memory plan predicts for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)  # settle_data gives the rounding notice, once
        spec = spec_of(cfg.data)
    r = cfg.data.resolution
    return (r, r) if spec is None else spec.largest()


def describe_data(cfg) -> str:
    """The run's crop, bucket and caption settings and, with data.buckets, the bucket table of its training images
    (what the training notebooks show before training)."""
    d = settle_data(cfg).data
    crop = "center" if d.center_crop else "random"
    lines = [f"buckets: on ({d.min_bucket}–{d.max_bucket} px sides, step {d.bucket_step}, at most {d.resolution}² "
             f"pixels{', no upscale' if d.bucket_no_upscale else ''}; {crop} crops)" if d.buckets else
             f"buckets: off ({d.resolution}×{d.resolution} {crop} crops; data.buckets=true trains whole images)",
             f"captions: sidecars {d.caption_extension or '.txt or .caption'}, dropout {d.caption_dropout}, "
             f"shuffle {'on' if d.shuffle_caption else 'off'} (keep_tokens {d.keep_tokens})"]
    spec = spec_of(d)
    if spec is not None:
        report = bucket_report([(r.width, r.height) for r in training_records(cfg)], spec)
        lines.append(format_buckets(report["rows"], report["settings"]))
    return "\n".join(lines)


def placements_of(records: list[ImageRecord], cfg) -> list[Placement] | None:
    """Each record's bucket under cfg.data's bucket settings (None when data.buckets is off)."""
    spec = spec_of(cfg.data)
    return None if spec is None else [spec.place(r.width, r.height) for r in records]


def image_set(records, cfg, vae, *, cache_dir: str = "", placements: list[Placement] | None = None) -> ImageSet:
    """ImageDataset over `records` (+ latent cache when `train.cache_latents`), in buckets with `placements`."""
    d = cfg.data
    ds = ImageDataset(records, resolution=d.resolution, center_crop=d.center_crop or cfg.train.cache_latents,
                      random_flip=False, caption=None, max_pixels=d.max_pixels, placements=placements)
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
