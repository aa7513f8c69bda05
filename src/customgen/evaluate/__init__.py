"""The evaluation runner: methods × styles × contents plus the plain SD img2img baseline → results files; the
library's subjects (each step of each, plus the base model) → subject results (customgen.evaluate.subjects).

    from customgen.config import load_config
    from customgen.evaluate import evaluate
    table = evaluate(load_config("configs/eval.yaml", ["eval.styles=outputs"]))

Outputs (under eval.output): images/ (stylized PNGs, reused on re-runs), metrics.csv/.json (one row per
model/style), per_image.csv, summary.md, sweep.csv (eval.sweep), run.json, plots/; for subjects subject_images/,
subject_metrics.csv/.json, subject_per_image.csv, plots/subject_*. See docs/evaluation_metrics.md.
Several processes: `accelerate launch --num_processes 2 -m customgen evaluate configs/eval.yaml ...`.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from accelerate import PartialState

from customgen.config import Config, load_config
from customgen.errors import UserError
from customgen.limits import check_limits
from customgen.lock import output_lock
from customgen.evaluate.generate import BASELINE, Point, baseline_point, generate, ip_point, merge, style_point
from customgen.evaluate.inputs import EvalInputs, EvalStyle, is_subject, load_styles, resolve_inputs
from customgen.evaluate.plots import save_result_plots
from customgen.evaluate.report import (COLUMNS, SMOKE_NOTE, Results, best_per_style, load_results, ordered, run_info,
                                       write_results)
from customgen.evaluate.score import aggregate, image_rows, per_image_table
from customgen.evaluate.subjects import evaluate_subjects, has_subject_results, load_subject_results, resolve_subjects
from customgen.evaluate.sweep import describe_front, pareto_front, sweep_points, sweep_table
from customgen.metrics import MetricNetworks
from customgen.models.addons import controlnet_file, ip_adapter_file
from customgen.models.weightfile import family

__all__ = ["evaluate", "pareto_front", "load_results", "describe_front", "best_per_style", "Results", "EvalInputs",
           "EvalStyle", "resolve_inputs", "Point", "BASELINE", "COLUMNS", "SMOKE_NOTE", "load_subject_results",
           "has_subject_results", "is_subject"]


def check_settings(e) -> None:
    """Strengths in (0, 1] that run at least one denoising step; a sweep needs strengths and scales."""
    strengths = [e.strength] + (list(e.sweep_strengths) if e.sweep else [])
    for s in strengths:
        if not 0.0 < s <= 1.0:
            raise UserError(f"eval strength {s} must be in (0, 1]")
        if int(e.steps * s) < 1:
            raise UserError(f"eval strength {s} × {e.steps} steps runs no denoising step: raise eval.steps")
    if e.sweep and not (e.sweep_strengths and e.sweep_scales):
        raise UserError("eval.sweep needs eval.sweep_strengths and eval.sweep_scales (non-empty lists)")
    if e.controlnet and not e.structure:
        raise UserError("eval.controlnet needs eval.structure (canny or depth): the conditioning it was trained on")
    if e.image_encoder and not e.ip_adapter:
        raise UserError("eval.image_encoder is used only with eval.ip_adapter")
    e.request("").replace(num_images=e.samples_per_prompt).check()  # before any model or image loads


def check_addon_files(cfg: Config) -> None:
    """eval.controlnet and eval.ip_adapter (+ eval.image_encoder) checked against the model's family, one line,
    before any model or image loads."""
    e = cfg.eval
    fam = family(cfg.model.ref) if e.controlnet or e.ip_adapter else None
    for key, check in (("controlnet", lambda: controlnet_file(e.controlnet, fam)),
                       ("ip_adapter", lambda: ip_adapter_file(e.ip_adapter, e.image_encoder or None, fam))):
        if getattr(e, key):
            try:
                check()
            except UserError as err:
                raise UserError(f"eval.{key}: {err}") from None


def grid_points(styles, e, references: list[str] = ()) -> list[Point]:
    """The baseline and every style at eval.strength (LoRA at eval.style_scale); with eval.ip_adapter, the IP-Adapter
    on each reference style's first reference image."""
    ip = [ip_point(r, e.strength, e.style_image_scale) for r in references] if e.ip_adapter else []
    return [baseline_point(e.strength)] + [style_point(s, e.strength, e.style_scale) for s in styles] + ip


