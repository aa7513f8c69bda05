"""Results figures from the evaluation tables (customgen.evaluate.load_results): metric bars, baseline deltas,
trade-off curves with the Pareto front, sample grids. Each returns a matplotlib Figure (no pyplot state).

Every figure carries a footer naming the command, device and model that produced the numbers, and smoke
results say so in the title.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from PIL import Image

from customgen.evaluate.generate import BASELINE
from customgen.evaluate.report import SMOKE_NOTE
from customgen.kinds import RECIPES

METHOD_ORDER = [BASELINE, *RECIPES]  # the baseline, then the recipes in the registry's plot order
METHOD_COLORS = {BASELINE: "tab:gray"} | {name: r.color for name, r in RECIPES.items()}
DIRECTION = {"clip_content": "↓ content kept", "clip_style": "↓ closer to style", "style_strength": "1 = baseline",
             "ssim": "↑ structure kept", "lpips": "↓ closer to content", "fid": "↓", "kid": "↓",
             "art_fid": "↓",
             "seconds_per_image": "↓"}
BAR_METRICS = ("clip_content", "clip_style", "style_strength", "ssim", "lpips", "kid")


def titled(title: str, smoke: bool) -> str:
    """The title, with the smoke warning on a second line when the numbers come from random networks."""
    return f"{title}\n({SMOKE_NOTE})" if smoke else title


def _finish(fig: Figure, title: str, smoke: bool, provenance: str) -> Figure:
    fig.suptitle(titled(title, smoke), fontsize=11, color="tab:red" if smoke else "black")
    if provenance:  # wrapped to the figure's width (~15 characters per inch at 7 pt), at most 4 lines
        lines = textwrap.wrap(provenance, width=max(40, int(fig.get_figwidth() * 15)))
        text = "\n".join(lines[:4]) + (" …" if len(lines) > 4 else "")
        fig.text(0.5, 0.0, text, ha="center", va="top", fontsize=7, color="dimgray")
    return fig


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(_r=df["method"].map(_method_rank)).sort_values(["style", "_r", "model"]).drop(columns="_r")


def plot_metric_bars(metrics: pd.DataFrame, *, columns=BAR_METRICS, smoke: bool = False,
                     provenance: str = "") -> Figure:
    """Bars (mean ± std) per model, grouped by reference style, one panel per metric."""
    df = _sorted(metrics)
    styles = list(dict.fromkeys(df["style"]))
    fig = Figure(figsize=(4.2 * min(3, len(columns)), 3.4 * math.ceil(len(columns) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(columns) / 3), min(3, len(columns)), squeeze=False)).ravel()
    for ax, col in zip(axes, columns):
        for g, style in enumerate(styles):
            rows = df[df["style"] == style]
            width = 0.8 / len(rows)
            for i, r in enumerate(rows.itertuples()):
                std = getattr(r, f"{col}_std", math.nan)
                ax.bar(g - 0.4 + width * (i + 0.5), getattr(r, col), width, yerr=None if pd.isna(std) else std,
                       color=METHOD_COLORS.get(r.method, "tab:brown"), capsize=2, label=r.method)
        ax.set_xticks(range(len(styles)), [s or "(none)" for s in styles], rotation=20, fontsize=8)
        ax.set_title(f"{col} ({DIRECTION.get(col, '')})", fontsize=9)
    for ax in axes[len(columns):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="outside right upper", fontsize=8, frameon=False)
    return _finish(fig, "Metrics per method and style (mean ± std over content images)", smoke, provenance)


def baseline_deltas(metrics: pd.DataFrame, columns=BAR_METRICS) -> pd.DataFrame:
    """Each style row minus the baseline row of the same style (and strength), per metric."""
    base = metrics[metrics["model"] == BASELINE].set_index(["style", "strength"])
    rows = []
    for r in metrics[metrics["model"] != BASELINE].itertuples():
        key = (r.style, r.strength)
        if key not in base.index:
            continue
        b = base.loc[key]
        rows.append({"model": r.model, "method": r.method, "style": r.style}
                    | {c: getattr(r, c) - b[c] for c in columns}
                    | {f"{c}_std": getattr(r, f"{c}_std") for c in columns})
    return pd.DataFrame(rows)


def plot_baseline_comparison(metrics: pd.DataFrame, *, columns=BAR_METRICS, smoke: bool = False,
                             provenance: str = "") -> Figure:
    """Method − baseline per metric (same style, contents, seed, strength); error bars: the method's std."""
    delta = _sorted(baseline_deltas(metrics, columns)) if (metrics["model"] != BASELINE).any() else pd.DataFrame()
    labels = [f"{r.model} ({r.style})" for r in delta.itertuples()] if len(delta) else []
    fig = Figure(figsize=(4.0 * min(3, len(columns)), max(2.5, 0.35 * len(labels) + 1.5) * math.ceil(len(columns) / 3)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(columns) / 3), min(3, len(columns)), squeeze=False)).ravel()
    for ax, col in zip(axes, columns):
        if len(delta):
            std = delta[f"{col}_std"].to_numpy(dtype=float)
            ax.barh(labels, delta[col], xerr=np.where(np.isnan(std), 0, std), capsize=2,
                    color=[METHOD_COLORS.get(m, "tab:brown") for m in delta["method"]])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"Δ {col} vs baseline ({DIRECTION.get(col, '')})", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(columns):]:
        ax.set_axis_off()
    return _finish(fig, "Methods against plain SD img2img (Δ = method − baseline)", smoke, provenance)


