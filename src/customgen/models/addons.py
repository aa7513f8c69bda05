"""ControlNet and IP-Adapter weights from local files (Kaggle inputs with Internet off): checked against the base
model's family before it loads, then loaded through diffusers' and transformers' own loaders.

    net = controlnet_file("control_v11p_sd15_canny.pth", "sd15")      # checks keys and shapes; loads nothing big
    load_controlnet_file(net)                                         # ControlNetModel.from_single_file
    ip = ip_adapter_file("models/ip-adapter_sd15.safetensors", None, "sd15")   # + models/image_encoder/
    state, encoder, processor = load_ip_adapter_file(ip)              # for pipe.load_ip_adapter(state, ...)

A ControlNet is a diffusers folder (config.json + diffusion_pytorch_model.*, as `save_pretrained` writes it) or an
original single file (lllyasviel's `control_model.*` keys, .pth or .safetensors), which `from_single_file` reads
with the ControlNet config shipped for the family (configs/<family>/controlnet: SD v1.5's is the architecture of
lllyasviel/control_v11p_sd15_canny), so no Hub access happens. An IP-Adapter is h94's ip-adapter_sd15 layout
(`image_proj.proj/norm` + `ip_adapter.N.to_k_ip/to_v_ip`, N = 1, 3, 5, ... over the cross-attention layers) as
.safetensors or .bin, with its CLIP image encoder folder (config.json + weights; by default `image_encoder/` beside
the file, h94's `models/` layout). Pickled weights are read only by torch's weights-only unpickler (weightfile).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from customgen.errors import UserError
from customgen.models.footprint import Addons
from customgen.models.builders import CONFIGS
from customgen.models.weightfile import (PICKLES, SAFETENSORS, check_width, existing, family_config, read_weights,
                                         tensor_shapes)

CONTROLNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# What must agree between a ControlNet and the UNet it feeds (its residuals are added to the UNet's down blocks).
STRUCTURE_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
IMAGE_PROJ = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}  # ip-adapter_sd15's ImageProjection
SHOWN = 3  # tensor names quoted in a message


@dataclass(frozen=True)
class ControlNetFile:
    """A checked local ControlNet: the path, its layout and the config folder it loads with."""

    path: Path
    layout: str  # folder | single-file
    config: Path  # the folder itself, or the family's shipped ControlNet config folder

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class IPAdapterFile:
    """A checked local IP-Adapter: the weights file and its image-encoder folder."""

    path: Path
    encoder: Path

    def __str__(self) -> str:
        return str(self.path)


def _first(names) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _suffix(path: Path, what: str, accepted: tuple) -> None:
    if path.suffix.lower() not in accepted:
        raise UserError(f"{path}: {what} must be {' or '.join(accepted)}, got {path.suffix or 'no suffix'!r}")


def _pickles_checked(folder: Path, names: tuple) -> list[str]:
    """The weight files present in `folder` (of `names`); pickled ones are read once through the weights-only
    unpickler first, so a refused file stops here, not inside a library's loader."""
    present = [n for n in names if (folder / n).is_file()]
    if present and not present[0].endswith(SAFETENSORS):
        read_weights(folder / present[0])
    return present


# --- ControlNet ---------------------------------------------------------------------------------------------------
def signature(path: Path) -> tuple:
    """What a check's result depends on: the file's (or the folder's files') names, sizes and modification times."""
    entries = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.is_file())


def controlnet_file(path, fam: str) -> ControlNetFile:
    """Check a local ControlNet (folder or single file) for family `fam` before any model loads (remembered while
    the file is unchanged: an evaluation stylizes many images with it)."""
    p = existing(path, "ControlNet")
    return _controlnet_checked(p, fam, signature(p))


@functools.lru_cache(maxsize=32)
def _controlnet_checked(p: Path, fam: str, _signature: tuple) -> ControlNetFile:
    if p.is_dir():
        return _controlnet_folder(p, fam)
    _suffix(p, "a ControlNet file", (SAFETENSORS, *PICKLES))
    shapes = tensor_shapes(p)
    widths = {s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    if not widths:
        raise UserError(f"{p} is not a ControlNet (no cross-attention weights such as "
                        "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight)")
    for width in widths:
        check_width(p, "a ControlNet", width, fam)
    config = CONFIGS / fam / "controlnet"
    _compare(p, _converted_shapes(shapes, fam), _controlnet_shapes(fam))
    return ControlNetFile(p, "single-file", config)


def _controlnet_folder(folder: Path, fam: str) -> ControlNetFile:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} is not a diffusers ControlNet folder (no config.json); pass the folder "
                        "save_pretrained wrote, or a single .safetensors/.pth file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{cfg_path} is not readable JSON ({err})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "ControlNetModel":
        found = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{cfg_path} describes a {found}, not a ControlNetModel")
    check_width(folder, "a ControlNet", int(cfg.get("cross_attention_dim") or 0), fam)
    want = family_config(fam, "controlnet")
    for key in STRUCTURE_KEYS:
        if key in cfg and cfg[key] != want[key]:
            raise UserError(f"{folder}: its {key} is {cfg[key]}, the base model's UNet needs {want[key]}: a "
                            "ControlNet for another architecture")
    if not _pickles_checked(folder, CONTROLNET_WEIGHTS):
        raise UserError(f"{folder} holds no ControlNet weights (one of {', '.join(CONTROLNET_WEIGHTS)})")
    return ControlNetFile(folder, "folder", folder)


