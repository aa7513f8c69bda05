"""Sweeps for the inference notebooks: stylize each content over one knob's values, time each image, plot a grid."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from customgen.inference.images import load_contents, save_image
from customgen.inference.img2img import stylize
from customgen.inference.library import StyleLibrary, as_list
from customgen.inference.session import get_session
from customgen.memory import sync
from customgen.request import DEFAULT_MODEL

KNOBS = {"strength": "strength", "scale": "scales", "stylization": "stylization"}  # sweep name → Request field


@dataclass
class Grid:
    """Outputs of a sweep: images[row][col] for content row and knob value col, with seconds per image."""

    vary: str
    values: list[float]
    contents: list[Image.Image]
    images: list[list[Image.Image]] = field(default_factory=list)
    seconds: list[list[float]] = field(default_factory=list)
    label: str = ""

    def names(self) -> list[str]:
        """A short name per content row (file stem, else its index)."""
        return [Path(c.info.get("source", "")).stem or f"content{i}" for i, c in enumerate(self.contents)]


def sweep(contents, styles=None, *, vary: str, values, label: str = "", **kwargs) -> Grid:
    """Stylize each content at every value of `vary` (strength | scale | stylization); loads are not timed.
    GPU work is asynchronous: each image is timed between two syncs, so what finished is what is counted."""
    if vary not in KNOBS:
        raise ValueError(f"unknown knob {vary!r}; choose from {', '.join(KNOBS)}")
    images = load_contents(contents)
    session = get_session(kwargs.pop("model", DEFAULT_MODEL), device=kwargs.pop("device", None),
                          dtype=kwargs.pop("dtype", None))
    library = StyleLibrary(kwargs.get("styles_dir"))
    for ref in as_list(styles):
        session.load(library.resolve(ref))  # weights load once, before the clock starts
    grid = Grid(vary, list(values), images, label=label)
    for content in images:
        row, secs = [], []
        for value in grid.values:
            sync()
            start = time.perf_counter()
            row.append(stylize(content, styles, model=session, **{KNOBS[vary]: value}, **kwargs))
            sync()
            secs.append(time.perf_counter() - start)
        grid.images.append(row)
        grid.seconds.append(secs)
    return grid


def plot_grid(grid: Grid, *, cell: float = 2.2) -> Figure:
    """Matplotlib figure: one row per content (the content first), one column per knob value."""
    rows, cols = len(grid.contents), len(grid.values) + 1
    fig = Figure(figsize=(cell * cols, cell * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (content, outputs, secs) in enumerate(zip(grid.contents, grid.images, grid.seconds)):
        axes[r][0].imshow(content)
        axes[r][0].set_title("content" if r == 0 else "", fontsize=9)
        for c, (img, value, sec) in enumerate(zip(outputs, grid.values, secs), start=1):
            axes[r][c].imshow(img)
            axes[r][c].set_title(f"{grid.vary} {value:g}\n{sec:.2f} s", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(grid.label or f"{grid.vary} sweep")
    fig.tight_layout()
    return fig


def timing_table(grid: Grid):
    """pandas DataFrame: content, knob value, seconds (one row per image)."""
    rows = [{"content": name, grid.vary: value, "seconds": sec}
            for name, values in zip(grid.names(), grid.seconds) for value, sec in zip(grid.values, values)]
    return pd.DataFrame(rows)


def save_grid(grid: Grid, folder: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Write every image (PNG with settings), the grid figure and the timings CSV under folder/name/."""
    out = Path(folder) / name
    for row_name, outputs in zip(grid.names(), grid.images):
        for value, img in zip(grid.values, outputs):
            save_image(img, out / f"{row_name}_{grid.vary}{value:g}.png", overwrite=overwrite)
    fig = plot_grid(grid)
    fig.savefig(out / "grid.png", dpi=100)
    timing_table(grid).to_csv(out / "timings.csv", index=False)
    return out
