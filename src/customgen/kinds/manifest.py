"""style.json: what an artifact is and how it was made, written beside its weights in every artifact folder.

    <artifact>/style.json     the manifest (method, kind, base model, token, rank, training settings, versions, ...)
    <artifact>/config.yaml    the resolved training config
    <artifact>/<weights>      the kind's files (customgen.kinds: LoRA, DreamBooth, Textual Inversion)
    <artifact>/snapshots/step-NNNNNN/   complete artifacts of the same run at earlier steps (train.snapshot_every)
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import types
import typing
from pathlib import Path

import diffusers
import peft
import torch
import transformers

import customgen
from customgen.errors import UserError

MANIFEST = "style.json"
SNAPSHOTS = "snapshots"  # <artifact>/snapshots/step-NNNNNN/: a whole artifact per snapshot step
_SNAPSHOT = re.compile(r"^step-(\d{6,})$")


@dataclasses.dataclass
class Manifest:
    """style.json: what an artifact is and how it was made."""

    name: str
    method: str  # the training recipe (config `method`), e.g. lora_style
    kind: str  # the adaptation kind (customgen.kinds registry): how it is loaded
    base_model: str  # the model reference it was trained on
    weights: str  # main weights file name inside the folder
    prompt: str = ""  # default prompt at inference ("" for prompt-free LoRA styles)
    token: str = ""  # trigger / placeholder token, if any
    class_prompt: str = ""  # prior-preservation class prompt, if any
    rank: int | None = None
    alpha: float | None = None
    scope: str | None = None  # DreamBooth: attention | cross_attention | full
    text_encoder: bool = False  # LoRA also trained the text encoder
    resolution: int = 512
    steps: int = 0  # the run's train.steps
    step: int = 0  # the optimizer step these weights are from (a snapshot's N; 0 in artifacts older than snapshots)
    trainable_params: int = 0
    file_bytes: int = 0
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0
    config_hash: str = ""
    # the settings that define the run's recipe: lr, batch × accumulation (effective batch), steps (epochs), optimizer
    # asked and used, schedule, precision, the kind's own (rank, alpha, targets), flip, prior, preset; {} before 2026-12
    training: dict = dataclasses.field(default_factory=dict)
    exports: list = dataclasses.field(default_factory=list)  # extra files for other tools (kohya/WebUI, ...)
    embeddings: str = ""  # pivotal tuning: the token embeddings' file, <name>_emb.safetensors ({"clip_l": (n, width)})
    tokens: list = dataclasses.field(default_factory=list)  # pivotal tuning: its tokens, ["<s0>", "<s1>", ...]
    versions: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    format_version: int = 1


def snapshot_folder(artifact: str | Path, step: int) -> Path:
    """Where the snapshot of `artifact` at optimizer step `step` lives."""
    return Path(artifact) / SNAPSHOTS / f"step-{step:06d}"


def list_snapshots(artifact: str | Path) -> list[Path]:
    """The complete snapshots of `artifact` (folders holding a manifest), by step; half-written ones are skipped."""
    root = Path(artifact) / SNAPSHOTS
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _SNAPSHOT.match(p.name)) and (p / MANIFEST).is_file()] \
        if root.is_dir() else []
    return [p for _, p in sorted(found)]


def package_versions() -> dict:
    """Versions that matter for reloading an artifact."""
    return {"customgen": customgen.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def training_facts(cfg, name: str, **measured) -> dict:
    """What a training run was, from its config plus what it measured (`measured` wins; `step`: the step the
    weights are from, a snapshot's): the kinds' save methods record it in their exports (kohya's ss_* metadata)."""
    return {"name": name, "method": cfg.method, "base_model": cfg.model.ref, "resolution": cfg.data.resolution,
            "steps": cfg.train.steps, "lr": cfg.train.lr, "text_encoder_lr": cfg.lora.text_encoder_lr,
            "batch_size": cfg.train.batch_size, "seed": cfg.train.seed, "mixed_precision": cfg.train.mixed_precision,
            "optimizer": cfg.train.optimizer, "lr_scheduler": cfg.train.lr_scheduler, "num_images": 0,
            "tag_frequency": {}, "started_at": 0, "finished_at": 0, "step": cfg.train.steps,
            "grad_accum": cfg.train.grad_accum or 1, "effective_batch": cfg.train.batch_size * (cfg.train.grad_accum or 1),
            "epoch_steps": 0, "epochs": cfg.train.epochs, "warmup_steps": cfg.train.warmup_steps,
            "max_grad_norm": cfg.train.max_grad_norm, "random_flip": bool(cfg.data.random_flip),
            "prior_weight": cfg.prompt.prior_weight if cfg.prompt.prior else 0.0, "buckets": cfg.data.buckets,
            "min_bucket": cfg.data.min_bucket if cfg.data.buckets else None,
            "max_bucket": cfg.data.max_bucket if cfg.data.buckets else None,
            "bucket_no_upscale": cfg.data.bucket_no_upscale if cfg.data.buckets else None,
            "caption_dropout": cfg.data.caption_dropout, "shuffle_caption": cfg.data.shuffle_caption,
            "keep_tokens": cfg.data.keep_tokens, "noise_offset": cfg.loss.noise_offset,
            "adaptive_noise_scale": cfg.loss.adaptive_noise_scale} | measured


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write style.json (fills file size, versions and time stamp)."""
    folder = Path(folder)
    weights = folder / manifest.weights
    manifest.file_bytes = weights.stat().st_size if weights.exists() else 0
    manifest.versions = manifest.versions or package_versions()
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = folder / MANIFEST
    path.write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
    return path


def read_manifest(folder: str | Path) -> Manifest:
    """Read an artifact's style.json (one-line errors for a missing or corrupt manifest); the kind and the
    weights file are checked by `customgen.kinds.read_artifact`."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a customgen artifact (no {MANIFEST} inside)")
    try:
        data = json.loads(path.read_text())
        known = typing.get_type_hints(Manifest)
        fields = {k: v for k, v in data.items() if k in known}
        manifest = Manifest(**fields)
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}); retrain or re-copy the artifact") from err
    for key, value in fields.items():
        if not _fits(value, known[key]):
            raise UserError(f"{path} is corrupt: {key} is {value!r}, expected {known[key]}; retrain or re-copy "
                            "the artifact")
    return manifest


def _fits(value, tp) -> bool:
    """Whether a JSON value has a manifest field's type (ints count as floats; a list holds file names)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if tp is type(None) or value is None:
        return value is None and tp is type(None)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, tp)