@functools.lru_cache(maxsize=None)
def _controlnet_shapes(fam: str) -> dict[str, tuple]:
    """name → shape of the family's ControlNet (built on the meta device from the shipped config)."""
    with torch.device("meta"):
        net = ControlNetModel.from_config(family_config(fam, "controlnet"))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _converted_shapes(shapes: dict, fam: str) -> dict[str, tuple | None]:
    """The file's tensors under diffusers' names, renamed by diffusers' own single-file converter (meta tensors:
    no values are read)."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = convert_controlnet_checkpoint(meta, dict(family_config(fam, "controlnet")))
    return {k: None if v is None else tuple(v.shape) for k, v in converted.items()}


def _compare(path: Path, have: dict, want: dict) -> None:
    """One line for missing tensors or wrong shapes."""
    missing = [k for k in want if have.get(k) is None]
    if len(missing) == len(want):
        raise UserError(f"{path} is not an original-layout ControlNet: none of its tensors is a ControlNet's "
                        "(control_model.* or diffusers names expected)")
    if missing:
        raise UserError(f"{path} lacks {len(missing)} of the ControlNet's {len(want)} tensors ({_first(missing)}): "
                        "a truncated file or another kind of model")
    wrong = [k for k in want if have[k] != want[k]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: tensor {k} has shape {list(have[k])}, this model's ControlNet needs {list(want[k])} "
                        f"({len(wrong)} tensors differ): a ControlNet for another architecture")


def load_controlnet_file(source: ControlNetFile) -> ControlNetModel:
    """The checked ControlNet, in fp32 on the CPU: `from_pretrained` for a folder, `from_single_file` with the
    shipped config for a single file (its weights read here, weights-only)."""
    if source.layout == "folder":
        present = _pickles_checked(source.path, CONTROLNET_WEIGHTS)
        variant = {"variant": "fp16"} if ".fp16." in present[0] else {}
        return ControlNetModel.from_pretrained(str(source.path), **variant).eval()
    return ControlNetModel.from_single_file(read_weights(source.path), config=str(source.config)).eval()


# --- IP-Adapter ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def ip_adapter_shapes(fam: str) -> dict[str, tuple]:
    """`N.to_k_ip.weight` / `N.to_v_ip.weight` → shape for the family's UNet: N = 1, 3, 5, ... over its
    cross-attention layers in diffusers' processor order (how h94's files and diffusers' loader number them); each is
    the shape of the layer's own to_k (hidden width × text width)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(family_config(fam, "unet"))
    cross = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    out = {}
    for i, name in enumerate(cross):
        shape = tuple(unet.get_submodule(name).to_k.weight.shape)
        out[f"{2 * i + 1}.to_k_ip.weight"] = out[f"{2 * i + 1}.to_v_ip.weight"] = shape
    return out


def ip_adapter_file(path, encoder, fam: str) -> IPAdapterFile:
    """Check a local ip-adapter_sd15 file and its image-encoder folder for family `fam` before any model loads
    (remembered while both are unchanged)."""
    p = existing(path, "IP-Adapter")
    folder = Path(str(encoder)).expanduser() if encoder is not None else p.parent / "image_encoder"
    return _ip_adapter_checked(p, encoder, fam, signature(p) + (signature(folder) if folder.is_dir() else ()))


