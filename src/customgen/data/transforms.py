"""Training transforms and the image Dataset (kohya repeats, captions from folder names or sidecars, aspect-ratio
buckets)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from PIL import Image

from customgen.data.buckets import Placement
from customgen.data.io import DEFAULT_MAX_PIXELS, load_image
from customgen.data.scan import ImageRecord


def build_transform(*, resolution: int = 512, center_crop: bool = True, random_flip: bool = False) -> v2.Compose:
    """PIL RGB → float tensor (3, R, R) in [-1, 1]: short-side resize, center/random crop, optional h-flip."""
    steps = [
        v2.ToImage(),
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]  # [0,1] → [-1,1]
    return v2.Compose(steps)


def bucket_pixels(image: Image.Image, placement: Placement, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL RGB → float tensor (3, h, w) in [-1, 1] of its bucket (w, h): resized to cover it (placement.resized), then
    cropped to it as kohya's trim_and_resize_if_required does, centred or at an offset drawn from `generator`."""
    x = v2.functional.resize(v2.functional.to_image(image), [placement.resized[1], placement.resized[0]],
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    left, top = placement.crop_box(generator)
    x = x[:, top:top + placement.bucket[1], left:left + placement.bucket[0]]  # (3, h, w)
    return v2.functional.to_dtype(x, torch.float32, scale=True) * 2 - 1  # [0,1] → [-1,1]


def as_records(items: Sequence[ImageRecord | str | Path]) -> list[ImageRecord]:
    """Records as given; bare paths become records without label, caption or size."""
    return [it if isinstance(it, ImageRecord) else ImageRecord(path=str(it)) for it in items]


class ImageDataset(Dataset):
    """Records → {"pixel_values" (3,R,R) in [-1,1], "path", "caption", "index"}, each record `repeats` times; with
    `placements` (one per record, customgen.data.buckets) each image is (3, h, w) of its own bucket instead."""

    # `index` is the record's position in `records` (shared by its repeats): the row of a LatentCache result.
    # The caption is the record's own (kohya sidecar or "token class"), else `caption`, else "".

    def __init__(self, records: Sequence[ImageRecord | str | Path], *, resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, caption: str | None = None,
                 use_repeats: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 placements: Sequence[Placement] | None = None) -> None:
        self.records = as_records(records)
        self.placements = None if placements is None else list(placements)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.caption, self.max_pixels = caption, max_pixels
        self.transform = build_transform(resolution=resolution, center_crop=center_crop, random_flip=random_flip)
        self.order = [i for i, r in enumerate(self.records) for _ in range(r.repeats if use_repeats else 1)]

    def __len__(self) -> int:
        return len(self.order)

    def caption_of(self, index: int) -> str:
        """Caption of record `index`: its own, else the dataset default, else ""."""
        return self.records[index].caption or self.caption or ""

    def pixels(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Record `index`'s training tensor; in a bucket, a random crop draws from `generator` (centred without one)."""
        image = load_image(self.records[index].path, max_pixels=self.max_pixels)
        if self.placements is None:
            return self.transform(image)
        return bucket_pixels(image, self.placements[index], generator if not self.center_crop else None)

    def __getitem__(self, i: int) -> dict:
        index = self.order[i]
        record = self.records[index]
        return {"pixel_values": self.pixels(index), "path": record.path, "caption": self.caption_of(index),
                "index": index}
