"""A run's schedule, resolved from its config and its data before any step: optimizer steps (given, or as epochs
counted the way kohya's sd-scripts count them), the effective batch, validation steps and the horizontal flip.

An optimizer step is `train.grad_accum` micro-batches of `train.batch_size` examples on each of the processes, so
effective batch = batch_size × grad_accum × processes; `train.steps`, snapshots, checkpoints, validation and the
loss log all count optimizer steps. Each example's randomness (flip, latent sample, timestep, noise, TI template)
comes from its own index in the run (customgen.train.data.sample_ids), so batch 1 × accumulation 4 trains exactly
as batch 4 and as batch 2 on two GPUs, up to float rounding.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from customgen.config import Config
from customgen.kinds import recipe


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run makes and what one of them holds."""

    examples: int  # training examples per epoch: images × their kohya repeats
    batch_size: int  # per micro-batch and process
    grad_accum: int  # micro-batches per optimizer step
    processes: int  # data-parallel processes (GPUs)
    steps: int  # optimizer steps of the run
    epochs: int  # train.epochs as given (0: the run was given in steps)
    buckets: tuple[int, ...] = ()  # examples per aspect-ratio bucket (data.buckets; () when images are cropped square)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def epoch_steps(self) -> int:
        """Optimizer steps per epoch as kohya-ss/sd-scripts' train_network.py (@48d368f) counts them: ceil(batches /
        processes / accumulation), batches = ceil(examples / batch_size). With buckets an optimizer step's examples
        share a bucket (customgen.train.data.bucket_epoch): Σ over buckets of ceil(examples / effective batch), kohya's
        count when accumulation and processes are 1 (kohya's batches are Σ ceil(examples / batch_size))."""
        if self.buckets:
            return sum(-(-n // self.effective_batch) for n in self.buckets)
        batches = -(-self.examples // self.batch_size)
        return -(-batches // (self.processes * self.grad_accum))

    def describe(self) -> str:
        """The line printed at the start of training."""
        batch = (f"effective batch {self.effective_batch} (batch {self.batch_size} × accumulation {self.grad_accum} × "
                 f"{self.processes} process{'es' if self.processes > 1 else ''})")
        where = f" in {len(self.buckets)} aspect-ratio buckets" if self.buckets else ""
        if self.epochs:
            return (f"schedule: {self.epochs} epochs × {self.epoch_steps:,} optimizer steps = {self.steps:,} steps of "
                    f"{batch}; an epoch is {self.examples:,} examples (images × repeats){where}")
        return (f"schedule: {self.steps:,} optimizer steps of {batch} = {self.steps / self.epoch_steps:.1f} epochs of "
                f"{self.examples:,} examples (images × repeats){where}")


def make_schedule(cfg: Config, *, examples: int, processes: int, buckets: tuple[int, ...] = ()) -> Schedule:
    """The schedule of `cfg` on `examples` training examples (`buckets`: their counts per aspect-ratio bucket) and
    `processes` processes (train.epochs > 0 sets the steps)."""
    t = cfg.train
    plain = Schedule(examples=examples, batch_size=t.batch_size, grad_accum=t.grad_accum or 1, processes=processes,
                     steps=t.steps, epochs=t.epochs, buckets=tuple(buckets))
    return dataclasses.replace(plain, steps=t.epochs * plain.epoch_steps) if t.epochs else plain


def random_flip(cfg: Config) -> bool:
    """Whether training flips images horizontally: data.random_flip, or by the recipe's target when it is None
    (styles flip, subjects do not)."""
    if cfg.data.random_flip is not None:
        return cfg.data.random_flip
    return recipe(cfg.method).target == "style"


def resolved(cfg: Config, schedule: Schedule) -> Config:
    """A copy of `cfg` with what the run really does written in: the optimizer steps and the flip (saved as the
    artifact's config.yaml and hashed into its checkpoints)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=schedule.steps),
                               data=dataclasses.replace(cfg.data, random_flip=random_flip(cfg)))


def validation_steps(cfg: Config, schedule: Schedule) -> int:
    """Optimizer steps between per-epoch validation images (train.validate_every_epochs; 0: none)."""
    return cfg.train.validate_every_epochs * schedule.epoch_steps


def group_steps(frac: float, steps: int) -> int:
    """Optimizer steps a parameter group with a `frac` key trains (pivotal tuning's embeddings, pivotal.frac): the
    first ⌈frac × steps⌉, the fraction read as the decimal it was written as (0.3 × 10 is 3, not 4); diffusers'
    --train_text_encoder_ti_frac counts epochs, int(frac × epochs)."""
    return math.ceil(Fraction(repr(float(frac))) * steps)
