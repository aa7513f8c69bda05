"""A loaded base model and the styles loaded into it: the base loads once, switching styles loads only style weights.

Each adaptation kind keeps its own state in the session (`session.state(kind)`) and does its own loading and
activation (customgen.kinds): LoRA styles are named peft adapters (one active style fused), Textual Inversion
tokens are added once, DreamBooth weights are swapped in and the base weights restored exactly.

What does not change between images is built once: the schedulers (a pipeline resets its scheduler on every
call, as a stock pipeline reuses its own) and the encoded prompts of the active styles.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict

import diffusers
import torch
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog

import customgen.models as models
from customgen.errors import UserError
from customgen.inference.library import check_compatible
from customgen.kinds import KINDS, Kind
from customgen.memory import sync
from customgen.request import DEFAULT_MODEL, SCHEDULERS as SCHEDULER_NAMES

# One scheduler per name, all built from the model's own scheduler config (as diffusers' LCM/TCD docs build theirs:
# `LCMScheduler.from_config(pipe.scheduler.config)`).
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # DPM-Solver++(2M), Lu et al. 2022
    "ddim": ("DDIMScheduler", {}),  # Song et al. 2021
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # Liu et al. 2022; SD v1.5's published default
    "ddpm": ("DDPMScheduler", {}),  # Ho et al. 2020 (slow: ancestral, many steps)
    "lcm": ("LCMScheduler", {}),  # Latent Consistency Models, Luo et al. 2023: LCM-LoRA, 4-8 steps
    "tcd": ("TCDScheduler", {}),  # Trajectory Consistency Distillation, Zheng et al. 2024: TCD/Hyper-SD LoRAs
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "customgen.request.SCHEDULERS names the schedulers built here"
MAX_SESSIONS = 1  # a T4 holds one SD v1.5 in fp16 comfortably; a new model reference replaces the old one
_SESSIONS: OrderedDict = OrderedDict()


def make_scheduler(name: str, config):
    """A fresh scheduler `name` from the model's scheduler config."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **kwargs)


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers/transformers log multi-line hints while loading adapters; users get our one-line notices."""
    levels, bars = (dlog.get_verbosity(), tlog.get_verbosity()), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # transformers 5 shows a "Loading weights" bar for text-encoder LoRA
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()


class Session:
    """One base model (Components) plus the styles loaded into it, each kind's state kept apart."""

    def __init__(self, comps):
        self.comps = comps
        self.lock = threading.RLock()  # the demo serves requests from threads; one generation at a time
        self.extra: dict = {}  # lazily built add-ons (ControlNets, IP-Adapter, previews)
        self.loaded: dict = {}  # style key (artifact folder or file) → Style, once its weights are in the base model
        self.active: tuple | None = None  # ((style key, scale), ...) activated last; None: unknown
        self.prompts: dict = {}  # encoded prompts while the active styles stay the same (inference.prompts)
        self.timings: dict | None = None  # phase → [seconds]; stylize fills it when a benchmark sets a dict
        self._pipes: dict = {}
        self._states: dict = {}
        self._schedulers: dict = {}

    @property
    def native_size(self) -> int:
        """The model's training resolution (short side): UNet sample size × VAE factor (512 for SD v1.5)."""
        factor = 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        return int(self.comps.unet.config.sample_size) * factor

    def state(self, kind: Kind):
        """`kind`'s inference state in this session (made on first use)."""
        if kind.name not in self._states:
            self._states[kind.name] = kind.new_state()
        return self._states[kind.name]

    def pipeline(self, kind: str = "img2img", factory=None):
        """A pipeline sharing this session's modules, built once per name: a stock one of `kind`, or what
        `factory()` builds (e.g. ControlNet img2img)."""
        if kind not in self._pipes:
            pipe = factory() if factory is not None else models.build_pipeline(self.comps, kind=kind)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[kind] = pipe
        return self._pipes[kind]

    def scheduler(self, name: str):
        """The scheduler `name`, built once from the model's config (every pipeline call resets it)."""
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.comps.scheduler.config)
        return self._schedulers[name]

    def activate(self, specs: list[tuple]) -> None:
        """Make exactly these (style, scale) pairs active; every other loaded style is switched off. Nothing
        happens when they are already active; otherwise kinds unfuse, load, activate, then fuse."""
        key = tuple((style.key, float(w)) for style, w in specs)
        if key == self.active:
            return
        self.unfuse()
        for style, _ in specs:
            self.load(style)
        for kind in KINDS.values():
            kind.activate(self, [(s, w) for s, w in specs if s.kind is kind])
        for kind in KINDS.values():
            kind.fuse(self)
        self.active = key

    def unfuse(self) -> None:
        """Every kind's fused weights undone exactly, in the reverse order of fusing (each restores the weights it
        met); the encoded prompts forgotten."""
        for kind in reversed(KINDS.values()):
            kind.unfuse(self)
        self.active = None
        self.prompts.clear()

    def load(self, style) -> None:
        """Load a style's weights into the base once (checked against this architecture first)."""
        if style.key in self.loaded:
            return
        check_compatible(style, self.comps)
        self.unfuse()  # loaders and DreamBooth's swap see the unfused weights
        with quiet_diffusers():
            style.kind.load(self, style)
        self.loaded[style.key] = style


@contextlib.contextmanager
def lap(session: Session, phase: str):
    """Time the block into `session.timings[phase]` (synchronised) when a benchmark asked for timings."""
    if session.timings is None:
        yield
        return
    sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        sync()
        session.timings.setdefault(phase, []).append(time.perf_counter() - start)


def get_session(model=DEFAULT_MODEL, *, device=None, dtype=None) -> Session:
    """The cached Session for (model, device, dtype); loads the base only the first time (MAX_SESSIONS kept)."""
    if isinstance(model, Session):
        return model
    key = (str(model), None if device is None else str(device), None if dtype is None else str(dtype))
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    while len(_SESSIONS) >= MAX_SESSIONS:
        _SESSIONS.popitem(last=False)  # free the old model before loading the next (GPU memory)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    session = Session(models.load_components(model, device=device, dtype=dtype))
    _SESSIONS[key] = session
    return session


def clear_sessions() -> None:
    """Forget every cached base model (tests; freeing GPU memory)."""
    _SESSIONS.clear()
