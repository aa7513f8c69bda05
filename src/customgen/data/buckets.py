"""Aspect-ratio buckets as kohya's sd-scripts make and fill them (kohya-ss/sd-scripts@48d368f: `make_bucket_resolutions`
in library/model_util.py; `BucketManager.select_bucket` and `trim_and_resize_if_required` in library/train_util.py).

Every bucket has at most `resolution`² pixels and sides that are multiples of `step`. An image goes to the bucket whose
aspect ratio is closest to its own (the first of the sorted table on a tie, as numpy's argmin picks), is resized to
cover it and cropped to it. With `no_upscale` there is no table: the bucket is the image's own size, shrunk to at most
`resolution`² pixels and rounded down to the step (an image with a side below the step gets none: it is small).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from customgen.errors import Notice, UserError

STEP_MULTIPLE = 64  # SD v1's UNet halves the latent three times: pixel sides must divide by 8·8 (kohya asserts it)
CONFIG_NAMES = {"resolution": "data.resolution", "min_bucket": "data.min_bucket", "max_bucket": "data.max_bucket",
                "step": "data.bucket_step"}  # how errors name the settings (the scan command passes its flags)

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Placement:
    """Where an image goes: its bucket and the size it is resized to before the crop, both (width, height)."""

    bucket: Size
    resized: Size

    @property
    def kept(self) -> float:
        """The share of the image's pixels the crop keeps."""
        return self.bucket[0] * self.bucket[1] / (self.resized[0] * self.resized[1])

    def crop_box(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(left, top) of the crop: centred (the excess // 2), or uniform over 0..excess from `generator`."""
        def offset(excess: int) -> int:
            if generator is None or excess <= 0:
                return max(excess, 0) // 2
            return int(torch.randint(0, excess + 1, (1,), generator=generator))
        return offset(self.resized[0] - self.bucket[0]), offset(self.resized[1] - self.bucket[1])


@dataclass(frozen=True)
class BucketSpec:
    """Checked bucket settings (see `bucket_spec`)."""

    resolution: int
    min_bucket: int
    max_bucket: int
    step: int
    no_upscale: bool = False

    @cached_property
    def table(self) -> list[Size]:
        """The sorted bucket sizes: the square one (the largest multiple of the step within the resolution) and, for
        each width from min_bucket to max_bucket in steps, the tallest height (≤ max_bucket, a multiple of the step)
        within resolution² pixels, with its transpose, when that height reaches min_bucket."""
        area, step = self.resolution ** 2, self.step
        sizes = {(self.resolution // step * step,) * 2}
        for width in range(self.min_bucket, self.max_bucket + 1, step):
            height = min(self.max_bucket, area // width // step * step)
            if height >= self.min_bucket:
                sizes |= {(width, height), (height, width)}
        return sorted(sizes)

    def largest(self) -> Size:
        """The bucket with the most pixels (the squarest of those on a tie): what the memory plan predicts for. With
        no_upscale, the square of the resolution rounded down to the step (no image's bucket has more pixels)."""
        if self.no_upscale:
            side = self.resolution // self.step * self.step
            return side, side
        return max(self.table, key=lambda s: (s[0] * s[1], -abs(s[0] - s[1])))

    def place(self, width: int, height: int) -> Placement | None:
        """The image's bucket and resize; None when no_upscale leaves it a side below the step (small: skipped)."""
        if self.no_upscale:
            return self._own_size(width, height)
        ratio = width / height
        if (width, height) in self.table:
            bucket = (width, height)
        else:  # the smallest aspect-ratio error; min() keeps the first of equal errors, as argmin does
            bucket = min(self.table, key=lambda s: abs(s[0] / s[1] - ratio))
        scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width  # cover the bucket
        return Placement(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))

    def _own_size(self, width: int, height: int) -> Placement | None:
        """no_upscale: the image's size, shrunk to area ≤ resolution² keeping its aspect ratio (the rounding of the
        width or of the height, whichever keeps the ratio closer), then the bucket rounded down to the step."""
        ratio, area = width / height, self.resolution ** 2
        resized = (width, height)
        if width * height > area:
            w, h = math.sqrt(area * ratio), area / math.sqrt(area * ratio)
            by_w = self._round(w)
            by_h = self._round(h)
            err_w = abs(by_w / self._round(by_w / ratio) - ratio) if self._round(by_w / ratio) else math.inf
            err_h = abs(self._round(by_h * ratio) / by_h - ratio) if by_h else math.inf
            resized = (by_w, int(by_w / ratio + 0.5)) if err_w < err_h else (int(by_h * ratio + 0.5), by_h)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return Placement(bucket, resized) if min(bucket) > 0 else None

    def _round(self, x: float) -> int:
        """Round to the nearest pixel, then down to the step."""
        x = int(x + 0.5)
        return x - x % self.step


def bucket_spec(resolution: int, *, min_bucket: int = 256, max_bucket: int = 1024, step: int = 64,
                no_upscale: bool = False, names: dict[str, str] | None = None) -> BucketSpec:
    """Bucket settings checked as kohya checks them: the step a positive multiple of 64, min/max rounded to the step
    (min down, max up) with one notice, then min ≤ resolution ≤ max; `names` says how errors name the settings."""
    n = names or CONFIG_NAMES
    if step <= 0 or step % STEP_MULTIPLE:
        raise UserError(f"{n['step']} must be a positive multiple of {STEP_MULTIPLE} (SD v1's UNet needs sides "
                        f"divisible by {STEP_MULTIPLE}), got {step}")
    low = min_bucket - min_bucket % step
    high = max_bucket + (step - max_bucket % step) % step
    changed = [f"{n[k]} {a} → {b}" for k, a, b in (("min_bucket", min_bucket, low), ("max_bucket", max_bucket, high))
               if a != b]
    if low <= 0:
        raise UserError(f"{n['min_bucket']} must be at least {n['step']} ({step}), got {min_bucket}")
    if high < low:
        raise UserError(f"{n['max_bucket']} ({max_bucket}) is below {n['min_bucket']} ({min_bucket}): no bucket fits; "
                        f"raise {n['max_bucket']}")
    if changed:
        warnings.warn(f"{', '.join(changed)}: rounded to multiples of {n['step']}={step}, as kohya's sd-scripts round "
                      "them", Notice, stacklevel=2)
    if not low <= resolution <= high:
        raise UserError(f"{n['resolution']} {resolution} is outside [{n['min_bucket']} {low}, {n['max_bucket']} "
                        f"{high}]: set {n['min_bucket']} ≤ {resolution} ≤ {n['max_bucket']} (as kohya asserts)")
    return BucketSpec(resolution, low, high, step, no_upscale)


def spec_of(data) -> BucketSpec | None:
    """The bucket settings of a DataConfig (checked), or None when data.buckets is off."""
    if not data.buckets:
        return None
    return bucket_spec(data.resolution, min_bucket=data.min_bucket, max_bucket=data.max_bucket, step=data.bucket_step,
                       no_upscale=data.bucket_no_upscale)


def place_all(sizes: Sequence[Size], spec: BucketSpec) -> list[Placement | None]:
    """Placement of each (width, height); None for an image too small for no_upscale's buckets."""
    return [spec.place(w, h) for w, h in sizes]


def bucket_counts(placements: Sequence[Placement | None]) -> list[dict]:
    """[{"bucket": [w, h], "count": n}] in the table's order, empty buckets (and small images) left out."""
    counts = Counter(p.bucket for p in placements if p is not None)
    return [{"bucket": list(b), "count": counts[b]} for b in sorted(counts)]


def square_kept(width: int, height: int) -> float:
    """The share of an image's pixels a square center crop keeps."""
    return min(width, height) ** 2 / (width * height)


def bucket_rows(sizes: Sequence[Size], placements: Sequence[Placement | None]) -> list[dict]:
    """Per bucket: images, and the mean share of their pixels kept by the bucket's crop and by a square center crop."""
    rows: dict[Size, list] = {}
    for (w, h), p in zip(sizes, placements):
        if p is not None:
            rows.setdefault(p.bucket, []).append((p.kept, square_kept(w, h)))
    return [{"bucket": list(b), "count": len(v), "kept": sum(k for k, _ in v) / len(v),
             "square_kept": sum(s for _, s in v) / len(v)} for b, v in sorted(rows.items())]


def bucket_report(sizes: Sequence[Size], spec: BucketSpec) -> dict:
    """The bucket settings, each image's placement (None: small), the table rows (`bucket_rows`): what `customgen data
    scan --buckets` adds to its report."""
    placements = place_all(sizes, spec)
    return {"settings": {"resolution": spec.resolution, "min_bucket": spec.min_bucket, "max_bucket": spec.max_bucket,
                         "step": spec.step, "no_upscale": spec.no_upscale, "table": [] if spec.no_upscale else
                         [list(b) for b in spec.table]},
            "placements": placements, "rows": bucket_rows(sizes, placements)}


def format_buckets(rows: Sequence[dict], settings: dict, *, small: int = 0) -> str:
    """The bucket table as text: bucket, images, pixels kept (bucket crop vs square center crop)."""
    res, step = settings["resolution"], settings["step"]
    how = "the image's own size (no upscale)" if settings["no_upscale"] else \
        f"{len(settings['table'])} buckets, sides {settings['min_bucket']}–{settings['max_bucket']} px"
    lines = [f"buckets at {res} px (≤ {res * res:,} pixels, step {step}): {how}",
             f"{'bucket':>11}  {'images':>6}  {'kept':>6}  {'square crop':>11}"]
    lines += [f"{r['bucket'][0]:>5}×{r['bucket'][1]:<5}  {r['count']:>6}  {r['kept']:>6.1%}  {r['square_kept']:>11.1%}"
              for r in rows]
    n = sum(r["count"] for r in rows)
    if n:
        kept = sum(r["kept"] * r["count"] for r in rows) / n
        square = sum(r["square_kept"] * r["count"] for r in rows) / n
        lines.append(f"{'all':>11}  {n:>6}  {kept:>6.1%}  {square:>11.1%}")
    if small:
        lines.append(f"{small} image(s) with a side below the step ({step} px) once shrunk: listed as small, skipped")
    return "\n".join(lines)
