"""Trade-off sweep: strength × style scale per method → (CLIP-content, CLIP-style) points and their Pareto front.

Lower CLIP-content keeps more of the photo, lower CLIP-style is closer to the style: a point is on the
front when no other point of the same reference style is at least as good on both and better on one.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from customgen.evaluate.generate import Point, baseline_point, style_point

SWEEP_COLUMNS = ["model", "method", "style", "strength", "style_scale", "clip_content", "clip_content_std",
                 "clip_style", "clip_style_std", "style_strength", "n_images", "n_flagged", "pareto", "smoke"]


def pareto_front(points) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (N, 2) array, both coordinates minimised (NaN rows: False).

    Written by hand (a few lines; no dependency has it): row i is dominated when some row j is <= in both
    coordinates and < in at least one. Duplicate points do not dominate each other.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)  # (N, 2)
    ok = np.isfinite(p).all(axis=1)
    le = (p[None, :, :] <= p[:, None, :]).all(axis=2)  # le[i, j]: row j <= row i in both
    lt = (p[None, :, :] < p[:, None, :]).any(axis=2)  # lt[i, j]: row j < row i in one
    dominated = (le & lt & ok[None, :]).any(axis=1)
    return ok & ~dominated


def sweep_points(styles, e) -> list[Point]:
    """Styles whose kind has a scale (LoRA): every strength × scale; the others (DreamBooth, TI): every strength at
    scale 1; the baseline at each strength."""
    points = [baseline_point(s) for s in e.sweep_strengths]
    for style in styles:
        scales = e.sweep_scales if style.kind.has_scale else [1.0]
        points += [style_point(style, s, w) for s in e.sweep_strengths for w in scales]
    return points


def sweep_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Aggregated sweep rows → sweep.csv rows with the Pareto flag per reference style."""
    df = agg.reindex(columns=[c for c in SWEEP_COLUMNS if c != "pareto"]).copy()
    df["pareto"] = False
    for _, idx in df.groupby("style").groups.items():
        df.loc[idx, "pareto"] = pareto_front(df.loc[idx, ["clip_content", "clip_style"]].to_numpy())
    return df[SWEEP_COLUMNS].sort_values(["style", "model", "strength", "style_scale"], ignore_index=True)


def describe_front(sweep: pd.DataFrame) -> str:
    """The Pareto-optimal settings per style, as sentences generated from the sweep table."""
    lines = []
    for style, df in sweep.groupby("style"):
        front = df[df["pareto"]].sort_values("clip_content")
        items = [f"{r.model} (strength {r.strength:g}" + ("" if math.isnan(r.style_scale) else
                 f", scale {r.style_scale:g}") + f": CLIP-content {r.clip_content:.3f}, CLIP-style {r.clip_style:.3f})"
                 for r in front.itertuples()]
        share = front["method"].value_counts()
        lead = f"; most front points: {share.index[0]} ({share.iloc[0]} of {len(front)})" if len(share) else ""
        lines.append(f"{style or '(no style)'}: {len(front)} of {len(df)} points on the front{lead}. "
                     + "; ".join(items))
    return "\n".join(lines)
