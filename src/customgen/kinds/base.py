"""What every adaptation kind implements: one `Kind` object per kind (its whole life, for every stage) and one
`Method` per training run (the training half the one loop calls).

A new kind (say B-LoRA or an IP-Adapter style) is one module that subclasses both and one line in
`customgen.kinds.KINDS`; training, the style library, the inference session, evaluation, validation and the
plots only ask these objects. The list of what a kind implements is in docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from customgen.errors import UserError
from customgen.kinds.manifest import Manifest
from customgen.models import canonical_text_encoder


@dataclass(frozen=True)
class Recipe:
    """A training recipe (config `method`, configs/<name>.yaml): the kind it trains and what it learns."""

    name: str
    kind: str
    target: str  # "style" (validated on fixed content photos) | "subject" (txt2img)
    color: str  # its colour in the results plots


class Method:
    """The training half of a kind: which parameters train, captions, per-step hooks, the saved artifact.

    The one loop (customgen.train.loop) calls, per run: `saved_bytes` and `setup` once, then `caption` per example,
    `after_step` per optimizer step, `trained_params` per checkpoint, and `save` per snapshot and at the end.
    """

    trains_text_encoder = False
    pivotal_tuning = False  # whether the method can train pivotal tuning's tokens (customgen.kinds.pivotal): LoRA

    def __init__(self, cfg, kind: "Kind"):
        self.cfg, self.kind, self.name = cfg, kind, cfg.method
        if cfg.pivotal.tokens and not self.pivotal_tuning:
            raise UserError(f"pivotal tuning (pivotal.tokens={cfg.pivotal.tokens}) trains new tokens beside a LoRA; "
                            f"method {cfg.method} has none: use dreambooth_lora_subject or lora_style, or pivotal.tokens=0")

    def setup(self, comps) -> list[dict]:
        """Freeze everything, make the method's parameters trainable; optimizer parameter groups."""
        raise TypeError(f"{type(self).__name__} must define setup()")

    def trained_params(self, comps) -> dict[str, torch.Tensor]:
        """Name → trainable tensor, for checkpoints and the 'frozen stays frozen' check; text-encoder names are the
        canonical ones, so a checkpoint written under one transformers release resumes under another."""
        return {f"unet.{n}": p for n, p in comps.unet.named_parameters() if p.requires_grad} | canonical_text_encoder(
            {f"text_encoder.{n}": p for n, p in comps.text_encoder.named_parameters() if p.requires_grad},
            prefix="text_encoder.")

    def trainable_count(self, comps) -> int:
        """Parameters the method really learns (TI: only the new rows)."""
        return sum(p.numel() for p in self.trained_params(comps).values())

    def caption(self, record_caption: str, generator: torch.Generator) -> str:
        """The prompt of one example: the instance prompt, else the record's caption, else ""."""
        return self.cfg.prompt.instance or record_caption or ""

    def after_step(self, comps) -> None:
        """Called after every optimizer step (TI restores the frozen embedding rows)."""
        return None

    def default_prompt(self) -> str:
        """The prompt validation samples use and the manifest stores."""
        return self.cfg.prompt.instance

    def validation_prompts(self) -> list[str]:
        """The prompts of validation images: validation.prompts, else the default prompt."""
        return list(self.cfg.validation.prompts) or [self.default_prompt()]

    def memory_savers(self) -> list[str]:
        """`--set` changes that shrink this method's training memory, the mildest first (customgen.train.fit names
        them when nothing fits a card)."""
        return []

    def text_encoder_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The text encoder's dtype in a mixed-precision run (frozen weights go to `weight_dtype`)."""
        return weight_dtype

    def settings(self) -> dict:
        """The method's own training settings for style.json's `training` mapping (LoRA: rank, alpha, targets)."""
        return {}

    def saved_bytes(self, comps) -> int:
        """Bytes of the tensors `save` writes, over every file it writes, counted from the base model's shapes
        before `setup` (what the snapshot disk check plans with, customgen.train.snapshots)."""
        raise TypeError(f"{type(self).__name__} must define saved_bytes()")

    def save(self, folder: Path, comps, facts: dict) -> dict:
        """Write the weights (and exports for other tools) into `folder`; returns manifest fields (a `kind` among
        them names the kind that loads the artifact when it is not this one: a LoHa is merged from its file). `facts`
        are the run's training facts (name, base model, resolution, steps, lr, tag frequency, ...; train/run.py)."""
        raise TypeError(f"{type(self).__name__} must define save()")