def _key(model: str, strength: float, scale: float) -> tuple:
    """Hashable point identity (nan scale of the baseline → None, since nan != nan)."""
    return (model, float(strength), None if math.isnan(scale) else float(scale))


def evaluate(config, *, overwrite: bool = False, progress: bool = True, command: str | None = None,
             plots: bool = True) -> pd.DataFrame | None:
    """Run `config.eval` (a Config or a YAML path); returns the metrics table, one row per model and style (a
    library of subjects only: the subject table, one row per subject and step). The output folder is locked for the
    run: a second evaluation into it is refused (customgen.lock).

    Under `accelerate launch` (several GPUs or machines) every process generates its share of the grid and the
    main process scores everything and writes the results; the other processes return None (they work under
    the main process's lock)."""
    cfg = check_limits(config if isinstance(config, Config) else load_config(config))
    check_settings(cfg.eval)
    check_addon_files(cfg)
    with output_lock(Path(cfg.eval.output).expanduser(), command="evaluate"):
        return run_evaluation(cfg, overwrite=overwrite, progress=progress, command=command, plots=plots)


def run_evaluation(cfg: Config, *, overwrite: bool, progress: bool, command: str | None,
                   plots: bool) -> pd.DataFrame | None:
    """The body of `evaluate`, under its output lock: every input is resolved (and every problem reported) before
    anything is generated; then the styles, then the subjects."""
    e = cfg.eval
    library = load_styles(e.styles, list(e.methods))
    styles = [s for s in library if not is_subject(s)]
    inputs = resolve_inputs(cfg, styles) if styles else None
    subjects = resolve_subjects(cfg, [s for s in library if is_subject(s)])
    out = Path(e.output).expanduser()
    nets = MetricNetworks(smoke=e.smoke, clip_model=e.clip_model, clip_pretrained=e.clip_pretrained,
                          feature_cache_dir=out / "features", dino_model=e.dino_model)
    state = PartialState()  # one process, or one of those `accelerate launch` started
    kw = dict(overwrite=overwrite, progress=progress, command=command, plots=plots)
    table = evaluate_styles(cfg, inputs, nets, out=out, state=state, **kw) if inputs is not None else None
    if subjects:
        subject_table = evaluate_subjects(cfg, subjects, nets, out=out, state=state, append_summary=bool(styles), **kw)
        table = subject_table if inputs is None else table
    return table


def evaluate_styles(cfg: Config, inputs: EvalInputs, nets, *, out: Path, state, overwrite: bool, progress: bool,
                    command: str | None, plots: bool) -> pd.DataFrame | None:
    """The style grid (and sweep): this process's share of the images, then on the main process the metrics, the
    files and the plots; returns the metrics table there (None on the other processes)."""
    e = cfg.eval
    grid = grid_points(inputs.styles, e, inputs.reference_styles)
    sweep = sweep_points(inputs.styles, e) if e.sweep else []
    points = list({_key(p.model, p.strength, p.scale): p for p in grid + sweep}.values())
    mine = generate(points, inputs, cfg, out, overwrite=overwrite, progress=progress and state.is_main_process,
                    rank=state.process_index, world=state.num_processes,
                    device=str(state.device) if state.num_processes > 1 else None)
    outputs = merge(mine, points, inputs, out, state)
    if outputs is None:
        return None  # the main process scores the merged outputs and writes the results
    rows = image_rows(outputs, inputs, nets, lpips_net=e.lpips_net, progress=progress)
    pick = lambda pts: [r for r in rows if _key(r["model"], r["strength"], r["style_scale"])  # noqa: E731
                        in {_key(p.model, p.strength, p.scale) for p in pts}]
    grid_rows = pick(grid)
    metrics = ordered(aggregate(grid_rows, inputs, nets, cfg))
    sweep_df = sweep_table(aggregate(pick(sweep), inputs, nets, cfg, set_metrics=False)) if e.sweep else None
    counts = {"generated": sum(not o.reused for o in outputs), "reused": sum(o.reused for o in outputs),
              "contents": len(inputs.contents), "references": {k: len(v) for k, v in inputs.references.items()}}
    run = run_info(cfg, command=command, nets=nets, counts=counts)
    write_results(out, metrics=metrics, per_image=per_image_table(grid_rows), sweep=sweep_df, run=run)
    if plots:
        save_result_plots(load_results(out), out / "plots")
    metrics.attrs["files"] = "metrics.csv, per_image.csv, summary.md, run.json, plots/"
    return metrics
