"""Run assembly: everything the loop needs, built once (accelerator, components, method, data, optimizer)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from customgen.config import Config
from customgen.data import scan_images
from customgen.errors import UserError
from customgen.kinds import Method, make_method
from customgen.kinds.freeze import parameter_report
from customgen.limits import check_limits
from customgen.memory import MemoryPlan, plan_memory, probe
from customgen.models import Components, load_components
from customgen.models.loading import place
from customgen.train.data import (ImageSet, bucket_examples, ensure_class_images, image_set, placements_of, settle_data,
                                  training_records)
from customgen.train.optimizers import make_optimizer
from customgen.train.perceptual import Perceptual
from customgen.train.schedule import Schedule, make_schedule, resolved
from customgen.train.snapshots import check_space, kept_snapshots

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # mixed precision → dtype of frozen weights


@dataclass
class Run:
    """The state of one training run (the loop reads and steps it)."""

    cfg: Config  # resolved: train.steps (from train.epochs when given) and data.random_flip as the run does them
    out: Path
    accelerator: Accelerator
    comps: Components
    method: Method
    plan: MemoryPlan
    images: ImageSet  # instance/style images
    classes: ImageSet | None  # prior-preservation class images
    contents: ImageSet | None  # content images for perceptual content pairs
    unet: torch.nn.Module  # prepared (maybe DDP-wrapped) UNet
    text_encoder: torch.nn.Module  # prepared text encoder
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    perceptual: Perceptual | None
    schedule: Schedule | None = None  # steps, epochs, effective batch (None: an estimate's run, which never loops)
    weight_dtype: torch.dtype = torch.float32
    prompt_cache: dict = field(default_factory=dict)
    caption_log: object | None = None  # CaptionLog while the loop runs (customgen.train.captions); None in estimates
    started: float = field(default_factory=time.time)  # wall-clock start (kohya's ss_training_started_at)

    @property
    def needs_pixels(self) -> bool:
        return self.perceptual is not None and self.perceptual.lpips is not None


def build_run(cfg: Config, out: Path, *, plan: MemoryPlan | None = None) -> Run:
    """Components, method, data, optimizer and accelerator for `cfg` (`plan`: what memory auto chose, else the
    settings as given); the run's config is `cfg` with the plan's choices, resolved against the data
    (customgen.train.schedule), its schedule printed."""
    torch.manual_seed(cfg.train.seed)  # adapter initialisation is seeded too
    method, info = make_method(cfg), probe(dtype=cfg.model.dtype)
    plan = plan or plan_memory(cfg.train, info)
    cfg = settle_data(plan.apply(cfg))  # concrete settings: checkpointing, optimizer, micro-batch, buckets, cache
    acc = make_accelerator(cfg, out, method, plan)
    acc.print(plan.describe(info))
    records = training_records(cfg)
    placements = placements_of(records, cfg)
    schedule = make_schedule(cfg, examples=sum(r.repeats for r in records), processes=acc.num_processes,
                             buckets=bucket_examples(records, placements))
    cfg = check_limits(resolved(cfg, schedule))
    acc.print(schedule.describe())
    comps = load_components(cfg.model.ref, device="cpu", dtype=torch.float32)
    memory_helpers(cfg, comps)
    if kept_snapshots(cfg):  # before class images, adapters and any step: snapshots the disk cannot hold are refused
        acc.print(check_space(cfg, out, method.saved_bytes(comps)))
    place_weights(comps, acc.device, WEIGHT_DTYPES.get(plan.mixed_precision, torch.float32), method)
    classes = None
    if cfg.prompt.prior:  # the *base* model makes the class images, before any adapter exists
        folder = Path(cfg.prompt.class_dir or out / "class_images")
        with acc.autocast():  # Textual Inversion's text encoder stays fp32 beside a half-precision UNet
            ensure_class_images(comps, cfg, folder, is_main=acc.is_main_process)
        acc.wait_for_everyone()
        classes = image_set(ensure_class_images(comps, cfg, folder, is_main=False), cfg, comps.vae)
    images = image_set(records, cfg, comps.vae, cache_dir=cfg.train.latent_cache_dir, placements=placements)
    return assemble(cfg, out, acc, comps, method, plan, images=images, classes=classes,
                    contents=content_set(cfg, comps.vae), schedule=schedule)


def place_weights(comps: Components, device, weight_dtype: torch.dtype, method: Method, *, move=place) -> None:
    """The base weights on the device in the mixed-precision dtype (the text encoder in the method's dtype);
    `move(module, device, dtype)` places one module (customgen.train.estimate's makes fake tensors)."""
    for m in (comps.unet, comps.vae):
        move(m, device, weight_dtype)
    move(comps.text_encoder, device, method.text_encoder_dtype(weight_dtype))


def assemble(cfg: Config, out: Path, acc, comps: Components, method: Method, plan: MemoryPlan, *, images: ImageSet,
             classes: ImageSet | None, contents: ImageSet | None, schedule: Schedule | None = None,
             optimizer=make_optimizer, perceptual=Perceptual) -> Run:
    """The run from its parts: the method's trainables, dtypes and checkpointing, the loss networks
    (`perceptual(cfg, style_pixels, device)`), the optimizer (`optimizer(groups, plan, weight_decay=)`) and scheduler,
    prepared by `acc` (customgen.train.estimate assembles the same run on a fake device, loss networks without
    their weights)."""
    groups = method.setup(comps)
    weight_dtype = place_components(cfg, comps, acc, plan, method)
    acc.print(method_report(method, comps))
    losses = None
    if cfg.loss.lpips > 0 or cfg.loss.gram > 0:
        losses = perceptual(cfg, style_pixels(images), acc.device)
    opt = optimizer(groups, plan, weight_decay=cfg.train.weight_decay)
    lr_scheduler = make_lr_scheduler(cfg, opt, acc.num_processes)
    unet, text_encoder, opt, lr_scheduler = prepare(acc, comps, opt, lr_scheduler)
    return Run(cfg=cfg, out=out, accelerator=acc, comps=comps, method=method, plan=plan, images=images,
               classes=classes, contents=contents, unet=unet, text_encoder=text_encoder, optimizer=opt,
               lr_scheduler=lr_scheduler, perceptual=losses, schedule=schedule, weight_dtype=weight_dtype)


def memory_helpers(cfg: Config, comps: Components) -> None:
    """diffusers' memory switches the config asks for: sliced UNet attention, sliced or tiled VAE."""
    if cfg.train.attention_slicing:
        comps.unet.set_attention_slice("auto")  # half the heads at a time (SlicedAttnProcessor)
    if cfg.train.vae_slicing:
        comps.vae.enable_slicing()
    if cfg.train.vae_tiling:
        comps.vae.enable_tiling()


def make_accelerator(cfg: Config, out: Path, method: Method, plan: MemoryPlan) -> Accelerator:
    """accelerate: mixed precision, accumulation, TensorBoard; unused-parameter DDP only when the text encoder trains."""
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if method.trains_text_encoder else []
    make = lambda: Accelerator(  # noqa: E731
        mixed_precision=plan.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum, log_with="tensorboard",
        kwargs_handlers=handlers, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    try:
        return make()
    except ValueError as err:
        # accelerate keeps one global state per process and refuses another precision: a notebook that trains
        # twice (bf16, then fp32) would fail. In a single process nothing else shares that state: forget it.
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return make()


def place_components(cfg: Config, comps: Components, accelerator, plan: MemoryPlan, method: Method) -> torch.dtype:
    """Frozen weights in the mixed-precision dtype, trainables in fp32 (no 'unscale FP16 gradients')."""
    weight_dtype = WEIGHT_DTYPES.get(plan.mixed_precision, torch.float32)
    for m in (comps.unet, comps.vae):
        place(m, accelerator.device, weight_dtype)
    place(comps.text_encoder, accelerator.device, method.text_encoder_dtype(weight_dtype))
    if cfg.loss.lpips > 0 or cfg.loss.gram > 0:
        place(comps.vae, accelerator.device, torch.float32)  # gradients flow through the decoder: keep it fp32
    cast_training_params([comps.unet, comps.text_encoder], dtype=torch.float32)
    if plan.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            comps.text_encoder.gradient_checkpointing_enable()
    return weight_dtype


def make_lr_scheduler(cfg: Config, optimizer, num_processes: int):
    """diffusers' get_scheduler; accelerate steps it once per process, hence the scaling."""
    try:
        return get_scheduler(cfg.train.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=cfg.train.warmup_steps * num_processes,
                             num_training_steps=cfg.train.steps * num_processes)
    except ValueError as err:
        raise UserError(f"train.lr_scheduler: {err}") from err


def prepare(acc: Accelerator, comps: Components, optimizer, lr_scheduler):
    """accelerate.prepare the modules that hold trainable parameters (DDP wraps only those)."""
    trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
    unet = acc.prepare(comps.unet) if trains(comps.unet) else comps.unet
    te = acc.prepare(comps.text_encoder) if trains(comps.text_encoder) else comps.text_encoder
    optimizer, lr_scheduler = acc.prepare(optimizer, lr_scheduler)
    return unet, te, optimizer, lr_scheduler


def method_report(method: Method, comps: Components) -> str:
    return f"method {method.name}: {method.trainable_count(comps):,} trainable parameters\n" + parameter_report(
        unet=comps.unet, text_encoder=comps.text_encoder)


def content_set(cfg: Config, vae) -> ImageSet | None:
    """Content images for perceptual content pairs (loss.content_root), or None."""
    if not cfg.loss.content_root:
        return None
    scan = scan_images(cfg.loss.content_root, min_size=cfg.data.min_size)
    if not scan.records:
        raise UserError(f"no usable content images under loss.content_root={cfg.loss.content_root}")
    return image_set(sorted(scan.records, key=lambda r: r.path)[: cfg.data.max_images], cfg, vae)


STYLE_LIMIT = 64  # the Gram targets are the mean Gram matrices of up to this many style images


def style_pixels(images: ImageSet, limit: int = STYLE_LIMIT) -> list[torch.Tensor]:
    """Pixels of up to `limit` style images, for the Gram targets: one (n, 3, H, W) tensor per image shape (one
    shape without buckets), in the order of their first image."""
    n = min(limit, len(images.dataset.records))
    groups: dict[tuple, list[torch.Tensor]] = {}
    for i in range(n):
        x = images.dataset[images.dataset.order.index(i)]["pixel_values"]
        groups.setdefault(tuple(x.shape), []).append(x)
    return [torch.stack(g) for g in groups.values()]
