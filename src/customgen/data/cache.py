"""Latent cache: VAE-encode each training image once (memory and optionally disk, safetensors).

Re-encoding the same 5-50 images every step dominates small-dataset training, so we store each image's
latent *distribution* (mean and std, already scaled by `vae.config.scaling_factor`) and draw
`mean + std * eps` per step: the behaviour of diffusers' `--cache_latents`, deterministic under a
torch.Generator. Only deterministic preprocessing can be cached (center crop, no random flip). With aspect-ratio
buckets each image is encoded at its own bucket (the key holds the bucket and the resize, so an image that keeps its
bucket when the settings change is not encoded again) and the rows have their buckets' shapes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customgen.data.buckets import Placement
from customgen.data.io import DEFAULT_MAX_PIXELS, load_image
from customgen.data.scan import ImageRecord
from customgen.data.transforms import ImageDataset, as_records, bucket_pixels, build_transform
from customgen.errors import UserError

CACHE_FORMAT = 1  # bump when the stored tensors change meaning; old files are then simply not found


@dataclass
class CachedLatents:
    """Scaled latent distributions of N images, in the order asked for: mean and std (N, 4, R/8, R/8), or with
    buckets N tensors (4, h/8, w/8) each (a batch takes rows of one bucket)."""

    mean: torch.Tensor | list[torch.Tensor]
    std: torch.Tensor | list[torch.Tensor]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, indices: Sequence[int] | torch.Tensor | None = None, *,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Latents mean + std * eps for `indices` (all when None), eps drawn from `generator`, or row i's from
        generator[i] (one generator per example: its latent does not depend on the batch it is in)."""
        mean, std = self._rows(self.mean, indices), self._rows(self.std, indices)
        if isinstance(generator, Sequence):
            eps = randn_rows(generator, mean.shape[1:]).to(mean.device, mean.dtype)
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + std * eps

    @staticmethod
    def _rows(rows: torch.Tensor | list[torch.Tensor], indices) -> torch.Tensor:
        if isinstance(rows, list):
            return torch.stack([rows[int(i)] for i in (range(len(rows)) if indices is None else indices)])
        return rows if indices is None else rows[torch.as_tensor(indices, dtype=torch.long)]


def randn_rows(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal rows (len(generators), *shape), float32 on the CPU, row i drawn from generators[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Short hash of a VAE's config and first/last weights, so a disk cache never mixes two VAEs."""
    params = list(vae.parameters())
    sums = [float(p.detach().double().sum()) for p in (params[0], params[-1])] if params else []
    config = json.dumps(dict(getattr(vae, "config", {})), sort_keys=True, default=str)
    return hashlib.sha256(f"{config}|{sums}".encode()).hexdigest()[:16]


class LatentCache:
    """Encode images once with `vae`; `get(dataset or records)` returns CachedLatents (scaled mean and std)."""

    def __init__(self, vae: torch.nn.Module, *, cache_dir: str | Path | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 4, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        first = next(vae.parameters())
        self.vae, self.batch_size, self.max_pixels = vae, batch_size, max_pixels
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.scaling = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae_key = vae_fingerprint(vae)
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # images this instance sent through the VAE encoder

    def key(self, path: str, *, resolution: int, placement: Placement | None = None) -> str:
        """Cache key: file path, mtime, size, resolution (or bucket and resize), crop, VAE and dtype (any change →
        re-encode)."""
        st = os.stat(path)
        size = resolution if placement is None else ["bucket", *placement.bucket, *placement.resized]
        raw = [CACHE_FORMAT, os.path.abspath(path), st.st_mtime_ns, st.st_size, size, "center",
               self.vae_key, str(self.dtype)]
        return hashlib.sha256(json.dumps(raw).encode()).hexdigest()[:32]

    def _from_disk(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) stored on disk for `key`, or None."""
        if self.cache_dir is None or not (self.cache_dir / f"{key}.safetensors").is_file():
            return None
        tensors = load_file(self.cache_dir / f"{key}.safetensors")
        return tensors["mean"], tensors["std"]

    def _to_disk(self, key: str, mean: torch.Tensor, std: torch.Tensor, path: str) -> None:
        """Write one entry atomically (a crash never leaves a half-written file under the real name)."""
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{key}.tmp"
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, tmp,
                  metadata={"path": path, "scaling_factor": str(self.scaling), "format": str(CACHE_FORMAT)})
        os.replace(tmp, self.cache_dir / f"{key}.safetensors")

    @torch.no_grad()
    def _encode(self, records: Sequence[ImageRecord], *, resolution: int,
                placements: Sequence[Placement] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Scaled (mean, std) per record on CPU in float32, encoded in batches (of one bucket each, with
        `placements`: centred crops)."""
        transform = build_transform(resolution=resolution, center_crop=True, random_flip=False)
        pixels_of = lambda i: transform(load_image(records[i].path, max_pixels=self.max_pixels)) if placements is None \
            else bucket_pixels(load_image(records[i].path, max_pixels=self.max_pixels), placements[i])  # noqa: E731
        groups: dict = {}
        for i in range(len(records)):
            groups.setdefault(None if placements is None else placements[i].bucket, []).append(i)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for rows in groups.values():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                pixels = torch.stack([pixels_of(i) for i in batch])
                dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist  # (B, 4, h/8, w/8)
                mean = ((dist.mean - self.shift) * self.scaling).float().cpu()
                std = (dist.std * self.scaling).float().cpu()
                out |= dict(zip(batch, zip(mean, std)))
                self.encoded += len(batch)
        return [out[i] for i in range(len(records))]

    def get(self, items: ImageDataset | Sequence[ImageRecord | str | Path], *,
            resolution: int | None = None) -> CachedLatents:
        """Latent distributions of every record (dataset records, or records/paths at `resolution`); a dataset with
        buckets gives rows of their buckets' shapes."""
        records, resolution = _records_and_resolution(items, resolution)
        placements = getattr(items, "placements", None)
        if not records:
            raise UserError("no images to encode for the latent cache; check the data folder and its scan report")
        keys = [self.key(r.path, resolution=resolution, placement=None if placements is None else placements[i])
                for i, r in enumerate(records)]
        for key in keys:
            if key not in self.memory and (hit := self._from_disk(key)) is not None:
                self.memory[key] = hit
        todo = {k: i for i, k in enumerate(keys) if k not in self.memory}  # the first record of each missing key
        encoded = self._encode([records[i] for i in todo.values()], resolution=resolution,
                               placements=None if placements is None else [placements[i] for i in todo.values()])
        for (key, i), (mean, std) in zip(todo.items(), encoded):
            self.memory[key] = (mean, std)
            self._to_disk(key, mean, std, records[i].path)
        means, stds = [self.memory[k][0] for k in keys], [self.memory[k][1] for k in keys]
        if placements is not None:
            return CachedLatents(means, stds, [r.path for r in records])
        return CachedLatents(torch.stack(means), torch.stack(stds), [r.path for r in records])


def _records_and_resolution(items, resolution: int | None) -> tuple[list[ImageRecord], int]:
    """Records and resolution from a dataset (must be deterministic) or from records + resolution."""
    if isinstance(items, ImageDataset):
        if items.random_flip or not items.center_crop:
            raise UserError("latent caching needs center_crop=True and random_flip=False; change one of them")
        return items.records, items.resolution
    if resolution is None:
        raise ValueError("resolution is required when get() is given records or paths instead of a dataset")
    return as_records(items), resolution
