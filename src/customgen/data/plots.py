"""Figures for the data EDA notebook. Every function returns a matplotlib Figure; none shows it.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so the package keeps no global
figure state; notebooks display them with `display(fig)` or save them with `fig.savefig(...)`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from customgen.data.io import DEFAULT_MAX_PIXELS, ImageRejected, load_image


def plot_style_distribution(report: dict, *, top: int = 30) -> Figure:
    """Horizontal bars: usable (and small) images per style / label, largest first, at most `top` labels."""
    counts = list(report["counts"].items())[:top]
    small = report.get("small_counts", {})
    labels = [k or "(root)" for k, _ in counts][::-1]
    usable = np.array([v for _, v in counts][::-1])
    tiny = np.array([small.get(k, 0) for k, _ in counts][::-1])
    fig = Figure(figsize=(8, max(2.5, 0.28 * len(labels) + 1)), layout="constrained")
    ax = fig.subplots()
    ax.barh(labels, usable, color="tab:blue", label="usable")
    if tiny.any():
        ax.barh(labels, tiny, left=usable, color="tab:orange", label=f"small (< {report['min_size']} px)")
    ax.set_xlabel("images")
    ax.set_title(f"Images per label ({report['layout']}, {report['n_usable']} usable)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_image_sizes(report: dict) -> Figure:
    """Width × height scatter and a histogram of the short side, with the min-size threshold marked."""
    images = report["images"]
    w = np.array([im["width"] for im in images], dtype=float)
    h = np.array([im["height"] for im in images], dtype=float)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_scatter, ax_hist = fig.subplots(1, 2)
    small = np.array([bool(im.get("small")) for im in images], dtype=bool)
    ax_scatter.scatter(w[~small], h[~small], s=6, alpha=0.4, label="usable")
    ax_scatter.scatter(w[small], h[small], s=6, alpha=0.6, color="tab:orange", label="small")
    ax_scatter.legend()
    ax_scatter.set(xlabel="width (px)", ylabel="height (px)", title=f"Image sizes (n={len(images)})")
    short = np.minimum(w, h)
    ax_hist.hist(short, bins=min(50, max(5, len(short) // 4)), color="tab:green")
    ax_hist.axvline(report["min_size"], color="tab:red", linestyle="--", label=f"min_size {report['min_size']}")
    ax_hist.set(xlabel="short side (px)", ylabel="images", title="Short side")
    ax_hist.legend()
    return fig


def _thumbnail(path: str | Path, size: int, max_pixels: int | None) -> np.ndarray | None:
    """A size×size-bounded RGB thumbnail as an array, or None for an unusable file."""
    try:
        img = load_image(path, max_pixels=max_pixels, draft_size=(size, size))
    except ImageRejected:
        return None
    img.thumbnail((size, size))
    return np.asarray(img)


def plot_sample_grid(groups: Mapping[str, Sequence[str | Path]], *, per_group: int = 4, thumb: int = 160,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Figure:
    """One row per group (style, duplicate set, ...) showing its first `per_group` images."""
    rows = list(groups.items())
    fig = Figure(figsize=(2.2 * per_group, 2.2 * max(1, len(rows))), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), per_group, squeeze=False))
    for r, (name, paths) in enumerate(rows):
        for c in range(per_group):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(paths) and (arr := _thumbnail(paths[c], thumb, max_pixels)) is not None:
                ax.imshow(arr)
                ax.set_title(Path(paths[c]).name[:22], fontsize=7)
        axes[r, 0].text(-0.05, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    return fig


def skipped_table(report: dict, *, examples: int = 2) -> pd.DataFrame:
    """Skipped files by reason: count and a few example paths with details (a table instead of a figure)."""
    by_reason: dict[str, list[dict]] = {}
    for s in report["skipped"]:
        by_reason.setdefault(s["reason"], []).append(s)
    rows = [{"reason": reason, "count": len(items),
             "examples": "; ".join(f"{Path(i['path']).name} ({i['detail']})" for i in items[:examples])}
            for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
    if report["n_small"]:
        names = "; ".join(Path(s["path"]).name for s in report["small"][:examples])
        rows.append({"reason": "small", "count": report["n_small"], "examples": names})
    return pd.DataFrame(rows, columns=["reason", "count", "examples"])


def plot_aspect_ratios(sizes: Sequence[tuple[int, int]], rows: Sequence[dict], *, title: str = "") -> Figure:
    """Aspect-ratio histogram (width / height, log scale) with the buckets used marked, and images per bucket with the
    share of pixels kept against a square center crop (`rows`: customgen.data.buckets.bucket_rows)."""
    ratios = np.array([w / h for w, h in sizes], dtype=float)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_hist, ax_bars = fig.subplots(1, 2)
    bins = np.geomspace(min(ratios.min(), 0.25), max(ratios.max(), 4.0), 30) if len(ratios) else 10
    ax_hist.hist(ratios, bins=bins, color="tab:blue")
    for r in rows:
        ax_hist.axvline(r["bucket"][0] / r["bucket"][1], color="tab:red", linestyle=":", linewidth=1)
    ax_hist.set_xscale("log")
    ax_hist.axvline(1.0, color="black", linewidth=1, label="square")
    ax_hist.set(xlabel="aspect ratio width / height (dotted: buckets used)", ylabel="images",
                title=f"Aspect ratios{f' of {title}' if title else ''} (n={len(ratios)})")
    ax_hist.legend()
    labels = [f"{r['bucket'][0]}×{r['bucket'][1]}" for r in rows]
    ax_bars.bar(labels, [r["count"] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        ax_bars.text(i, r["count"], f"{r['kept']:.0%} vs {r['square_kept']:.0%}", ha="center", va="bottom",
                     fontsize=7)
    ax_bars.set(xlabel="bucket (width × height)", ylabel="images",
                title="Images per bucket (pixels kept: bucket vs square crop)")
    ax_bars.tick_params(axis="x", labelrotation=45)
    return fig
