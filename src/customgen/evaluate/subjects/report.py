"""Subject results under eval.output (subject_metrics.csv/json, subject_per_image.csv, the subject part of
summary.md), the best-step rule, and reading them back.

Best step (per subject), from the table alone:
1. the identity–fidelity front: the steps no other step beats on both DINO (identity) and CLIP-T (fidelity);
2. of those, the steps whose CLIP-T is at least the baseline's minus `eval.fidelity_margin`;
3. the one with the highest DINO (ties: the earliest step). When no front step keeps its CLIP-T within the margin,
   the front's step with the highest CLIP-T, and the reason says so.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from customgen.errors import UserError
from customgen.evaluate.generate import BASELINE
from customgen.evaluate.report import SMOKE_NOTE, ReadBack, _fmt, provenance, records
from customgen.evaluate.sweep import pareto_front

METRICS = ["dino", "clip_i", "clip_t", "div", "pres", "seconds_per_image"]
ID_COLUMNS = ["subject", "model", "method", "step", "weights", "base_model", "sample_steps", "seed",
              "samples_per_prompt", "source", "sha256"]
COUNT_COLUMNS = ["n_prompts", "n_images", "n_flagged", "n_instances"]
COST_COLUMNS = ["trainable_params", "artifact_bytes", "train_seconds", "peak_memory_bytes", "infer_peak_memory_bytes"]
COLUMNS = ID_COLUMNS + [c for m in METRICS for c in (m, f"{m}_std")] + COUNT_COLUMNS + COST_COLUMNS + [
    "pareto", "best", "smoke"]
FILES = {"metrics": "subject_metrics.csv", "json": "subject_metrics.json", "per_image": "subject_per_image.csv",
         "summary": "summary.md"}
LISTED = "subject_metrics.csv, subject_per_image.csv, summary.md, plots/"


def choose_step(df: pd.DataFrame, margin: float) -> tuple[dict, np.ndarray]:
    """The best step of one subject's rows (module docstring) with the reason, and the front mask of its steps."""
    steps = df[df["model"] != BASELINE].sort_values("step")
    base = df[df["model"] == BASELINE]
    base_t = float(base["clip_t"].iloc[0]) if len(base) else math.nan
    front = pareto_front(-steps[["dino", "clip_t"]].to_numpy(dtype=float)) if len(steps) else np.zeros(0, bool)
    on_front = steps[front]
    floor = base_t - margin
    within = on_front[on_front["clip_t"] >= floor] if math.isfinite(base_t) else on_front.iloc[0:0]
    best = {"subject": df["subject"].iloc[0], "step": None, "dino": math.nan, "clip_t": math.nan,
            "baseline_clip_t": base_t, "margin": margin, "front": [int(s) for s in on_front["step"]]}
    if len(within):
        pick = within.loc[within["dino"].idxmax()]  # idxmax keeps the first (earliest) of equal values
        why = (f"the highest DINO ({pick['dino']:.3f}) on the identity–fidelity front among the steps whose CLIP-T "
               f"stays within {margin:g} of the baseline's {base_t:.3f} (≥ {floor:.3f}); "
               f"its CLIP-T {pick['clip_t']:.3f}")
    elif len(on_front):
        pick = on_front.loc[on_front["clip_t"].idxmax()]
        why = (f"no step on the front keeps CLIP-T within {margin:g} of the baseline's {base_t:.3f}: the front's most "
               f"prompt-faithful step (CLIP-T {pick['clip_t']:.3f}, DINO {pick['dino']:.3f})")
    else:
        return best | {"reason": "no step has finite DINO and CLIP-T"}, front
    return best | {"step": int(pick["step"]), "dino": float(pick["dino"]), "clip_t": float(pick["clip_t"]),
                   "reason": why}, front


