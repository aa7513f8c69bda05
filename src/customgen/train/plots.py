"""Training figures: the loss curve of an artifact's logs/loss.csv (a matplotlib Figure, no pyplot state)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def plot_loss_curve(csv_path: str | Path, *, terms: Sequence[str] = ("loss", "l2", "lpips", "gram", "prior")) -> Figure:
    """Training loss terms over steps, from an artifact's logs/loss.csv."""
    df = pd.read_csv(csv_path)
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for t in terms:
        if t in df and df[t].abs().sum() > 0:
            ax.plot(df["step"], df[t], label=t)
    ax.set(xlabel="step", ylabel="loss", title=f"training loss ({Path(csv_path).parent.parent.name})")
    ax.legend()
    fig.tight_layout()
    return fig
