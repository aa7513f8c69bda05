"""One typed sampling request: every knob of stylize/generate, with its default written once.

`customgen.inference.stylize`/`generate`, the CLI (argument defaults), the demo (slider defaults), the
evaluation (`EvalConfig`) and training validation (`ValidationConfig`) all build a `Request`; none of them
repeats a default. `check()` validates every scalar before any model loads, with one-line errors and limits
that keep absurd values (a billion steps, a 100,000-px side, a 70-bit seed) from reaching the GPU.

This module is a leaf (no torch): the config and the CLI import it cheaply.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from customgen.errors import UserError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the Hub id (runwayml/... was deleted)
SCHEDULERS = ("dpm++", "ddim", "euler", "pndm", "ddpm", "lcm", "tcd")  # names customgen.inference.session builds
# Few-step schedulers pick their steps from a 50-step distillation schedule (LCMScheduler/TCDScheduler
# original_inference_steps): more steps than that is a ValueError in diffusers.
FEW_STEP_SCHEDULERS, FEW_STEP_MAX = ("lcm", "tcd"), 50
STYLE_IMAGE_MODES = ("auto", "ip-adapter", "nearest")
STRUCTURES = ("canny", "depth")
SIZE_MULTIPLE = 8  # the VAE downsamples by 8: working sizes are multiples of it
MAX_STEPS = 1000  # SD v1.5 was trained on 1000 timesteps: more inference steps than that mean nothing
MAX_SIDE = 2048  # working short side / width / height; 4× SD v1.5's native 512 (larger does not fit a T4)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_IMAGES = 16  # txt2img images per call; larger batches rarely fit a T4 at 512 px
MAX_SCALE = 10.0  # style / style-image / structure scales (1 is the trained strength)
MAX_GUIDANCE = 100.0  # classifier-free guidance (7.5 is usual; beyond ~30 images saturate)


@dataclass
class Request:
    """What to sample and how. Fields left at None take the documented default when resolved."""

    model: Any = DEFAULT_MODEL  # Hub id, local folder, .safetensors file, tiny, sd15-random (or a Session)
    steps: int = 25  # scheduler steps (img2img runs the last int(steps × strength) of them)
    guidance: float = 7.5  # classifier-free guidance scale
    scheduler: str = "dpm++"  # one of SCHEDULERS (DPM-Solver++ 2M by default)
    strength: float | None = None  # img2img denoising strength in [0, 1]; None: 0.6 (or from `stylization`)
    scales: Any = None  # style scale(s): one for all styles or one per style; None: 1.0
    stylization: float | None = None  # one knob s in [0, 1] instead of strength and scales (see stylization_knobs)
    seed: int | None = None  # None: a random seed, recorded in the output's metadata
    size: int | None = None  # working resolution, short side, multiple of 8; None: the model's own (512)
    prompt: str | None = None  # None: the styles' manifest prompts
    negative_prompt: str = ""
    mask: Any = None  # img2img: stylize only where this mask (path, PIL, array) is white
    feather: int | None = None  # mask edge blur radius in px; None: short side / 64
    style_image: Any = None  # take the style from this image (IP-Adapter or the nearest library style)
    style_image_mode: str = "auto"  # one of STYLE_IMAGE_MODES
    style_image_scale: float = 1.0
    structure: str | None = None  # ControlNet structure guidance: canny | depth
    structure_scale: float = 1.0
    controlnet: Any = None  # a local ControlNet for `structure` (diffusers folder or single file); None: the Hub's
    ip_adapter: Any = None  # a local ip-adapter_sd15 file (.safetensors/.bin) for the style image; None: the Hub's
    image_encoder: Any = None  # the IP-Adapter's CLIP image encoder folder; None: image_encoder/ beside the file
    num_images: int = 1  # txt2img batch
    batch: int = 1  # img2img: content images of one working size per pipeline call (faster on a GPU, more memory)
    width: int | None = None  # txt2img; None: `size` or the model's own
    height: int | None = None
    device: Any = None  # cuda, cuda:1, cpu; None: CUDA if present
    dtype: Any = None  # fp32 | fp16 | bf16; None: fp16 on T4, fp32 on CPU
    cap_gib: float | None = None  # plan batch and VAE slicing/tiling for this much GPU memory; None: the GPU in use

    def replace(self, **changes) -> "Request":
        """A copy with `changes` (unknown names are a TypeError, as for the constructor)."""
        return dataclasses.replace(self, **changes)

    def check(self) -> "Request":
        """Validate every scalar (one line each); returns self so calls chain."""
        _int_in("steps", self.steps, 1, MAX_STEPS)
        _float_in("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        if self.scheduler in FEW_STEP_SCHEDULERS and int(self.steps) > FEW_STEP_MAX:
            raise UserError(f"scheduler {self.scheduler} takes at most {FEW_STEP_MAX} steps (its distillation "
                            f"schedule), got {self.steps}; few-step LoRAs use 4 to 8")
        if self.strength is not None:
            _float_in("strength", self.strength, 0.0, 1.0)
        if self.stylization is not None:
            _float_in("stylization", self.stylization, 0.0, 1.0)
            if self.strength is not None or self.scales is not None:
                raise UserError("give either stylization or strength/style scales, not both")
        for s in scale_list(self.scales):
            _float_in("style scale", s, 0.0, MAX_SCALE)
        if self.seed is not None:
            _int_in("seed", self.seed, 0, MAX_SEED)
        for name in ("size", "width", "height"):
            value = getattr(self, name)
            if value is not None:
                _int_in(name, value, SIZE_MULTIPLE, MAX_SIDE)
                if value % SIZE_MULTIPLE:
                    raise UserError(f"{name} {value} must be a multiple of {SIZE_MULTIPLE}")
        if self.feather is not None:
            _int_in("feather", self.feather, 0, MAX_SIDE)
        _choice("style image mode", self.style_image_mode, STYLE_IMAGE_MODES)
        if self.structure is not None:
            _choice("structure", self.structure, STRUCTURES)
        _float_in("style image scale", self.style_image_scale, 0.0, MAX_SCALE)
        self._check_local_addons()
        _float_in("structure scale", self.structure_scale, 0.0, MAX_SCALE)
        _int_in("num_images", self.num_images, 1, MAX_IMAGES)
        _int_in("batch", self.batch, 1, MAX_IMAGES)
        if self.cap_gib is not None:
            _float_in("cap_gib", self.cap_gib, 0.01, 4096.0)
        return self

    def _check_local_addons(self) -> None:
        """Local ControlNet / IP-Adapter files only where they are used (the files are checked by the inference
        stack before the base model loads)."""
        if self.controlnet is not None and self.structure is None:
            raise UserError("a local ControlNet needs a structure (--structure canny|depth): the conditioning image "
                            "it was trained on")
        if self.ip_adapter is not None and (self.style_image is None or self.style_image_mode == "nearest"):
            raise UserError("a local IP-Adapter needs a style image (--style-image) and style image mode auto or "
                            "ip-adapter")
        if self.image_encoder is not None and self.ip_adapter is None:
            raise UserError("an image encoder folder is used only with a local IP-Adapter (--ip-adapter)")

    def knobs(self) -> tuple[float, Any]:
        """(strength, scales) from the explicit values or the `stylization` knob."""
        if self.stylization is not None:
            return stylization_knobs(self.stylization)
        return (0.6 if self.strength is None else float(self.strength)), self.scales

    def resolved(self) -> "Request":
        """Checked, with strength/scales from the knob and a concrete seed (img2img)."""
        self.check()
        strength, scales = self.knobs()
        if int(int(self.steps) * strength) < 1:
            raise UserError(f"strength {strength} × {self.steps} steps runs no denoising step: raise strength or steps")
        return self.replace(strength=strength, scales=scales, stylization=None, steps=int(self.steps),
                            guidance=float(self.guidance), seed=random_seed() if self.seed is None else int(self.seed))


DEFAULTS = Request()  # read defaults from here: DEFAULTS.steps, DEFAULTS.guidance, ...
DEFAULT_STRENGTH = DEFAULTS.knobs()[0]  # 0.6 (= stylization 2/3)
DEFAULT_SCALE = 1.0


STYLIZATION_FLOOR, STYLIZATION_SPAN = 0.2, 0.6  # the knob's strength range: 0.2 + 0.6·s


def stylization_knobs(s: float) -> tuple[float, float]:
    """One knob s in [0, 1] → (strength, scale) = (0.2 + 0.6·s, min(1, 2·s)): the style fades in first, then
    denoising grows so it can reshape the image. s = 0 is plain img2img at strength 0.2 with the style off."""
    _float_in("stylization", s, 0.0, 1.0)
    return round(STYLIZATION_FLOOR + STYLIZATION_SPAN * s, 6), round(min(1.0, 2.0 * s), 6)


DEFAULT_STYLIZATION = (DEFAULT_STRENGTH - STYLIZATION_FLOOR) / STYLIZATION_SPAN  # 2/3: the default strength, scale 1


def scale_list(scales) -> list:
    """None, one scale or several → a list of scales (empty for None)."""
    if scales is None:
        return []
    return [scales] if isinstance(scales, (int, float)) else list(scales)


def random_seed() -> int:
    """A fresh seed (recorded in the output's metadata, so the image can be reproduced)."""
    return random.SystemRandom().randrange(2**32)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return value


def _float_in(name: str, value, lo: float, hi: float) -> None:
    v = _number(name, value)
    if not lo <= v <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value}")


def _int_in(name: str, value, lo: int, hi: int) -> None:
    v = _number(name, value)
    if v != int(v):
        raise UserError(f"{name} must be a whole number, got {value}")
    if not lo <= int(v) <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {value}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
