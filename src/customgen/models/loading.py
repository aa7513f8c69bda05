"""Model references → SD v1.5 components: a Hub id, a local diffusers folder, a single file, or a
reserved reference (`tiny`, `sd15-random`). The safety checker is never loaded (its false-positive
black images poison metrics)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as dlog
from huggingface_hub import snapshot_download
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as tlog

from customgen.errors import Notice, UserError
from customgen.memory import probe
from customgen.models.builders import CONFIGS, RESERVED, Components, build_reserved
from customgen.models.tokenizer import save_tokenizer, sd15_tokenizer, tiny_tokenizer
from customgen.network import hub_reachable
from customgen.request import DEFAULT_MODEL

ALIASES = {"runwayml/stable-diffusion-v1-5": DEFAULT_MODEL}  # deleted from the Hub in 2024
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json")
UNREACHABLE = (
    "cannot load {ref!r}: its weights are not on this machine and the Hub cannot be reached. "
    "On Kaggle turn on Internet in the notebook settings, or attach the model as an input and pass "
    "its path (e.g. --model /kaggle/input/...); or pass a local diffusers folder or a .safetensors file"
)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: `kind` is tiny | sd15-random | hub | local | single-file."""

    kind: str
    value: str


def resolve_ref(ref: str | Path) -> ModelRef:
    """Classify a model reference (one-line warning for the deleted runwayml id)."""
    ref = str(ref).strip()
    if ref in RESERVED:
        return ModelRef(ref, ref)
    if ref in ALIASES:
        warnings.warn(f"{ref} was deleted from the Hub; using {ALIASES[ref]}", Notice, stacklevel=2)
        return ModelRef("hub", ALIASES[ref])
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError(f"{ref} is not a diffusers model folder (no model_index.json or unet/ inside)")
        return ModelRef("local", str(path))
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise UserError(f"model file {ref} does not exist")
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{ref}: single-file checkpoints must be .safetensors or .ckpt")
        return ModelRef("single-file", str(path))
    if ref.startswith(("/", ".", "~")) or ref.count("/") != 1:
        raise UserError(f"model {ref!r} is neither a folder, a .safetensors/.ckpt file, a Hub id (owner/name) nor one of: tiny, sd15-random")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        raise UserError(f"{ref!r} is not a valid Hub id (owner/name)")
    return ModelRef("hub", ref)


def hub_cached(repo_id: str) -> bool:
    """Whether a snapshot of `repo_id` is in the local Hugging Face cache."""
    try:
        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return False


def preflight(ref: ModelRef) -> dict:
    """Fail fast with one line when a Hub id is neither cached nor reachable (no retries, no traceback)."""
    if ref.kind != "hub":
        return {}
    if hub_cached(ref.value):
        return {"local_files_only": not hub_reachable()}
    if not hub_reachable():
        raise UserError(UNREACHABLE.format(ref=ref.value))
    return {}


