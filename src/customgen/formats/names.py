"""SD v1 layer names, and the names the community's files give them.

kohya's sd-scripts, LyCORIS, the WebUI and ComfyUI name a layer by its module path with every `.` turned into `_`,
behind `lora_unet_` (diffusers' UNet names; older files use the original LDM names, `input_blocks_1_1_...`) or
`lora_te_` (the CLIP text encoder with its `text_model.` level). As `_` also occurs inside names (`down_blocks`,
`to_q`), the path cannot be split back: like those tools, customgen builds the table from the model's own module
tree (here SD v1.5's, from the configs shipped in the package, on the meta device) and looks names up in it.
"""
from __future__ import annotations

import functools

import torch

from customgen.models.builders import build_reserved
from customgen.models.ldm import unet_to_ldm

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def layer_paths(model, component: str) -> dict[str, torch.nn.Module]:
    """Canonical module path → Linear/Conv2d layer of a UNet or text encoder (text-encoder paths with the
    `text_model.` level whatever transformers is installed; layers peft wrapped are seen through)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LAYERS) or ".base_layer" in name or ".lora_" in name:
            continue
        if component == "text_encoder" and not name.startswith("text_model."):
            name = f"text_model.{name}"
        out[name] = module
    for name, module in model.named_modules():  # a peft-wrapped layer: its path names the wrapper
        if name.endswith(".base_layer") and isinstance(module, LAYERS):
            path = name[: -len(".base_layer")]
            out[f"text_model.{path}" if component == "text_encoder" and not path.startswith("text_model.") else path] \
                = module
    return out


@functools.cache
def sd1_layers() -> dict[str, dict[str, tuple]]:
    """component → canonical path → (in, out, kernel size) of every Linear/Conv2d of SD v1.5 (meta device)."""
    comps = build_reserved("sd15-random", meta=True)
    return {c: {p: _shape_of(m) for p, m in layer_paths(getattr(comps, c), c).items()} for c in COMPONENTS}


@functools.cache
def sd1_unet_config() -> dict:
    return dict(build_reserved("sd15-random", meta=True).unet.config)


def _shape_of(layer) -> tuple:
    if isinstance(layer, torch.nn.Linear):
        return (layer.in_features, layer.out_features, ())
    return (layer.in_channels, layer.out_channels, tuple(layer.kernel_size))


def kohya_name(component: str, path: str) -> str:
    """The kohya/WebUI name of a layer: `lora_unet_down_blocks_0_...`, `lora_te_text_model_encoder_...`."""
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def ldm_path(path: str, config: dict) -> str:
    """The original (LDM) module path of a diffusers UNet layer: `input_blocks.1.1.proj_in`."""
    key = next(iter(unet_to_ldm({f"{path}.weight": None}, config)))
    return key[len("model.diffusion_model."):-len(".weight")]


@functools.cache
def kohya_table() -> dict[str, tuple[str, str]]:
    """kohya name → (component, canonical path) for every SD v1.5 layer, LDM-named UNet forms included (what
    ComfyUI maps too). `lora_te1_` (SDXL's first text encoder, which diffusers' converter also writes for SD1) is
    not an SD1 name: kohya, the WebUI and ComfyUI ignore it there, and so does customgen, with a warning."""
    table, config = {}, sd1_unet_config()
    for component, layers in sd1_layers().items():
        for path in layers:
            table[kohya_name(component, path)] = (component, path)
            if component == "unet":
                table["lora_unet_" + ldm_path(path, config).replace(".", "_")] = (component, path)
    return table
