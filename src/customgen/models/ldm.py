"""diffusers → original Stable Diffusion (LDM) checkpoint layout, for single-file exports that AUTOMATIC1111,
ComfyUI and diffusers' `from_single_file` load.

Written by hand: diffusers ships only the other direction (`loaders/single_file_utils.py` reads LDM files);
its reverse lives in an example script, not in the package. The mapping is derived from a model's config
(levels, layers per block, which blocks have attention), so it serves SD v1.5 and the `tiny` test model alike;
tests load every exported file back through diffusers' own LDM reader and compare pixels.

    model.diffusion_model.*                UNet: input_blocks / middle_block / output_blocks
    first_stage_model.*                    VAE: encoder.down.N.block / decoder.up.N.block / mid.attn_1
    cond_stage_model.transformer.text_model.*   CLIP text encoder (with `text_model.` whatever transformers says)
"""
from __future__ import annotations

import re

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def unet_prefixes(config) -> dict[str, str]:
    """diffusers UNet module prefix → LDM prefix, from the config's block layout."""
    levels, n = len(config["down_block_types"]), config["layers_per_block"]
    out = {}
    for i, block in enumerate(config["down_block_types"]):
        for j in range(n):
            k = 1 + i * (n + 1) + j  # input_blocks[0] is conv_in; each level: n blocks, then its downsampler
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            if "CrossAttn" in block:
                out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (n + 1)}.0.op."
    for i, block in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in block
        for j in range(n + 1):
            k = i * (n + 1) + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            if attention:
                out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < levels - 1:  # the upsampler follows the level's last block (after its attention, if any)
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}."
    out["mid_block.resnets.0."], out["mid_block.attentions.0."] = "middle_block.0.", "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def _rename(key: str, prefixes: dict[str, str], inner: tuple = ()) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in inner:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            return new + rest
    raise KeyError(f"no LDM name for {key}")


def unet_to_ldm(state: dict, config) -> dict:
    """A diffusers UNet2DConditionModel state dict → `model.diffusion_model.*` keys."""
    prefixes = unet_prefixes(config)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in UNET_TOP:
            new = f"{UNET_TOP[module]}.{param}"
        else:
            inner = RESNET if ".resnets." in key else ()  # attention blocks keep their inner names in LDM
            new = _rename(key, prefixes, inner)
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_prefixes(config) -> dict[str, str]:
    """diffusers VAE module prefix → LDM prefix (the decoder's levels count the other way in LDM)."""
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    out = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(levels):
        for j in range(n):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < levels - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(n + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            out[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0."], out[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_1.", f"{part}.mid.block_2."
        out[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """A diffusers AutoencoderKL state dict → `first_stage_model.*` keys (attention projections as 1×1 convs)."""
    prefixes = vae_prefixes(config)
    out = {}
    for key, value in state.items():
        if not any(key.startswith(p) for p in prefixes):
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv: same names
        elif ".attentions." in key:
            new = _rename(key, prefixes, VAE_ATTENTION)
            if value.ndim == 2:  # LDM's attention uses 1×1 convolutions
                value = value[:, :, None, None]
        else:
            new = _rename(key, prefixes, VAE_RESNET)
        out[f"first_stage_model.{new}"] = value
    return out


def text_encoder_to_ldm(state: dict) -> dict:
    """A CLIPTextModel state dict → `cond_stage_model.transformer.text_model.*` keys (canonical `text_model.`)."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{key}"] = value
    return out


def to_ldm(unet, vae, text_encoder, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The three models as one original-layout state dict (contiguous CPU tensors, in `dtype` if given)."""
    state = unet_to_ldm(unet.state_dict(), unet.config) | vae_to_ldm(vae.state_dict(), vae.config)
    state |= text_encoder_to_ldm(text_encoder.state_dict())
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    return {k: cast(v.detach().cpu()).contiguous() for k, v in state.items() if not re.search(r"position_ids$", k)}