def mark_best(metrics: pd.DataFrame, margin: float) -> tuple[pd.DataFrame, list[dict]]:
    """The table with `pareto` and `best` columns, and each subject's choice."""
    df = metrics.assign(pareto=False, best=False)
    choices = []
    for _, idx in df.groupby("subject", sort=False).groups.items():
        rows = df.loc[idx]
        choice, front = choose_step(rows, margin)
        steps = rows[rows["model"] != BASELINE].sort_values("step").index
        df.loc[steps, "pareto"] = front
        df.loc[steps, "best"] = (df.loc[steps, "step"] == choice["step"]).to_numpy()
        choices.append(choice)
    return df, choices


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Documented columns first; rows by subject, the baseline first, then by step."""
    df = df.assign(_b=df["model"] != BASELINE).sort_values(["subject", "_b", "step"]).drop(columns="_b")
    return df[[c for c in COLUMNS if c in df] + [c for c in df if c not in COLUMNS]].reset_index(drop=True)


def best_line(choice: dict) -> str:
    """One sentence per subject: the chosen step and why."""
    if choice["step"] is None:
        return f"subject {choice['subject']}: no best step ({choice['reason']})"
    return f"subject {choice['subject']}: best step {choice['step']}: {choice['reason']}"


def summary_markdown(metrics: pd.DataFrame, choices: list[dict], run: dict) -> str:
    """The subject table (mean ± std), the best step of each subject with its reason, provenance, smoke note."""
    head = ["subject", "step", "DINO ↑", "CLIP-I ↑", "CLIP-T ↑", "DIV ↑", "PRES ↓", "s/img", "flagged", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in metrics.itertuples():
        step = "baseline" if r.model == BASELINE else f"{r.step}" + (" **best**" if r.best else "")
        cells = [r.subject, step] + [_fmt(getattr(r, m), getattr(r, f"{m}_std")) for m in METRICS[:5]] + [
            _fmt(r.seconds_per_image, digits=2), f"{r.n_flagged}/{r.n_images}", "●" if r.pareto else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    dev = run.get("device", {})
    notes = ["# Subject evaluation\n", f"Produced by `{run['command']}` on device "
             f"{dev.get('name') or dev.get('device', '?')} with model {run['model']}; every number below comes from "
             f"{FILES['metrics']} (definitions: docs/evaluation_metrics.md).\n"]
    if run.get("smoke"):
        notes.insert(1, f"**{SMOKE_NOTE}.**\n")
    best = ["", "Best step (highest DINO on the identity–fidelity front within eval.fidelity_margin of the "
                "baseline's CLIP-T):", ""] + [f"- {best_line(c)}" for c in choices]
    return "\n".join(notes + lines + best) + "\n"


def write_subject_results(out: Path, *, metrics: pd.DataFrame, per_image: pd.DataFrame, choices: list[dict],
                          run: dict, append_summary: bool = False) -> dict[str, Path]:
    """Write the subject files under `out`; the summary is appended to summary.md when this run's style part
    wrote one (`append_summary`), else it is summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in FILES.items()}
    metrics.to_csv(paths["metrics"], index=False)
    per_image.assign(output=[os.path.relpath(p, out) for p in per_image["output"]]).to_csv(paths["per_image"],
                                                                                          index=False)
    doc = {"run": run, "rows": records(metrics), "best": [{k: _clean(v) for k, v in c.items()} for c in choices]}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    text = summary_markdown(metrics, choices, run)
    if append_summary and paths["summary"].is_file():
        text = paths["summary"].read_text() + "\n" + text
    paths["summary"].write_text(text)
    return paths


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class SubjectResults(ReadBack):
    """Subject results of one or more evaluation folders, read back from their files."""

    metrics: pd.DataFrame
    per_image: pd.DataFrame
    best: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)

    @property
    def margin(self) -> float:
        return float(self.best[0]["margin"]) if self.best else math.nan


def has_subject_results(folder: str | Path) -> bool:
    return (Path(folder) / FILES["metrics"]).is_file()


def load_subject_results(*folders: str | Path) -> SubjectResults:
    """Read subject_metrics.csv/json and subject_per_image.csv of evaluation folders."""
    metrics, per_image, best, runs = [], [], [], []
    for folder in map(Path, folders):
        if not has_subject_results(folder):
            raise UserError(f"{folder} holds no {FILES['metrics']}; run `customgen evaluate` on subject artifacts "
                            f"with eval.output={folder}")
        metrics.append(pd.read_csv(folder / FILES["metrics"]))
        df = pd.read_csv(folder / FILES["per_image"])
        per_image.append(df.assign(output=[str((folder / p).resolve()) for p in df["output"]]))
        doc = json.loads((folder / FILES["json"]).read_text())
        best += doc["best"]
        runs.append(doc["run"])
    return SubjectResults(ordered(pd.concat(metrics, ignore_index=True)), pd.concat(per_image, ignore_index=True),
                          best, runs)
