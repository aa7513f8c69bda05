"""`train(config)`: prepare the output folder, build the run, loop, save the artifact."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from customgen.config import Config
from customgen.errors import UserError
from customgen.kinds import KINDS, MANIFEST, SNAPSHOTS, read_artifact, write_manifest
from customgen.limits import check_limits
from customgen.lock import output_lock
from customgen.memory import MemoryPlan, out_of_memory, peak_memory, probe
from customgen.train.artifact import artifact_manifest, drop_stale_snapshots, save_weights
from customgen.train.build import Run, build_run
from customgen.train.captions import CAPTION_FILE
from customgen.train.data import settle_data
from customgen.train.fit import fit_memory
from customgen.train.loop import offload_unused, out_path, resume as resume_from, run_loop
from customgen.train.optimizers import check_optimizer
from customgen.train.validation import validate

RUN_FILES = ("checkpoints", SNAPSHOTS, "samples", "logs", CAPTION_FILE, "config.yaml", MANIFEST)  # besides weights
WEIGHT_FILES = tuple(dict.fromkeys(k.weights for k in KINDS.values() if k.weights))  # every fixed main file name


def owned_files(out: Path) -> list[Path]:
    """The files and folders a run writes into `out` (what --overwrite may remove)."""
    names = list(RUN_FILES) + list(WEIGHT_FILES)
    if (out / MANIFEST).is_file():
        try:
            manifest, kind = read_artifact(out)
            names += kind.files(manifest)
        except UserError:
            pass  # a broken manifest: remove the fixed names only
    return [out / n for n in dict.fromkeys(names)]


def prepare_output(out: Path, *, resume: str, overwrite: bool) -> None:
    """Refuse to replace a finished artifact unless --overwrite (which clears only files a run writes)."""
    if overwrite:
        for p in owned_files(out):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    elif (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a trained artifact; pass --overwrite to retrain or choose another --output")
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    out.mkdir(parents=True, exist_ok=True)


def finish(run: Run, seconds: float, peak_bytes: int) -> Path:
    """Save weights, config, final samples and the manifest (last: a folder with style.json is finished)."""
    acc, cfg, out = run.accelerator, run.cfg, run.out
    acc.wait_for_everyone()
    if acc.is_main_process:
        fields = save_weights(run, out, name=out.name, step=cfg.train.steps)
        try:
            validate(run, cfg.train.steps)
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(cfg.train.steps, "final validation images", run.plan) from err
        write_manifest(out, artifact_manifest(run, fields, name=out.name, step=cfg.train.steps, seconds=seconds,
                                              peak_bytes=peak_bytes))
    acc.end_training()
    return out


def train(cfg: Config, *, output: str | Path | None = None, resume: str = "auto", overwrite: bool = False,
          progress: bool = True, resume_force: bool = False, plan: MemoryPlan | None = None) -> Path:
    """Train `cfg.method` on `cfg.data` and return the artifact folder (see customgen.kinds). The output folder
    is locked for the run; `resume_force` resumes a checkpoint made with another config (docs/reliability.md).
    `plan`: memory settings chosen elsewhere (customgen bench), else train.memory decides (customgen.train.fit)."""
    cfg = settle_data(check_limits(cfg))  # bucket settings checked, cache off for random crops: before the plan
    check_optimizer(cfg)
    out = out_path(cfg, output)
    plan = plan or fit_memory(cfg, probe(dtype=cfg.model.dtype))  # memory auto refuses here, before weights load
    with output_lock(out, command="train"):
        prepare_output(out, resume=resume, overwrite=overwrite)
        torch_state = torch.random.get_rng_state()
        try:
            run = build_run(cfg, out, plan=plan)
            run.accelerator.init_trackers("customgen")
            offload_unused(run)
            start = resume_from(run, resume, force=resume_force)
            drop_stale_snapshots(run, start)
            with peak_memory() as peak:
                stats = run_loop(run, start=start, progress=progress, validate=validate)
            return finish(run, stats["seconds"], peak.peak_bytes or 0)
        finally:
            torch.random.set_rng_state(torch_state)  # the loop seeds per step; leave the caller's RNG as it was
