"""Peak GPU memory of a training run, predicted without a GPU (or measured the same way on real CPU tensors).

    est = estimate_training(cfg, plan)            # fake CUDA, the model's shapes, no weights
    est.weights, est.gradients, est.optimizer_state, est.activations, est.validation_peak, est.peak

The run is assembled by the code a real run uses (`train.build.assemble`: the method's trainables, dtypes,
checkpointing, loss networks, optimizer) from the model's architecture on a fake CUDA device (customgen.peak), the
loss networks with random weights (a plan looks up and downloads nothing), with zero images of the run's resolution
standing in for the data (cached latents or pixels, class images for prior preservation). Then, counting live
bytes: the setup (weights, latent caching, class images), the loop's own optimizer step (`train.loop.optimizer_step`,
after the optimizer state exists) and one validation call as `train.validation.validate` makes it
(models.footprint.sample_once). On CPU tensors (`fake=False`) the same code
measures a real run of the same step: what the tests hold the prediction against.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from customgen.config import Config
from customgen.data import ImageRecord
from customgen.data.cache import CachedLatents
from customgen.kinds import make_method
from customgen.memory import MemoryPlan, moved
from customgen.models import Components, load_components
from customgen.models.footprint import quiet, sample_once
from customgen.models.loading import load_architecture, place
from customgen.peak import LiveBytes, blocks, fake_cuda, materialize
from customgen.train.build import STYLE_LIMIT, WEIGHT_DTYPES, Run, assemble, memory_helpers, place_weights
from customgen.train.data import ImageSet, run_shape
from customgen.train.loop import offload_unused, optimizer_step
from customgen.train.optimizers import adamw, make_optimizer
from customgen.train.perceptual import Perceptual
from customgen.train.validation import eval_mode, validation_content

@dataclass
class Estimate:
    """Bytes on the device (tensors only: fixed costs are customgen.budget's), and what was estimated."""

    weights: int  # parameters and buffers on the device during the step
    gradients: int  # the trainables' gradients
    optimizer_state: int  # optimizer state tensors
    step_peak: int  # peak during the optimizer step
    validation_peak: int  # peak during one validation call, the training state resident
    setup_peak: int  # peak while caching latents and making class images, before training
    assembly_peak: int = 0  # peak while the method sets up and the loss networks compute the style set's Gram targets
    settings: dict = field(default_factory=dict)
    device: str = "cuda"
    seconds: float = 0.0

    @property
    def activations(self) -> int:
        """The step's peak above what stays resident (activations, temporaries, the optimizer's scratch)."""
        return max(0, self.step_peak - self.weights - self.gradients - self.optimizer_state)

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.validation_peak, self.setup_peak, self.assembly_peak)

    def to_dict(self) -> dict:
        return asdict(self) | {"activations": self.activations, "peak": self.peak}


class StepAccelerator:
    """What the loop and `assemble` use of accelerate's Accelerator, for one process: autocast, accumulation
    (the optimizer steps only when gradients sync, as accelerate's AcceleratedOptimizer does), backward, clipping."""

    process_index, num_processes, is_main_process, is_local_main_process = 0, 1, True, True

    def __init__(self, device: str, mixed_precision: str, grad_accum: int):
        self.device, self.mixed_precision = torch.device(device), mixed_precision
        self.grad_accum, self._micro, self.sync_gradients = grad_accum, 0, True

    def autocast(self):
        dtype = WEIGHT_DTYPES.get(self.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, *models):
        self._micro += 1
        self.sync_gradients = self._micro % self.grad_accum == 0
        yield

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def prepare(self, *objects):
        objects = tuple(_SyncedOptimizer(o, self) if isinstance(o, torch.optim.Optimizer) else o for o in objects)
        return objects[0] if len(objects) == 1 else objects

    def print(self, *args, **kwargs) -> None:
        return None


class _SyncedOptimizer:
    """accelerate's AcceleratedOptimizer: step and zero_grad act only on the micro-step where gradients sync."""

    def __init__(self, optimizer, accelerator: StepAccelerator):
        self.optimizer, self.accelerator = optimizer, accelerator
        self.param_groups, self.state = optimizer.param_groups, optimizer.state

    def step(self) -> None:
        if self.accelerator.sync_gradients:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.accelerator.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)