@functools.lru_cache(maxsize=32)
def _ip_adapter_checked(p: Path, encoder, fam: str, _signature: tuple) -> IPAdapterFile:
    if p.is_dir():
        raise UserError(f"{p} is a folder: pass the IP-Adapter file itself (e.g. models/ip-adapter_sd15.safetensors)")
    _suffix(p, "an IP-Adapter file", (SAFETENSORS, *PICKLES))
    shapes = tensor_shapes(p)
    proj = {k[len("image_proj."):]: s for k, s in shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: s for k, s in shapes.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise UserError(f"{p} is not an IP-Adapter (it needs image_proj.* and ip_adapter.* tensors)")
    if set(proj) != IMAGE_PROJ:
        raise UserError(f"{p}: its image projection ({_first(proj)}) is not ip-adapter_sd15's (proj + norm); the plus, "
                        "full-face and FaceID variants are not supported")
    first = ip.get("1.to_k_ip.weight")
    if first is None or len(first) != 2:
        raise UserError(f"{p} has no ip_adapter.1.to_k_ip.weight (h94's layout numbers the layers 1, 3, 5, ...)")
    check_width(p, "an IP-Adapter", first[1], fam)
    _compare_ip(p, ip, proj, fam)
    folder = _encoder_folder(p, encoder, proj["proj.weight"][1])
    return IPAdapterFile(p, folder)


def _compare_ip(path: Path, ip: dict, proj: dict, fam: str) -> None:
    want = ip_adapter_shapes(fam)
    missing, extra = sorted(set(want) - set(ip)), sorted(set(ip) - set(want))
    if missing or extra:
        raise UserError(f"{path}: its ip_adapter layers do not match this model's {len(want) // 2} cross-attention "
                        f"layers (" + (f"missing {_first(missing)}" if missing else f"unknown {_first(extra)}") + ")")
    wrong = [k for k in want if ip[k] != want[k]]
    if wrong:
        raise UserError(f"{path}: ip_adapter.{wrong[0]} has shape {list(ip[wrong[0]])}, this model needs "
                        f"{list(want[wrong[0]])}: an IP-Adapter for another architecture")
    width = want["1.to_k_ip.weight"][1]
    if proj["norm.weight"] != (width,) or len(proj["proj.weight"]) != 2 or proj["proj.weight"][0] % width:
        raise UserError(f"{path}: image_proj shapes {list(proj['proj.weight'])} / {list(proj['norm.weight'])} do not "
                        f"project to this model's text width {width}")


def _encoder_folder(path: Path, encoder, embed: int) -> Path:
    """The image encoder's folder (given, or `image_encoder/` beside the file), checked: a CLIP vision config whose
    projection width is the adapter's input width, and weights."""
    folder = Path(str(encoder)).expanduser() if encoder is not None else path.parent / "image_encoder"
    if not folder.is_dir():
        how = "" if encoder is not None else f" (looked for image_encoder/ beside {path.name}; pass its folder)"
        raise UserError(f"IP-Adapter image encoder folder {folder} does not exist{how}")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} has no readable config.json ({type(err).__name__}): pass the image encoder folder "
                        "(h94/IP-Adapter: models/image_encoder)") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "clip_vision_model":
        raise UserError(f"{folder}/config.json is not a CLIP vision encoder's (model_type clip_vision_model)")
    if cfg.get("projection_dim") != embed:
        raise UserError(f"{folder}: the encoder projects to {cfg.get('projection_dim')} values, the IP-Adapter takes "
                        f"{embed}: use the encoder the adapter was trained with")
    if not _pickles_checked(folder, ENCODER_WEIGHTS):
        raise UserError(f"{folder} holds no encoder weights ({' or '.join(ENCODER_WEIGHTS)})")
    return folder


def load_ip_adapter_file(source: IPAdapterFile) -> tuple[dict, object, object]:
    """(state dict as `load_ip_adapter` takes it, CLIP vision encoder, the processor diffusers makes by default for
    that encoder), in fp32 on the CPU."""
    flat = read_weights(source.path)
    state = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
             for part in ("image_proj", "ip_adapter")}
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(source.encoder)).eval()
    size = encoder.config.image_size
    return state, encoder, CLIPImageProcessor(size=size, crop_size=size)


# --- shapes alone (customgen plan) ----------------------------------------------------------------------------------
def planned_addons(controlnet: ControlNetFile | None, ip_adapter: IPAdapterFile | None) -> Addons | None:
    """The add-ons of a call by shape, from checked files without loading their weights (the ControlNet's config;
    the IP-Adapter's tensor shapes and its encoder's config): what `customgen plan --sample` predicts with."""
    if controlnet is None and ip_adapter is None:
        return None
    net = ip = None
    if controlnet is not None:
        net = json.dumps(ControlNetModel.load_config(str(controlnet.config)), sort_keys=True, default=str)
    if ip_adapter is not None:
        state: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        for name, shape in tensor_shapes(ip_adapter.path).items():
            part, _, key = name.partition(".")
            if part in state:
                state[part][key] = list(shape)
        encoder = CLIPVisionConfig.from_pretrained(str(ip_adapter.encoder)).to_dict()
        ip = json.dumps({"encoder": encoder, "state": state}, sort_keys=True, default=str)
    return Addons(net, ip)
