"""The one value type every metric returns, and the aggregation that leaves flagged rows out."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class MetricResult:
    """One metric value with what it rests on: sample sizes, smoke networks, flags."""

    name: str  # metric name, e.g. "clip_content"
    value: float  # nan when undefined (see flag / note)
    smoke: bool = False  # True when a random-weight network produced it: a plumbing check, not quality
    n: int = 1  # samples behind the value (generated side)
    n_ref: int = 1  # reference samples (content image, style references, reference set)
    std: float = math.nan  # spread where the metric has one (KID over subsets), else nan
    per_item: tuple[float, ...] = field(default=(), repr=False)  # per-reference / per-subset values
    flag: str | None = None  # why this row must stay out of means ("black", "nan", "zero_baseline", ...)
    note: str | None = None  # caveat that does not exclude the row (e.g. "n < dim")

    def __float__(self) -> float:
        return float(self.value)

    def as_row(self) -> dict:
        """Flat dict for a results table (per_item left out)."""
        return {
            "metric": self.name, "value": self.value, "std": self.std, "n": self.n,
            "n_ref": self.n_ref, "smoke": self.smoke, "flag": self.flag, "note": self.note,
        }


@dataclass(frozen=True)
class Summary:
    """Mean and sample std over the rows that were neither flagged nor non-finite."""

    mean: float
    std: float  # sample std (ddof=1); nan when fewer than two rows remain
    n: int  # rows averaged
    n_flagged: int  # rows left out because they carried a flag
    n_nonfinite: int  # unflagged rows left out because their value was nan/inf
    smoke: bool  # any input row came from a smoke network

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(values: Sequence[float | MetricResult], flags: Sequence[str | None] | None = None) -> Summary:
    """Aggregate per-image values, leaving flagged (black/NaN/...) and non-finite rows out of the mean."""
    if flags is None:
        flags = [v.flag if isinstance(v, MetricResult) else None for v in values]
    if len(flags) != len(values):
        raise ValueError(f"summarize: {len(values)} values but {len(flags)} flags")
    smoke = any(isinstance(v, MetricResult) and v.smoke for v in values)
    kept, n_flagged, n_nonfinite = [], 0, 0
    for v, f in zip(values, flags):
        x = float(v)
        if f:
            n_flagged += 1
        elif not math.isfinite(x):
            n_nonfinite += 1
        else:
            kept.append(x)
    arr = np.asarray(kept, dtype=np.float64)
    mean = float(arr.mean()) if arr.size else math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return Summary(mean, std, int(arr.size), n_flagged, n_nonfinite, smoke)
