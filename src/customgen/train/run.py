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
from customgen.memory import peak_memory
from customgen.train.artifact import artifact_manifest, drop_stale_snapshots, save_weights
from customgen.train.build import Run, build_run
from customgen.train.loop import encode_prompts, out_path, resume as resume_from, run_loop
from customgen.train.validation import validate

RUN_FILES = ("checkpoints", SNAPSHOTS, "samples", "logs", "config.yaml", MANIFEST)  # what a run writes besides weights
WEIGHT_FILES = tuple(dict.fromkeys(k.weights for k in KINDS.values()))  # every kind's main file


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


def offload_unused(run: Run) -> None:
    """Cache every fixed prompt, then move the VAE and text encoder off the GPU when nothing needs them."""
    if not run.method.trains_text_encoder:
        captions = {run.method.caption(run.images.dataset.caption_of(i), torch.Generator())
                    for i in range(len(run.images.dataset.records))}
        captions |= {run.cfg.prompt.class_prompt} if run.classes is not None else set()
        encode_prompts(run, sorted(captions))
        if run.accelerator.device.type == "cuda":
            run.comps.text_encoder.to("cpu")
    cached = run.images.latents is not None and (run.classes is None or run.classes.latents is not None)
    if cached and run.perceptual is None and run.contents is None and run.accelerator.device.type == "cuda":
        run.comps.vae.to("cpu")
        torch.cuda.empty_cache()


def finish(run: Run, seconds: float, peak_bytes: int) -> Path:
    """Save weights, config, final samples and the manifest (last: a folder with style.json is finished)."""
    acc, cfg, out = run.accelerator, run.cfg, run.out
    acc.wait_for_everyone()
    if acc.is_main_process:
        fields = save_weights(run, out, name=out.name, step=cfg.train.steps)
        validate(run, cfg.train.steps)
        write_manifest(out, artifact_manifest(run, fields, name=out.name, step=cfg.train.steps, seconds=seconds,
                                              peak_bytes=peak_bytes))
    acc.end_training()
    return out


def train(cfg: Config, *, output: str | Path | None = None, resume: str = "auto", overwrite: bool = False,
          progress: bool = True, resume_force: bool = False) -> Path:
    """Train `cfg.method` on `cfg.data` and return the artifact folder (see customgen.kinds). The output folder
    is locked for the run; `resume_force` resumes a checkpoint made with another config (docs/reliability.md)."""
    check_limits(cfg)
    out = out_path(cfg, output)
    with output_lock(out, command="train"):
        prepare_output(out, resume=resume, overwrite=overwrite)
        torch_state = torch.random.get_rng_state()
        try:
            run = build_run(cfg, out)
            run.accelerator.init_trackers("customgen")
            offload_unused(run)
            start = resume_from(run, resume, force=resume_force)
            drop_stale_snapshots(run, start)
            with peak_memory() as peak:
                stats = run_loop(run, start=start, progress=progress, validate=validate)
            return finish(run, stats["seconds"], peak.peak_bytes or 0)
        finally:
            torch.random.set_rng_state(torch_state)  # the loop seeds per step; leave the caller's RNG as it was
