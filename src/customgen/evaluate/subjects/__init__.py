"""Subject evaluation: which step of a subject's training learned it? Every subject artifact of eval.styles, each of
its snapshots and the base model (the baseline) generate the same prompts with the same seeds; DreamBooth's
metrics (Ruiz et al. 2023) score them: DINO and CLIP-I (identity), CLIP-T (prompt fidelity), DIV (diversity), PRES
(class drift), plus cost. `customgen evaluate` runs it for the library's subjects (customgen.evaluate), beside the
style evaluation of its styles.

Outputs (under eval.output): subject_images/ (reused on re-runs), subject_metrics.csv/.json (one row per subject
and step; the JSON also holds the run and the best steps), subject_per_image.csv, summary.md (the subject part),
plots/subject_*.png. See docs/evaluation_metrics.md.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from customgen.evaluate.report import run_info
from customgen.evaluate.subjects.generate import BASE_POINT, Point, Shot, gather, generate_shots, plan_shots
from customgen.evaluate.subjects.inputs import Subject, SubjectStep, resolve_subjects
from customgen.evaluate.subjects.plots import (plot_identity_fidelity, plot_subject_curves, plot_subject_samples,
                                                save_subject_plots)
from customgen.evaluate.subjects.prompts import (DREAMBOOTH_LIVE_PROMPTS, DREAMBOOTH_OBJECT_PROMPTS, LIVE_CLASSES,
                                                 PROJECT_PROMPTS, class_noun, fill, prompt_templates)
from customgen.evaluate.subjects.report import (LISTED, SubjectResults, best_line, choose_step,
                                                has_subject_results, load_subject_results, mark_best, ordered,
                                                write_subject_results)
from customgen.evaluate.subjects.score import aggregate, image_rows, per_image_table

__all__ = ["evaluate_subjects", "resolve_subjects", "load_subject_results", "has_subject_results",
           "SubjectResults", "Subject", "SubjectStep", "Point", "Shot", "BASE_POINT", "choose_step", "best_line",
           "plot_subject_curves", "plot_identity_fidelity", "plot_subject_samples", "save_subject_plots",
           "PROJECT_PROMPTS", "DREAMBOOTH_OBJECT_PROMPTS", "DREAMBOOTH_LIVE_PROMPTS", "LIVE_CLASSES",
           "class_noun", "fill", "prompt_templates"]


def evaluate_subjects(cfg, subjects: list[Subject], nets, *, out: Path, state, overwrite: bool = False,
                      progress: bool = True, command: str | None = None, plots: bool = True,
                      append_summary: bool = False) -> pd.DataFrame | None:
    """Generate (this process's share), then on the main process score, write the files and plots and print each
    subject's best step with its reason; returns the table there (None on the other processes)."""
    shots = plan_shots(subjects)
    mine = generate_shots(shots, cfg, out, overwrite=overwrite, progress=progress and state.is_main_process,
                          rank=state.process_index, world=state.num_processes,
                          device=str(state.device) if state.num_processes > 1 else None)
    samples = gather(mine, shots, cfg, out, state)
    if samples is None:
        return None
    rows = image_rows(subjects, samples, nets)
    metrics, choices = mark_best(aggregate(subjects, rows, nets, cfg), cfg.eval.fidelity_margin)
    metrics = ordered(metrics)
    counts = {"generated": sum(not s.reused for s in samples), "reused": sum(s.reused for s in samples),
              "subjects": {s.name: {"steps": [x.step for x in s.steps], "instances": len(s.instances),
                                    "prompts": len(s.prompts)} for s in subjects}}
    run = run_info(cfg, command=command, nets=nets, counts=counts)
    write_subject_results(out, metrics=metrics, per_image=per_image_table(rows), choices=choices, run=run,
                          append_summary=append_summary)
    if plots:
        save_subject_plots(load_subject_results(out), out / "plots")
    for choice in choices:
        print(best_line(choice))
    metrics.attrs["files"] = LISTED
    return metrics