def plot_tradeoff(sweep: pd.DataFrame, *, smoke: bool = False, provenance: str = "") -> Figure:
    """CLIP-content vs CLIP-style per style: a curve per model (and LoRA scale) over strength; Pareto front in black."""
    styles = list(dict.fromkeys(sweep["style"]))
    fig = Figure(figsize=(5.2 * min(3, len(styles)), 4.2 * math.ceil(len(styles) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(styles) / 3), min(3, len(styles)), squeeze=False)).ravel()
    for ax, style in zip(axes, styles):
        df = sweep[sweep["style"] == style]
        for (model, method), g in _sorted(df).groupby(["model", "method"], sort=False):
            curves = list(g.groupby(g["style_scale"].fillna(1.0), sort=True))  # one curve per LoRA scale
            for rank, (scale, c) in enumerate(curves):
                c = c.sort_values("strength")
                ax.plot(c["clip_content"], c["clip_style"], marker="o", ms=4, ls="--" if method == BASELINE else "-",
                        color=METHOD_COLORS.get(method, "tab:brown"), alpha=0.4 + 0.6 * (rank + 1) / len(curves),
                        label=f"{model} w={scale:g}" if len(curves) > 1 else model)
                for r in c.itertuples():
                    ax.annotate(f"{r.strength:g}", (r.clip_content, r.clip_style), fontsize=6, alpha=0.7,
                                xytext=(3, 3), textcoords="offset points")
        front = df[df["pareto"].astype(bool)].sort_values("clip_content")
        ax.step(front["clip_content"], front["clip_style"], where="post", color="black", lw=1.2, label="Pareto front")
        ax.scatter(front["clip_content"], front["clip_style"], s=60, facecolors="none", edgecolors="black", zorder=3)
        ax.set(xlabel="CLIP-content (↓ content kept)", ylabel="CLIP-style (↓ closer to style)",
               title=style or "(none)")
        ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(styles):]:
        ax.set_axis_off()
    return _finish(fig, "Content–style trade-off (labels: img2img strength)", smoke, provenance)


def _thumb(path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        return np.asarray(im)


def plot_samples(per_image: pd.DataFrame, style: str, *, n_contents: int = 3, thumb: int = 192,
                 smoke: bool = False, provenance: str = "") -> Figure:
    """Rows: content images; columns: content | baseline | each model of `style` (LoRA, DreamBooth, TI order)."""
    df = _sorted(per_image[per_image["style"].fillna("") == style])
    models = list(dict.fromkeys(df["model"]))
    contents = list(dict.fromkeys(df["content"]))[:n_contents]
    cols = ["content"] + models
    fig = Figure(figsize=(2.2 * len(cols), 2.3 * max(1, len(contents))), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(1, len(contents)), len(cols), squeeze=False))
    for i, content in enumerate(contents):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.set_axis_off()
            hit = df[(df["content"] == content) & (df["model"] == col)]
            path = content if col == "content" else (hit["output"].iloc[0] if len(hit) else None)
            if path is not None:
                ax.imshow(_thumb(path, thumb))
            flag = hit["flag"].iloc[0] if len(hit) and isinstance(hit["flag"].iloc[0], str) else ""
            if i == 0 or flag:
                method = hit["method"].iloc[0] if len(hit) else ""
                ax.set_title(f"{col}" + (f"\n{method}" if method and method != col else "")
                             + (f" [{flag}]" if flag else ""), fontsize=7)
    return _finish(fig, f"Samples — {style or '(no style)'}", smoke, provenance)


def save_result_plots(results, folder: str | Path, *, dpi: int = 110) -> dict[str, Path]:
    """Write every results figure of `results` (customgen.evaluate.Results) as PNG under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(smoke=results.smoke, provenance=results.provenance)
    figs = {"metric_bars": plot_metric_bars(results.metrics, **kw),
            "baseline_comparison": plot_baseline_comparison(results.metrics, **kw)}
    if results.sweep is not None and len(results.sweep):
        figs["tradeoff"] = plot_tradeoff(results.sweep, **kw)
    for style in dict.fromkeys(results.per_image["style"].fillna("")):
        figs[f"samples_{style or 'none'}"] = plot_samples(results.per_image, style, **kw)
    return write_figures(figs, folder, dpi=dpi)


def write_figures(figs: dict, folder: Path, *, dpi: int) -> dict[str, Path]:
    """Save each named figure as folder/NAME.png; name → path."""
    paths = {}
    for name, fig in figs.items():
        paths[name] = folder / f"{name}.png"
        fig.savefig(paths[name], dpi=dpi, bbox_inches="tight")
    return paths