class Kind:
    """One adaptation kind: training (`method`), artifact files, compatibility, inference and prompts.

    Inference state lives in the session (`session.state(kind)` gives this kind's own object, made by
    `new_state`), so one kind object serves every session.
    """

    name = ""  # the manifest's `kind`
    weights = ""  # the main weights file (what stock loaders read)
    has_scale = False  # a calibrated strength knob (LoRA's adapter weight): evaluation sweeps it; others run at 1
    recipes: tuple[Recipe, ...] = ()
    method_class: type[Method] = Method

    # --- training ------------------------------------------------------------------------------------------
    def method(self, cfg) -> Method:
        """The training half for one run of `cfg`."""
        return self.method_class(cfg, self)

    # --- artifact ------------------------------------------------------------------------------------------
    def files(self, manifest: Manifest) -> list[str]:
        """Every weights file of an artifact (the main one first), relative to its folder (pivotal tuning's embedding
        file last)."""
        return [manifest.weights, *manifest.exports] + ([manifest.embeddings] if manifest.embeddings else [])

    def check(self, style, comps) -> None:
        """Refuse (one line) an artifact made for another architecture, before any weight is loaded."""
        raise TypeError(f"{type(self).__name__} must define check()")

    def merge(self, comps, style, scale: float, *, single_file: bool) -> None:
        """Bake the style into `comps`' weights at `scale` (customgen export); one line where it cannot be."""
        raise UserError(f"{style.name}: a {self.name} style cannot be merged into a checkpoint")

    # --- inference -----------------------------------------------------------------------------------------
    def new_state(self):
        """This kind's per-session inference state (what is loaded, what is active)."""
        return None

    def load(self, session, style) -> None:
        """Load a style's weights into the session's base model, once."""
        raise TypeError(f"{type(self).__name__} must define load()")

    def activate(self, session, active: list[tuple]) -> None:
        """Make exactly these loaded (style, scale) pairs of this kind active; [] switches the kind off and
        restores the base model exactly."""
        raise TypeError(f"{type(self).__name__} must define activate()")

    def fuse(self, session) -> None:
        """Optionally bake the active state into the base weights for speed (LoRA: one adapter fused at its
        scale). Called after every kind has activated; `unfuse` must undo it exactly."""
        return None

    def unfuse(self, session) -> None:
        """Undo `fuse` exactly (the unfused weights bit for bit). Called before any kind loads or activates."""
        return None

    def default_prompt(self, style) -> str:
        """The manifest's prompt, else its token; "" for prompt-free styles."""
        return style.manifest.prompt or style.manifest.token

    def prompt(self, session, style, text: str) -> str:
        """`text` with this style's token replaced by what the session loaded it under (kinds with tokens)."""
        return text

    # --- stock tools (what `customgen bench` compares with) ------------------------------------------------------
    def stock_variants(self) -> dict[str, bool]:
        """The ways a diffusers user applies this kind's artifact, each with whether customgen's output must equal
        that one pixel for pixel (at scale 1)."""
        return {}

    def load_stock(self, pipe, style, variant: str) -> None:
        """Apply `style` at scale 1 to a fresh stock diffusers pipeline as `variant` (see stock_variants)."""
        raise TypeError(f"{type(self).__name__} must define load_stock()")

    def token_weights(self, session, style, scale: float) -> list[tuple[str, float]]:
        """(token, weight) pairs whose prompt embeddings are interpolated by weight (TI's scale); [] for none."""
        return []

    # --- memory ------------------------------------------------------------------------------------------------
    def resident_bytes(self, session, style) -> int:
        """Bytes a loaded style keeps on the model's device beside the base weights while sampling (LoRA: its
        adapter; Textual Inversion: its embedding rows); what the sampling prediction adds (inference.fit)."""
        return 0

    def planned_bytes(self, style, element_size: int) -> int:
        """`resident_bytes` known before anything loads, from the manifest or the file, for weights of
        `element_size` bytes: what `customgen plan --sample` adds for the style (inference.plan)."""
        return 0
