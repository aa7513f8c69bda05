"""What a run saves: the final artifact (train/run.py `finish`) and its snapshots (train.snapshot_every), both
through the kind's own `Method.save`, with the resolved config and one manifest builder.

    <artifact>/                         the final artifact: weights, exports, config.yaml, style.json (step = steps)
    <artifact>/snapshots/step-NNNNNN/   the same files at step N (style.json `step` = N), made atomically

A snapshot is written before a checkpoint of the same step, so a kill between them cannot lose it: the resumed
run re-makes every snapshot past its checkpoint, bit for bit (resume is exact), in place of the old one.
"""
from __future__ import annotations

import shutil
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from customgen.config import Config, config_hash, read_yaml, save_config, to_dict
from customgen.data.buckets import bucket_counts
from customgen.errors import Notice, UserError
from customgen.kinds import Manifest, list_snapshots, snapshot_folder, training_facts, write_manifest
from customgen.train.build import Run
from customgen.train.checkpoint import config_differences, prune, write_folder
from customgen.train.snapshots import artifact_bytes, human_bytes


def tag_frequency(run: Run) -> dict[str, dict[str, int]]:
    """Caption tags per image folder, counted as kohya's sd-scripts do (comma-separated, per `N_folder`)."""
    freq: dict[str, Counter] = defaultdict(Counter)
    for record in run.images.dataset.records:
        folder = f"{record.repeats}_{record.label or Path(record.path).parent.name}"
        caption = run.method.caption(record.caption or "", torch.Generator().manual_seed(0))
        freq[folder].update(t.strip() for t in caption.split(",") if t.strip())
    return {k: dict(v) for k, v in freq.items()}


