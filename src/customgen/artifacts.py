"""Artifacts: one folder per trained style/subject, in formats stock tools load.

    <artifact>/style.json                          manifest (method, base model, token, rank, ...)
    <artifact>/config.yaml                         the resolved training config
    <artifact>/pytorch_lora_weights.safetensors    LoRA, diffusers format: pipe.load_lora_weights(folder)
    <artifact>/lora_kohya.safetensors              LoRA, kohya keys (lora_unet_..., .alpha): A1111 / ComfyUI
    <artifact>/learned_embeds.safetensors          Textual Inversion: pipe.load_textual_inversion(file, token=...)
    <artifact>/dreambooth_unet.safetensors         DreamBooth: the trained UNet parameters (diffusers names)
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customgen.errors import UserError

MANIFEST = "style.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
TI_WEIGHTS = "learned_embeds.safetensors"
DREAMBOOTH_WEIGHTS = "dreambooth_unet.safetensors"
WEIGHTS = {"lora": LORA_WEIGHTS, "textual_inversion": TI_WEIGHTS, "dreambooth": DREAMBOOTH_WEIGHTS}


@dataclasses.dataclass
class Manifest:
    """style.json: what an artifact is and how it was made."""

    name: str
    method: str  # lora_style | dreambooth_style | textual_inversion | dreambooth_lora_subject | lora_anime_kohya
    kind: str  # lora | dreambooth | textual_inversion: how it is loaded
    base_model: str  # the model reference it was trained on
    weights: str  # file name inside the folder
    prompt: str = ""  # default prompt at inference ("" for prompt-free LoRA styles)
    token: str = ""  # trigger / placeholder token, if any
    class_prompt: str = ""  # prior-preservation class prompt, if any
    rank: int | None = None
    alpha: float | None = None
    scope: str | None = None  # DreamBooth: attention | cross_attention | full
    text_encoder: bool = False  # LoRA also trained the text encoder
    resolution: int = 512
    steps: int = 0
    trainable_params: int = 0
    file_bytes: int = 0
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0
    config_hash: str = ""
    versions: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    format_version: int = 1


def package_versions() -> dict:
    """Versions that matter for reloading an artifact."""
    import diffusers
    import peft
    import transformers

    import customgen

    return {"customgen": customgen.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


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
    """Read an artifact's style.json (one-line errors for missing or corrupt manifests)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a customgen artifact (no {MANIFEST} inside)")
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(Manifest)}
        manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path} is corrupt: {err}") from err
    if manifest.kind not in WEIGHTS:
        raise UserError(f"{path}: unknown artifact kind {manifest.kind!r}; expected one of {', '.join(WEIGHTS)}")
    if not (Path(folder) / manifest.weights).is_file():
        raise UserError(f"{folder}: weights file {manifest.weights} is missing")
    return manifest


# --- LoRA ---------------------------------------------------------------------------------------

def _peft_state(model, adapter_name: str) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def save_lora(folder: str | Path, unet, text_encoder=None, *, adapter_name: str = "default") -> None:
    """Save LoRA weights in diffusers format (with rank/alpha metadata) plus a kohya export."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_state = _peft_state(unet, adapter_name)
    te_state = _peft_state(text_encoder, adapter_name) if text_encoder is not None else None
    meta = lambda m: m.peft_config[adapter_name].to_dict()  # noqa: E731 - rank/alpha survive reload
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_state) if te_state else None,
        weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=meta(unet),
        text_encoder_lora_adapter_metadata=meta(text_encoder) if te_state else None,
    )
    save_kohya(Path(folder) / KOHYA_WEIGHTS, unet_state, te_state, alpha=unet.peft_config[adapter_name].lora_alpha)


def save_kohya(path: Path, unet_state: dict, te_state: dict | None, *, alpha: float) -> None:
    """kohya/WebUI LoRA (lora_unet_... keys, one .alpha per module) via diffusers' converter."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{k}": v for k, v in unet_state.items()}
    prefixed |= {f"text_encoder.{k}": v for k, v in (te_state or {}).items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    for key in kohya:
        if key.endswith(".alpha"):  # the converter writes alpha = rank (scale 1); keep the trained scale
            kohya[key] = torch.tensor(float(alpha))
    rank = next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    save_file(kohya, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                          "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"})


def load_lora(pipe, folder: str | Path, *, adapter_name: str) -> None:
    """Load a LoRA artifact into a pipeline under `adapter_name` (stock diffusers loader)."""
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=adapter_name)


# --- Textual Inversion --------------------------------------------------------------------------

def save_textual_inversion(folder: str | Path, text_encoder, token_ids: list[int], *, token: str) -> None:
    """Save the learned vectors as {token: (n_vectors, dim)}, the format load_textual_inversion reads."""
    weight = text_encoder.get_input_embeddings().weight
    embeds = weight[token_ids].detach().float().cpu().contiguous()
    save_file({token: embeds}, str(Path(folder) / TI_WEIGHTS))


def load_textual_inversion(pipe, folder: str | Path, *, token: str) -> None:
    """Load a TI artifact (stock loader; several vectors become token, token_1, ...)."""
    pipe.load_textual_inversion(str(Path(folder) / TI_WEIGHTS), token=token)


# --- DreamBooth ---------------------------------------------------------------------------------

def save_dreambooth(folder: str | Path, unet, names: list[str], *, scope: str) -> None:
    """Save only the trained UNet parameters, under their diffusers names."""
    params = dict(unet.named_parameters())
    state = {n: params[n].detach().float().cpu().contiguous() for n in names}
    save_file(state, str(Path(folder) / DREAMBOOTH_WEIGHTS), metadata={"format": "customgen-dreambooth", "scope": scope})


def load_dreambooth(unet, folder: str | Path) -> dict:
    """Swap DreamBooth weights into `unet` with key and shape checks; returns the originals to restore."""
    path = Path(folder) / DREAMBOOTH_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file: {err}") from err
    own = unet_parameters(unet)
    for key, value in state.items():
        if key not in own:
            raise UserError(f"{path}: key {key} is not in this UNet (was it trained on another base model?)")
        if own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, this UNet has {tuple(own[key].shape)}")
    originals = {k: own[k].detach().clone() for k in state}
    swap_weights(unet, state)
    return originals


def swap_weights(unet, state: dict) -> None:
    """Copy `state` into `unet`'s parameters in place (dtype/device of the UNet)."""
    params = unet_parameters(unet)
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


def unet_parameters(unet) -> dict:
    """Parameters by diffusers name, also for layers peft wrapped for LoRA (`x.base_layer.weight` as `x.weight`)."""
    params = dict(unet.named_parameters())
    return params | {k.replace(".base_layer.", "."): v for k, v in params.items() if ".base_layer." in k}