def _is_unreachable(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    keys = ("not fully cached", "offline", "connect", "cannot find an appropriate cached", "localentrynotfound",
            "name or service not known", "max retries", "timed out", "cannot reach")
    return any(k in text for k in keys)


@contextmanager
def _loading_errors(ref: str):
    """Turn the loaders' network/cache errors into one actionable line; their logs and bars stay quiet meanwhile."""
    try:
        with quiet_loading():
            yield
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        if _is_unreachable(err):
            raise UserError(UNREACHABLE.format(ref=ref)) from err
        refused = _refused_pickle(err)
        if refused:
            raise UserError(f"cannot load model {ref!r}: {refused}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {ref!r}: {first[:300]}") from err


def _refused_pickle(err: BaseException) -> str | None:
    """When torch's weights-only unpickler refused a pickled weights file somewhere in `err`'s chain: one clause
    naming the file and what to do; else None."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(isinstance(e, pickle.UnpicklingError) for e in chain):
        return None
    names = re.findall(r"'([^']+\.(?:bin|ckpt|pt|pth))'", " ".join(str(e) for e in chain))
    what = names[0] if names else "a pickled weights file"
    return (f"{what} is a pickle that torch's safe loader refuses (it would run code); customgen never runs pickled "
            "code: use the model's .safetensors weights")


def _quiet_hub_logs():
    """diffusers/transformers log multi-line hub warnings before raising; the CLI wants one line."""
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


@contextmanager
def quiet_loading():
    """diffusers/transformers log multi-line errors (e.g. a missing .safetensors before falling back to .bin) and
    draw component bars while loading; the CLI's one line says what matters. Restored afterwards."""
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity(dlog.CRITICAL)
    tlog.set_verbosity(tlog.CRITICAL)
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _from_pipeline(pipe, ref: ModelRef) -> Components:
    return Components(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        scheduler=pipe.scheduler, ref=ref.value, kind=ref.kind,
    )


def load_pretrained(ref: ModelRef, dtype) -> Components:
    """Load a Hub id, local folder or single file through diffusers' stock loaders."""
    _quiet_hub_logs()
    common = dict(safety_checker=None, requires_safety_checker=False, dtype=dtype, **preflight(ref))
    with _loading_errors(ref.value):
        if ref.kind == "single-file":
            pipe = StableDiffusionPipeline.from_single_file(ref.value, config=str(sd15_config_dir()), **common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(ref.value, **common)
    return _from_pipeline(pipe, ref)


def load_pretrained_meta(ref: ModelRef) -> Components:
    """Architecture only (meta device, no weights): configs and tokenizer of a Hub id, folder or file."""
    _quiet_hub_logs()
    root = str(sd15_config_dir()) if ref.kind == "single-file" else ref.value
    if ref.kind == "hub":
        preflight(ref)
    with _loading_errors(ref.value):
        unet_cfg = UNet2DConditionModel.load_config(root, subfolder="unet")
        vae_cfg = AutoencoderKL.load_config(root, subfolder="vae")
        te_cfg = CLIPTextConfig.from_pretrained(root, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        sched_cfg = DDPMScheduler.load_config(root, subfolder="scheduler")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(te_cfg)
    sched = DDPMScheduler.from_config(sched_cfg)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=sched,
                      scheduler=sched, ref=ref.value, kind=ref.kind)


def load_tokenizer(ref: str | Path = DEFAULT_MODEL) -> CLIPTokenizer:
    """A reference's tokenizer alone, no weight: tiny's, SD v1.5's (sd15-random, SD v1.5's Hub id, single files: what
    from_single_file reads them with), else the tokenizer of the folder or the Hub model."""
    parsed = resolve_ref(ref)
    if parsed.kind in RESERVED:
        return tiny_tokenizer(RESERVED["tiny"] / "tokenizer") if parsed.kind == "tiny" else sd15_tokenizer()
    if parsed.kind == "single-file" or parsed.value == DEFAULT_MODEL:
        return sd15_tokenizer()
    with _loading_errors(parsed.value):
        return CLIPTokenizer.from_pretrained(parsed.value, subfolder="tokenizer", **preflight(parsed))


def sd15_config_dir() -> Path:
    """A weightless diffusers folder for SD v1.5 (configs + tokenizer) so single files load offline."""
    return config_dir("sd15")


def config_dir(name: str) -> Path:
    """A weightless diffusers folder (configs + tokenizer + model_index.json) for the shipped configs `name`
    (sd15 | tiny): what `from_single_file(..., config=)` needs to read a single file offline."""
    out = Path.home() / ".cache" / "customgen" / f"{name}-config"
    # Complete = the index and the tokenizer files both transformers 4 and 5 read: the cache is shared by every
    # venv of the machine, and a folder saved by transformers 5 alone (tokenizer.json) fails under 4.
    complete = lambda d: all((d / f).is_file() for f in ("model_index.json", *TOKENIZER_FILES))  # noqa: E731
    if complete(out):
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(CONFIGS / name, tmp)
    if not (tmp / "tokenizer").is_dir():
        save_tokenizer(sd15_tokenizer(), tmp / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if out.exists() and not complete(out):
        shutil.rmtree(out, ignore_errors=True)  # a folder left by an older version or a crash
    try:
        tmp.rename(out)  # atomic: a half-written folder is never taken for a complete one
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def place(module, device, dtype) -> None:
    """module.to(device) and, only if it differs, .to(dtype) (diffusers warns on any dtype-carrying .to())."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype)


SD15_REFS = (DEFAULT_MODEL, "sd15-random")  # references whose architecture is the shipped SD v1.5 configs


def load_architecture(ref: str | Path) -> Components:
    """The model's architecture without weights (meta tensors) for a plan: the shipped configs for SD v1.5's Hub id,
    `sd15-random` and `tiny` (no network, nothing downloaded), the configs of a folder, file or cached Hub model
    otherwise."""
    parsed = resolve_ref(ref)
    if parsed.kind in ("tiny", "sd15-random") or parsed.value in SD15_REFS:
        return build_reserved("tiny" if parsed.kind == "tiny" else "sd15-random", meta=True)
    return load_components(ref, meta=True)


def load_components(ref: str | Path = DEFAULT_MODEL, *, dtype=None, device=None, meta: bool = False) -> Components:
    """Model reference → `Components` on `device` in `dtype` (defaults from the GPU probe)."""
    parsed = resolve_ref(ref)
    info = probe(device, dtype) if not meta else None
    if parsed.kind in RESERVED:
        comps = build_reserved(parsed.kind, meta=meta)
    elif meta:
        comps = load_pretrained_meta(parsed)
    else:
        comps = load_pretrained(parsed, info.dtype if info else None)
    if info is not None:
        for m in (comps.unet, comps.vae, comps.text_encoder):
            place(m, info.device, info.dtype)
    return comps