def run_facts(run: Run, *, name: str, step: int) -> dict:
    """What the run was, for the kinds' exports (kohya's ss_* metadata), at optimizer step `step`."""
    s = run.schedule
    return training_facts(run.cfg, name, step=step, mixed_precision=run.plan.mixed_precision,
                          optimizer=run.plan.optimizer, num_images=len(run.images.dataset.records),
                          tag_frequency=tag_frequency(run), started_at=int(run.started), finished_at=int(time.time()),
                          grad_accum=s.grad_accum, effective_batch=s.effective_batch, epoch_steps=s.epoch_steps,
                          epochs=s.epochs or -(-s.steps // s.epoch_steps),  # kohya's ss_num_epochs: epochs begun
                          bucket_info=bucket_info(run))


def bucket_info(run: Run) -> dict | None:
    """kohya's ss_bucket_info: {"buckets": {i: {"resolution": [w, h], "count": images}}} (None without buckets)."""
    if not run.cfg.data.buckets:
        return None
    table = bucket_counts(run.images.dataset.placements)
    return {"buckets": {str(i): {"resolution": row["bucket"], "count": row["count"]} for i, row in enumerate(table)}}


def training_settings(run: Run) -> dict:
    """style.json's `training`: the settings that define the run's recipe, as the run used them (the optimizer and
    precision the memory plan chose, AdamW's betas and eps as the optimizer holds them, the flip resolved)."""
    cfg, t, s, group = run.cfg, run.cfg.train, run.schedule, run.optimizer.param_groups[0]
    out = {"preset": cfg.preset, "lr": t.lr, "batch_size": s.batch_size, "grad_accum": s.grad_accum,
           "processes": s.processes, "effective_batch": s.effective_batch, "steps": s.steps}
    out |= {"epochs": s.epochs} if s.epochs else {}
    out |= {"epoch_steps": s.epoch_steps, "examples": s.examples, "optimizer": t.optimizer,
            "optimizer_used": run.plan.optimizer, "betas": [float(b) for b in group["betas"]], "eps": group["eps"],
            "weight_decay": group["weight_decay"], "max_grad_norm": t.max_grad_norm, "lr_scheduler": t.lr_scheduler,
            "warmup_steps": t.warmup_steps, "mixed_precision": run.plan.mixed_precision,
            "gradient_checkpointing": run.plan.gradient_checkpointing, "attention_slicing": t.attention_slicing,
            "vae_slicing": t.vae_slicing, "vae_tiling": t.vae_tiling, "resolution": cfg.data.resolution,
            "center_crop": cfg.data.center_crop, "random_flip": cfg.data.random_flip, "prior": cfg.prompt.prior}
    if cfg.prompt.prior:
        out |= {"prior_weight": cfg.prompt.prior_weight, "class_images": len(run.classes)}
    out |= data_settings(run)
    return out | {"loss": {"l2": cfg.loss.l2, "lpips": cfg.loss.lpips, "gram": cfg.loss.gram,
                           "snr_gamma": cfg.loss.snr_gamma}, "seed": t.seed} | run.method.settings()


def data_settings(run: Run) -> dict:
    """The bucket and caption settings of `training`: with data.buckets the table the run used, images (not repeats)
    per bucket, empty buckets left out; kohya's caption options."""
    d, out = run.cfg.data, {}
    if d.buckets:
        out |= {"buckets": bucket_counts(run.images.dataset.placements), "min_bucket": d.min_bucket,
                "max_bucket": d.max_bucket, "bucket_step": d.bucket_step, "bucket_no_upscale": d.bucket_no_upscale}
    return out | {"caption_dropout": d.caption_dropout, "shuffle_caption": d.shuffle_caption,
                  "keep_tokens": d.keep_tokens}


def trigger_word(cfg: Config) -> str:
    """The trigger word of an instance prompt ('sks' in 'a photo of sks person'), if any."""
    rare = [w for w in cfg.prompt.instance.split() if w.lower() in ("sks", "ohwx", "zwx", "xyz")]
    return rare[0] if rare else ""


def save_weights(run: Run, folder: Path, *, name: str, step: int) -> dict:
    """The kind's files (`Method.save`: stock weights and exports) and config.yaml into `folder`; returns the
    manifest fields the kind gave."""
    fields = run.method.save(folder, run.comps, run_facts(run, name=name, step=step))
    save_config(run.cfg, folder / "config.yaml")
    return fields


def artifact_manifest(run: Run, fields: dict, *, name: str, step: int, seconds: float, peak_bytes: int) -> Manifest:
    """style.json of the final artifact or of a snapshot: the same fields, `step` where the weights are from; the
    kind is the method's unless its save names another (a LoHa is merged from its kohya/LyCORIS file)."""
    cfg, fields = run.cfg, dict(fields)
    return Manifest(
        name=name, method=cfg.method, kind=fields.pop("kind", run.method.kind.name), base_model=cfg.model.ref,
        prompt=run.method.default_prompt(), class_prompt=cfg.prompt.class_prompt if cfg.prompt.prior else "",
        token=fields.pop("token", "") or trigger_word(cfg), resolution=cfg.data.resolution,
        steps=cfg.train.steps, step=step, trainable_params=run.method.trainable_count(run.comps),
        train_seconds=round(seconds, 2), peak_memory_bytes=peak_bytes, config_hash=config_hash(cfg),
        training=training_settings(run), **fields)


def snapshot(run: Run, step: int, *, seconds: float) -> Path:
    """Write snapshot `step` (main process): a whole artifact made in a temporary folder and renamed into place
    (replacing one a killed run made), its size printed; the oldest beyond train.keep_snapshots go. Everyone waits."""
    acc, folder = run.accelerator, snapshot_folder(run.out, step)
    if acc.is_main_process:
        name = f"{run.out.name}-{folder.name}"  # distinct export file names in the flat folders of WebUI tools
        peak = int(torch.cuda.max_memory_allocated(acc.device)) if acc.device.type == "cuda" else 0

        def fill(tmp: Path) -> None:
            fields = save_weights(run, tmp, name=name, step=step)
            write_manifest(tmp, artifact_manifest(run, fields, name=name, step=step, seconds=seconds, peak_bytes=peak))

        write_folder(folder, fill, what="snapshot", advice="free disk space, raise train.snapshot_every or set "
                     "train.keep_snapshots, and run again: --resume auto continues from the last checkpoint")
        tqdm.write(f"snapshot step {step}: {folder} ({human_bytes(artifact_bytes(folder))})")
        prune(list_snapshots(run.out), run.cfg.train.keep_snapshots)
    acc.wait_for_everyone()
    return folder


def drop_stale_snapshots(run: Run, start: int) -> None:
    """Remove, with a note, the snapshots past step `start` (where this run resumes) that another config made (a
    forced resume, a restart with other settings): they are not this run's weights. Snapshots of the same config
    hold exactly what this run will make again, and stay until it re-makes them in place."""
    if not run.accelerator.is_main_process:
        return
    current = to_dict(run.cfg)
    for folder in list_snapshots(run.out):
        if int(folder.name.split("-", 1)[1]) <= start:
            continue
        try:
            diff = config_differences(read_yaml(folder / "config.yaml"), current)
        except UserError:
            diff = ["its config.yaml is unreadable"]
        if diff:
            shutil.rmtree(folder)
            warnings.warn(f"removed snapshot {folder}: made with another config ({diff[0]}) after step {start}, "
                          "where this run resumes", Notice, stacklevel=2)