class AdamW8bitState(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as the memory it holds (bitsandbytes.optim.optimizer.Optimizer2State.init_state):
    two uint8 states and two fp32 absmax values per 256-element block for tensors of at least 4096 elements, two
    fp32 states for smaller ones, and the two 256-entry fp32 quantile maps once. Its fused CUDA kernel updates in
    place and allocates nothing; the update here is an in-place step too."""

    MIN_8BIT_SIZE, BLOCKSIZE = 4096, 256

    def __init__(self, params, *, lr: float = 1e-3, weight_decay: float = 1e-2):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.qmaps: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self._init_state(p)
                p.add_(p.grad, alpha=-group["lr"])

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if p.numel() < self.MIN_8BIT_SIZE:
            state["state1"], state["state2"] = (torch.zeros_like(p, dtype=torch.float32) for _ in range(2))
            return
        if not self.qmaps:
            self.qmaps = [torch.zeros(256, dtype=torch.float32, device=p.device) for _ in range(2)]
        n_blocks = -(-p.numel() // self.BLOCKSIZE)
        state["state1"], state["state2"] = (torch.zeros_like(p, dtype=torch.uint8) for _ in range(2))
        state["absmax1"], state["absmax2"] = (torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
                                              for _ in range(2))


def counted_optimizer(groups: list[dict], plan: MemoryPlan, *, weight_decay: float):
    """The run's optimizer for a count: what customgen.train.optimizers makes on CUDA (AdamW's fused kernel, Prodigy),
    also when the count runs on CPU tensors (fused AdamW runs on CPUs too since torch 2.4), or the 8-bit Adam
    stand-in."""
    if plan.optimizer == "adamw8bit":
        return AdamW8bitState(groups, weight_decay=weight_decay)
    if plan.optimizer == "adamw":
        return adamw(groups, weight_decay=weight_decay, fused=True)
    return make_optimizer(groups, plan, weight_decay=weight_decay)


class ShapeImages:
    """What the loop reads of an ImageDataset, at one image size (width, height): `n` black images with one caption."""

    placements = None  # one shape: the loop's plain order

    def __init__(self, n: int, size: tuple[int, int], caption: str = ""):
        self.records, self.order = [ImageRecord(f"image-{i}") for i in range(n)], list(range(n))
        self.size, self.caption = size, caption

    def __len__(self) -> int:
        return len(self.order)

    def caption_of(self, index: int) -> str:
        return self.caption

    def pixels(self, index: int, generator=None) -> torch.Tensor:
        return torch.zeros(3, self.size[1], self.size[0])

    def __getitem__(self, position: int) -> dict:
        return {"pixel_values": self.pixels(position)}


def shape_set(cfg: Config, n: int, caption: str = "", *, size: tuple[int, int] | None = None) -> ImageSet:
    """An ImageSet of `n` stand-in images of `size` (default: the square resolution), with cached latent
    distributions when train.cache_latents."""
    w, h = size or (cfg.data.resolution, cfg.data.resolution)
    latents = None
    if cfg.train.cache_latents:
        zeros = torch.zeros(n, 4, h // 8, w // 8)
        latents = CachedLatents(zeros, zeros.clone(), [f"image-{i}" for i in range(n)])
    return ImageSet(ShapeImages(n, (w, h), caption), latents)


def estimate_training(cfg: Config, plan: MemoryPlan, *, fake: bool = True, comps: Components | None = None) -> Estimate:
    """Bytes of `cfg`'s run under `plan` on a fake CUDA device (`fake`), or measured on real CPU tensors of `comps`
    (default: the model loaded on the CPU in fp32)."""
    start = time.monotonic()
    cfg = plan.apply(cfg)
    device = "cuda" if fake else "cpu"
    if comps is None:
        comps = load_architecture(cfg.model.ref) if fake else load_components(cfg.model.ref, device="cpu",
                                                                           dtype=torch.float32)
    with quiet(), (fake_cuda() if fake else contextlib.nullcontext(None)) as mode, LiveBytes(device) as live:
        live.add_all(comps.unet, comps.vae, comps.text_encoder)
        torch.manual_seed(cfg.train.seed)
        move = place if mode is None else functools.partial(_materialized, mode=mode, live=live)
        run, setup_peak, assembly_peak = _assembled(cfg, plan, comps, device, live, move)
        offload_unused(run)
        est = _count_steps(run, live)
        est.validation_peak = _count_validation(run, live)
    est.setup_peak, est.assembly_peak = setup_peak, assembly_peak
    est.device, est.seconds = device, time.monotonic() - start
    est.settings = settings(cfg, plan)
    return est


def _materialized(module, device, dtype, *, mode, live: LiveBytes) -> None:
    """Place a meta module as fake tensors in one pass (customgen.peak.materialize), then as `place` would."""
    materialize(module, device, dtype, mode)
    live.add_all(module)
    place(module, device, dtype)


def _assembled(cfg: Config, plan: MemoryPlan, comps: Components, device: str, live: LiveBytes,
               move) -> tuple[Run, int, int]:
    """The run as build_run makes it, with stand-in data; the peaks of the setup (latent caching, class images)
    and of the assembly (adapters, loss networks, Gram targets)."""
    method = make_method(cfg)
    acc = StepAccelerator(device, plan.mixed_precision, cfg.train.grad_accum)
    memory_helpers(cfg, comps)
    place_weights(comps, acc.device, WEIGHT_DTYPES.get(plan.mixed_precision, torch.float32), method, move=move)
    live.reset_peak()
    with torch.no_grad():
        if cfg.prompt.prior:  # class images come from the base model, batch 1, at the training resolution
            with acc.autocast():
                sample_once(comps, kind="txt2img", size=cfg.data.resolution, batch=1)
        if cfg.train.cache_latents:  # customgen.data.cache encodes 4 images per batch (of a bucket), without autocast
            pixels = torch.zeros(4, 3, run_shape(cfg)[1], run_shape(cfg)[0])
            comps.vae.encode(pixels.to(acc.device, comps.vae.dtype)).latent_dist.sample()
    setup_peak, _ = live.peak, live.reset_peak()
    n = cfg.train.batch_size
    styles = min(STYLE_LIMIT, cfg.data.max_images) if cfg.loss.gram > 0 else n  # the Gram targets' image set
    run = assemble(cfg, Path("."), acc, comps, method, plan, images=shape_set(cfg, max(n, styles), size=run_shape(cfg)),
                   classes=shape_set(cfg, n, cfg.prompt.class_prompt) if cfg.prompt.prior else None,
                   contents=shape_set(cfg, n) if cfg.loss.content_root else None, optimizer=counted_optimizer,
                   perceptual=functools.partial(Perceptual, pretrained=False))
    return run, setup_peak, live.peak


def _count_steps(run: Run, live: LiveBytes) -> Estimate:
    """One optimizer step of the loop, counted once the optimizer state exists (as from the second step on).
    Step 0 is the counted one: perceptual terms run on it (every N steps, from 0)."""
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    for p in params:  # the first step creates the state; zero gradients make the same state
        p.grad = torch.zeros_like(p)
    run.optimizer.optimizer.step()
    run.optimizer.optimizer.zero_grad(set_to_none=True)
    state = sum(blocks(t.untyped_storage().nbytes()) for s in run.optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.device.type == live.device)
    state += sum(blocks(q.untyped_storage().nbytes()) for q in getattr(run.optimizer.optimizer, "qmaps", []))
    weights = _module_bytes(live.device, run.comps.unet, run.comps.vae, run.comps.text_encoder,
                            *(m for m in _loss_networks(run)))
    grads = sum(blocks(p.numel() * p.element_size()) for p in params)
    live.reset_peak()
    optimizer_step(run, 0)
    return Estimate(weights=weights, gradients=grads, optimizer_state=state, step_peak=live.peak,
                    validation_peak=0, setup_peak=0)


def _count_validation(run: Run, live: LiveBytes) -> int:
    """One validation call as validate() makes it: VAE and text encoder back on the device, eval mode, autocast."""
    cfg, c = run.cfg, run.comps
    live.reset_peak()
    content = validation_content(cfg)
    kind, batch = ("img2img", 1) if content else ("txt2img", cfg.validation.num_images)
    with eval_mode(c.unet, c.text_encoder), moved(c.vae, c.text_encoder, device=run.accelerator.device), \
            run.accelerator.autocast(), torch.no_grad():
        sample_once(c, kind=kind, size=cfg.data.resolution, batch=batch, guidance=cfg.validation.guidance)
    return live.peak


def _loss_networks(run: Run) -> list:
    p = run.perceptual
    return [m for m in (getattr(p, "lpips", None), getattr(p, "vgg", None)) if m is not None]


def _module_bytes(device: str, *modules) -> int:
    """Bytes of the distinct storages of these modules' parameters and buffers on `device`."""
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.device.type == device:
                s = t.untyped_storage()
                seen[s._cdata] = blocks(s.nbytes())
    return sum(seen.values())


def settings(cfg: Config, plan: MemoryPlan) -> dict:
    """What an estimate was made for (the plan's table and JSON show it)."""
    t = cfg.train
    return {"model": cfg.model.ref, "method": cfg.method, "resolution": cfg.data.resolution,
            "image": list(run_shape(cfg)),  # (width, height): the largest bucket with data.buckets
            "batch_size": t.batch_size, "grad_accum": t.grad_accum, "prior": cfg.prompt.prior,
            "mixed_precision": plan.mixed_precision, "gradient_checkpointing": plan.gradient_checkpointing,
            "optimizer": plan.optimizer, "offload": plan.offload, "cache_latents": t.cache_latents,
            "validation": "img2img" if validation_content(cfg) else f"txt2img x{cfg.validation.num_images}"}
