"""A loaded base model and the styles loaded into it: the base loads once, switching styles loads only style weights.

LoRA styles become named peft adapters (loaded once, then `set_adapters`); Textual Inversion tokens are added
once; DreamBooth weights are swapped in and the base weights restored exactly (artifacts.load_dreambooth).
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections import OrderedDict

import torch

import customgen.models as models
from customgen import artifacts
from customgen.errors import UserError
from customgen.inference.library import Style, check_compatible

# One scheduler per name, all built from the model's own scheduler config.
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # DPM-Solver++(2M), Lu et al. 2022
    "ddim": ("DDIMScheduler", {}),  # Song et al. 2021
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # Liu et al. 2022; SD v1.5's published default
    "ddpm": ("DDPMScheduler", {}),  # Ho et al. 2020 (slow: ancestral, many steps)
}
MAX_SESSIONS = 1  # a T4 holds one SD v1.5 in fp16 comfortably; a new model reference replaces the old one
_SESSIONS: OrderedDict = OrderedDict()


def make_scheduler(name: str, config):
    """A fresh scheduler `name` from the model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **kwargs)


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers/transformers log multi-line hints while loading adapters; users get our one-line notices."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

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
    """One base model (Components) plus the LoRA adapters, TI tokens and DreamBooth weights loaded into it."""

    def __init__(self, comps):
        self.comps = comps
        self.lock = threading.RLock()  # the demo serves requests from threads; one generation at a time
        self.extra: dict = {}  # lazily built add-ons (ControlNets, IP-Adapter, style embeddings)
        self._pipes: dict = {}
        self._lora: dict = {}  # artifact folder → adapter name
        self._tokens: dict = {}  # artifact folder → the token it was loaded under
        self._db_trained: dict = {}  # artifact folder → {param: trained weight (CPU)}
        self._db_base: dict = {}  # param → base weight (CPU), to restore exactly
        self._db_active: tuple = ()

    @property
    def native_size(self) -> int:
        """The model's training resolution (short side): UNet sample size × VAE factor (512 for SD v1.5)."""
        factor = 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        return int(self.comps.unet.config.sample_size) * factor

    def pipeline(self, kind: str = "img2img"):
        """A stock diffusers pipeline sharing this session's modules (built once per kind)."""
        if kind not in self._pipes:
            self._pipes[kind] = models.build_pipeline(self.comps, kind=kind)
        return self._pipes[kind]

    def add_pipeline(self, kind: str, pipe) -> None:
        """Register an extra pipeline (e.g. ControlNet img2img) that shares this session's modules."""
        pipe.set_progress_bar_config(disable=True)
        self._pipes[kind] = pipe

    def activate(self, specs: list[tuple[Style, float]]) -> None:
        """Make exactly these (style, scale) pairs active; everything else is switched off or restored."""
        for style, _ in specs:
            self.load(style)
        self._set_lora([(self._lora[s.folder], w) for s, w in specs if s.kind == "lora"])
        self._set_dreambooth(tuple((s.folder, float(w)) for s, w in specs if s.kind == "dreambooth"))

    def load(self, style: Style) -> None:
        """Load a style's weights into the base once (checked against this architecture first)."""
        if style.folder in self._lora or style.folder in self._tokens or style.folder in self._db_trained:
            return
        check_compatible(style, self.comps)
        with quiet_diffusers():
            if style.kind == "lora":
                self._load_lora(style)
            elif style.kind == "textual_inversion":
                self._load_ti(style)
            else:
                self._load_dreambooth(style)

    def token(self, style: Style) -> str:
        """The token a TI style was loaded under (its own, or an alias when another style already took it)."""
        return self._tokens.get(style.folder, style.manifest.token)

    # --- LoRA ---------------------------------------------------------------------------------------
    def _load_lora(self, style: Style) -> None:
        name = f"{re.sub(r'[^0-9A-Za-z_]', '_', style.name)}_{len(self._lora)}"  # unique, no dots (peft keys)
        try:
            with warnings.catch_warnings():  # peft warns on every second adapter; named adapters are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                artifacts.load_lora(self.pipeline("img2img"), style.folder, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load LoRA style {style.name} from {style.folder}: {_first_line(err)}") from err
        self._lora[style.folder] = name

    def _set_lora(self, weighted: list[tuple[str, float]]) -> None:
        pipe = self.pipeline("img2img")
        if not self._lora:
            return
        if not weighted:
            pipe.disable_lora()  # peft skips the LoRA branch: the base output, bit for bit
            return
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in weighted], adapter_weights=[float(w) for _, w in weighted])

    # --- Textual Inversion -----------------------------------------------------------------------------
    def _load_ti(self, style: Style) -> None:
        token = style.manifest.token
        if not token:
            raise UserError(f"{style.folder}: textual inversion manifest has no token")
        if token in self.comps.tokenizer.get_vocab():  # another style (or the vocabulary) has it: load an alias
            token = f"<{style.name}-{len(self._tokens)}>"
        try:
            artifacts.load_textual_inversion(self.pipeline("img2img"), style.folder, token=token)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load textual inversion {style.name}: {_first_line(err)}") from err
        self._tokens[style.folder] = token

    # --- DreamBooth --------------------------------------------------------------------------------------
    def _load_dreambooth(self, style: Style) -> None:
        self._set_dreambooth(())  # load against the base weights, so the returned originals are the base
        originals = artifacts.load_dreambooth(self.comps.unet, style.folder)
        params = artifacts.unet_parameters(self.comps.unet)  # works after LoRA wrapped the layers too
        trained = {key: params[key].detach().to("cpu", copy=True) for key in originals}
        for key, value in originals.items():
            self._db_base.setdefault(key, value.to("cpu"))
        artifacts.swap_weights(self.comps.unet, originals)  # back to the base until activated
        self._db_trained[style.folder] = trained

    def _set_dreambooth(self, active: tuple) -> None:
        """Weights = base + Σ scale·(trained − base); exactly the trained weights for one style at scale 1."""
        if active == self._db_active:
            return
        target = {k: self._db_base[k] for folder, _ in self._db_active for k in self._db_trained[folder]}
        if len(active) == 1 and active[0][1] == 1.0:
            target.update(self._db_trained[active[0][0]])
        elif active:
            for folder, scale in active:
                for key, w in self._db_trained[folder].items():
                    base = self._db_base[key].float()
                    target[key] = target.get(key, base).float() + scale * (w.float() - base)
        artifacts.swap_weights(self.comps.unet, target)
        self._db_active = active


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def get_session(model="stable-diffusion-v1-5/stable-diffusion-v1-5", *, device=None, dtype=None) -> Session:
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
