"""Subject figures from the results tables (customgen.evaluate.subjects.load_subject_results): metrics against the
training step with the baseline drawn, the identity–fidelity scatter with its Pareto front and the best step, and a
sample grid (steps × prompts). Each returns a matplotlib Figure; footers name the command, device and model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from customgen.evaluate.generate import BASELINE
from customgen.evaluate.plots import _finish, _thumb, write_figures

PANELS = [("identity", ["dino", "clip_i"], "cosine to the instance photos ↑"),
          ("CLIP-T", ["clip_t"], "prompt fidelity ↑"), ("DIV", ["div"], "diversity: LPIPS within a prompt ↑"),
          ("PRES", ["pres"], "class drift onto the subject ↓")]
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "div": "DIV", "pres": "PRES"}
STYLES = {"dino": "-", "clip_i": "--"}


def _colors(subjects: list[str]) -> dict[str, str]:
    return {s: f"C{i % 10}" for i, s in enumerate(subjects)}


def plot_subject_curves(metrics: pd.DataFrame, *, smoke: bool = False, provenance: str = "") -> Figure:
    """Identity (DINO, CLIP-I), CLIP-T, DIV and PRES against the training step, mean ± std; the baseline (the base
    model) as a dotted line per subject, the best step as a star."""
    colors = _colors(list(dict.fromkeys(metrics["subject"])))
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    for ax, (title, cols, what) in zip(fig.subplots(2, 2).ravel(), PANELS):
        for subject, df in metrics.groupby("subject", sort=False):
            steps = df[df["model"] != BASELINE].sort_values("step")
            base = df[df["model"] == BASELINE]
            for col in cols:
                label = f"{subject} {LABELS[col]}" if len(cols) > 1 else subject
                ax.errorbar(steps["step"], steps[col], yerr=steps[f"{col}_std"].fillna(0), marker="o", ms=4,
                            capsize=2, ls=STYLES.get(col, "-"), color=colors[subject], label=label)
                if len(base) and math.isfinite(base[col].iloc[0]):
                    ax.axhline(base[col].iloc[0], ls=":", color=colors[subject], lw=1,
                               label=f"{subject} baseline" + (f" {LABELS[col]}" if len(cols) > 1 else ""))
                best = steps[steps["best"].astype(bool)]
                ax.scatter(best["step"], best[col], marker="*", s=160, color=colors[subject], edgecolors="black",
                           zorder=4)
        ax.set(xlabel="training step", ylabel=what, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
    return _finish(fig, "Subject metrics over training (★ best step; dotted: base model)", smoke, provenance)


def plot_identity_fidelity(metrics: pd.DataFrame, *, margin: float = math.nan, smoke: bool = False,
                           provenance: str = "") -> Figure:
    """DINO (identity) against CLIP-T (fidelity) per subject: one point per step (labelled), the baseline, the
    Pareto front, the CLIP-T floor (baseline − margin) and the best step."""
    subjects = list(dict.fromkeys(metrics["subject"]))
    fig = Figure(figsize=(5.4 * min(3, len(subjects)), 4.4 * math.ceil(len(subjects) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(subjects) / 3), min(3, len(subjects)), squeeze=False)).ravel()
    for ax, subject in zip(axes, subjects):
        df = metrics[metrics["subject"] == subject]
        steps = df[df["model"] != BASELINE].sort_values("step")
        base = df[df["model"] == BASELINE]
        sc = ax.scatter(steps["clip_t"], steps["dino"], c=steps["step"], cmap="viridis", s=40, zorder=3)
        fig.colorbar(sc, ax=ax, label="training step", ticks=MaxNLocator(integer=True))
        for r in steps.itertuples():
            ax.annotate(f"{r.step}", (r.clip_t, r.dino), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = steps[steps["pareto"].astype(bool)].sort_values("clip_t")
        ax.plot(front["clip_t"], front["dino"], color="black", lw=1.2, label="Pareto front")
        best = steps[steps["best"].astype(bool)]
        ax.scatter(best["clip_t"], best["dino"], marker="*", s=220, facecolors="none", edgecolors="red", zorder=4,
                   label="best step")
        if len(base):
            ax.scatter(base["clip_t"], base["dino"], marker="X", s=80, color="tab:gray", label="baseline", zorder=3)
            if math.isfinite(margin):
                ax.axvline(base["clip_t"].iloc[0] - margin, color="tab:red", ls="--", lw=1,
                           label=f"CLIP-T floor (baseline − {margin:g})")
        ax.set(xlabel="CLIP-T (prompt fidelity ↑)", ylabel="DINO (identity ↑)", title=subject)
        ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(subjects):]:
        ax.set_axis_off()
    return _finish(fig, "Identity against prompt fidelity, per training step", smoke, provenance)


def plot_subject_samples(per_image: pd.DataFrame, subject: str, *, n_prompts: int = 4, thumb: int = 160,
                         smoke: bool = False, provenance: str = "") -> Figure:
    """Rows: the baseline, then each step; columns: the first image of the first prompts, then the class prompt."""
    df = per_image[(per_image["subject"] == subject) & (per_image["index"] == 0)]
    prompts = list(dict.fromkeys(df[df["role"] == "prompt"]["prompt"]))[:n_prompts]
    prompts += list(dict.fromkeys(df[df["role"] == "class"]["prompt"]))
    rows = df.assign(_b=df["model"] != BASELINE).sort_values(["_b", "step"])[["model", "step"]].drop_duplicates()
    fig = Figure(figsize=(2.1 * len(prompts), 2.2 * max(1, len(rows))), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), max(1, len(prompts)), squeeze=False))
    for i, (model, step) in enumerate(rows.itertuples(index=False)):
        for j, prompt in enumerate(prompts):
            ax = axes[i, j]
            ax.set_axis_off()
            hit = df[(df["model"] == model) & (df["step"] == step) & (df["prompt"] == prompt)]
            if len(hit):
                ax.imshow(_thumb(hit["output"].iloc[0], thumb))
            if i == 0:
                ax.set_title(prompt, fontsize=6, wrap=True)
            if j == 0:
                ax.text(-0.05, 0.5, "baseline" if model == BASELINE else f"step {step}", transform=ax.transAxes,
                        rotation=90, ha="right", va="center", fontsize=8)
    return _finish(fig, f"Samples — {subject} (first seed; last column: the class prompt)", smoke, provenance)


def save_subject_plots(results, folder: str | Path, *, dpi: int = 110) -> dict[str, Path]:
    """Write every subject figure of `results` (SubjectResults) as PNG under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(smoke=results.smoke, provenance=results.provenance)
    figs = {"subject_curves": plot_subject_curves(results.metrics, **kw),
            "subject_tradeoff": plot_identity_fidelity(results.metrics, margin=results.margin, **kw)}
    for subject in dict.fromkeys(results.per_image["subject"]):
        figs[f"subject_samples_{subject}"] = plot_subject_samples(results.per_image, subject, **kw)
    return write_figures(figs, folder, dpi=dpi)
