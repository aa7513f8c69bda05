"""Results files under eval.output (metrics.csv/json, per_image.csv, summary.md, sweep.csv, run.json), read back.

Every number in them is computed by `customgen.evaluate.evaluate`; run.json records the command, config,
device, model reference and metric-network sources that produced them.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from customgen.config import config_hash, to_dict
from customgen.errors import UserError
from customgen.evaluate.generate import BASELINE
from customgen.evaluate.sweep import sweep_table
from customgen.kinds import package_versions
from customgen.memory import probe

METRIC_COLUMNS = ["clip_content", "clip_style", "style_strength", "ssim", "lpips", "fid", "kid", "art_fid",
                  "seconds_per_image"]
ID_COLUMNS = ["model", "method", "style", "base_model", "strength", "style_scale", "steps", "seed", "source", "sha256"]
COUNT_COLUMNS = ["n_images", "n_flagged", "n_references", "fid_n", "fid_n_ref", "kid_subset_size"]
COST_COLUMNS = ["trainable_params", "artifact_bytes", "train_seconds", "peak_memory_bytes", "infer_peak_memory_bytes"]
COLUMNS = (ID_COLUMNS + [c for m in METRIC_COLUMNS for c in (m, f"{m}_std")] + COUNT_COLUMNS + COST_COLUMNS
           + ["smoke"])
SMOKE_NOTE = "smoke: random-weight metric networks — not quality results"
FILES = {"metrics": "metrics.csv", "per_image": "per_image.csv", "sweep": "sweep.csv", "run": "run.json"}


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Documented columns first; rows by style, the baseline first."""
    df = df.assign(_b=df["model"] != BASELINE).sort_values(["style", "_b", "method", "model", "strength",
                                                             "style_scale"]).drop(columns="_b")
    return df[[c for c in COLUMNS if c in df] + [c for c in df if c not in COLUMNS]].reset_index(drop=True)


def device_info() -> dict:
    """The device generation ran on (name, memory, dtype) and library versions."""
    info = probe()
    return {"device": info.device, "name": info.name, "total_gib": round(info.total_gib, 2),
            "dtype": str(info.dtype).replace("torch.", ""), "python": platform.python_version(),
            "platform": platform.platform(), "versions": package_versions()}


def run_info(cfg, *, command: str | None, nets, counts: dict) -> dict:
    """run.json: what produced these results."""
    return {"command": command or "customgen.evaluate.evaluate(config) [" + " ".join(sys.argv[:1]) + "]",
            "model": cfg.model.ref, "device": device_info(), "config": to_dict(cfg), "config_hash": config_hash(cfg),
            "metric_networks": nets.describe(), "smoke": any(v["smoke"] for v in nets.describe().values()),
            "images": counts, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def provenance(run: dict) -> str:
    """One line for figure footers: model, device, then the command (long; footers may shorten it)."""
    dev = run.get("device", {})
    where = dev.get("name") or dev.get("device", "?")
    return f"model {run.get('model', '?')} | device {where} | {run.get('command', '?')}"


def _clean(value):
    """JSON-safe: NaN/inf → null, numpy scalars → Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(df: pd.DataFrame) -> list[dict]:
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _num(x: float, digits: int) -> str:
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e4):
        return f"{x:.2e}"  # KID is often ~1e-4; FID can be in the thousands
    return f"{x:.{digits}f}"


def _fmt(mean, std=math.nan, digits: int = 3) -> str:
    """'mean ± std' ('–' for a missing mean, no ± for a missing std)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return _num(mean, digits)
    return f"{_num(mean, digits)} ± {_num(std, digits)}"


def summary_markdown(metrics: pd.DataFrame, run: dict) -> str:
    """A short Markdown table (mean ± std; FID with its sample sizes), with provenance and the smoke note."""
    head = ["model", "method", "style", "CLIP-content ↓", "CLIP-style ↓", "Style Strength", "SSIM ↑", "LPIPS ↓",
            "FID ↓ (n/n_ref)", "KID ↓", "ArtFID ↓", "s/img", "flagged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in metrics.itertuples():
        cells = [r.model, r.method, r.style or "–", _fmt(r.clip_content, r.clip_content_std),
                 _fmt(r.clip_style, r.clip_style_std), _fmt(r.style_strength, r.style_strength_std),
                 _fmt(r.ssim, r.ssim_std), _fmt(r.lpips, r.lpips_std), f"{_fmt(r.fid)} ({r.fid_n}/{r.fid_n_ref})",
                 _fmt(r.kid, r.kid_std), _fmt(r.art_fid), _fmt(r.seconds_per_image, digits=2),
                 f"{r.n_flagged}/{r.n_images}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    dev = run.get("device", {})
    notes = [f"# Evaluation summary\n", f"Produced by `{run['command']}` on device "
             f"{dev.get('name') or dev.get('device', '?')} with model {run['model']}.",
             f"Config hash {run['config_hash']}; every number below comes from metrics.csv.\n"]
    if run.get("smoke"):
        notes.insert(1, f"**{SMOKE_NOTE}.**\n")
    notes.append("FID on small sets is biased upward (see docs/evaluation_metrics.md): read KID beside it.\n")
    bare = sorted(set(metrics.loc[(metrics["model"] != BASELINE) & (metrics["n_references"] == 0), "model"]))
    if bare:
        notes.append(f"No reference images for {', '.join(bare)}: content metrics only (CLIP-content, SSIM, LPIPS); "
                     "name them in eval.references to score the style.\n")
    return "\n".join(notes + lines) + "\n"


def write_results(out: Path, *, metrics: pd.DataFrame, per_image: pd.DataFrame, sweep: pd.DataFrame | None,
                  run: dict) -> dict[str, Path]:
    """Write every results file under `out`; returns name → path."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / FILES["metrics"], "metrics_json": out / "metrics.json",
             "per_image": out / FILES["per_image"], "summary": out / "summary.md", "run": out / FILES["run"]}
    metrics.to_csv(paths["metrics"], index=False)
    rel = per_image.assign(output=[os.path.relpath(p, out) for p in per_image["output"]])  # portable folder
    rel.to_csv(paths["per_image"], index=False)
    paths["metrics_json"].write_text(json.dumps({"run": run, "rows": records(metrics)}, indent=2, default=str) + "\n")
    paths["summary"].write_text(summary_markdown(metrics, run))
    paths["run"].write_text(json.dumps(run, indent=2, default=str) + "\n")
    if sweep is not None:
        paths["sweep"] = out / FILES["sweep"]
        sweep.to_csv(paths["sweep"], index=False)
    return paths


class ReadBack:
    """What results read back from evaluation folders say of themselves (needs `metrics` and `runs`)."""

    @property
    def smoke(self) -> bool:
        return bool(self.metrics["smoke"].any()) or any(r.get("smoke") for r in self.runs)

    @property
    def provenance(self) -> str:
        return " || ".join(dict.fromkeys(provenance(r) for r in self.runs))


@dataclass
class Results(ReadBack):
    """Results of one or more evaluation folders, read back from their files."""

    metrics: pd.DataFrame
    per_image: pd.DataFrame
    sweep: pd.DataFrame | None
    runs: list[dict] = field(default_factory=list)


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, keep_default_na=True) if path.is_file() else None


def load_results(*folders: str | Path) -> Results:
    """Read metrics/per_image/sweep CSVs and run.json of evaluation folders; baseline rows shared by several
    folders (same style, strength, model) are kept once."""
    parts: dict[str, list] = {"metrics": [], "per_image": [], "sweep": []}
    runs = []
    for folder in map(Path, folders):
        if not (folder / FILES["metrics"]).is_file():
            raise UserError(f"{folder} holds no {FILES['metrics']}; run `customgen evaluate` with eval.output={folder}")
        for key in parts:
            df = _read_csv(folder / FILES[key])
            if df is not None and key == "per_image":
                df["output"] = [str((folder / p).resolve()) for p in df["output"]]
            if df is not None:
                parts[key].append(df)
        runs.append(json.loads((folder / FILES["run"]).read_text()))
    keys = {"metrics": ["model", "style", "strength", "style_scale", "base_model"],
            "per_image": ["model", "style", "strength", "style_scale", "content"],
            "sweep": ["model", "style", "strength", "style_scale"]}
    merged = {k: pd.concat(v, ignore_index=True).drop_duplicates(keys[k], ignore_index=True) if v else None
              for k, v in parts.items()}
    for df in (merged["metrics"], merged["per_image"], merged["sweep"]):
        if df is not None and "style" in df:
            df["style"] = df["style"].fillna("")
    merged["metrics"] = ordered(merged["metrics"])
    if merged["sweep"] is not None and len(folders) > 1:  # the front over every folder's points together
        merged["sweep"] = sweep_table(merged["sweep"])
    return Results(merged["metrics"], merged["per_image"], merged["sweep"], runs)


BETTER = {"clip_content": "min", "clip_style": "min", "ssim": "max", "lpips": "min", "fid": "min", "kid": "min",
          "art_fid": "min", "seconds_per_image": "min"}


def best_per_style(metrics: pd.DataFrame, columns=tuple(BETTER)) -> pd.DataFrame:
    """For each reference style and metric, the model with the best mean (baseline included), from the table."""
    rows = []
    for style, df in metrics.groupby("style"):
        row = {"style": style}
        for col in columns:
            vals = df[col].astype(float)
            if vals.notna().any():
                row[col] = df.loc[vals.idxmin() if BETTER[col] == "min" else vals.idxmax(), "model"]
        rows.append(row)
    return pd.DataFrame(rows)
