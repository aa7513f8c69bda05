"""ControlNet and IP-Adapter files written by the tests in their published layouts, with seeded random weights.

- IP-Adapter: h94/IP-Adapter's `models/ip-adapter_sd15.safetensors` (or `.bin`: torch.save of the nested dict) beside
  `models/image_encoder/` (config.json + weights, as transformers' save_pretrained writes them). Keys `image_proj.proj`,
  `image_proj.norm` and `ip_adapter.N.to_k_ip/to_v_ip` with N = 1, 3, 5, ...; the widths below are written out from
  the architectures (SD v1.5: down 320, 320, 640, 640, 1280, 1280; up 1280 ×3, 640 ×3, 320 ×3; mid 1280).
- ControlNet: lllyasviel's original layout (`control_model.input_blocks.*`, `zero_convs.*`, `input_hint_block.*`,
  `middle_block.*`, `middle_block_out.*`, `time_embed.*`) as ControlNet's cldm code names them, renamed here from a
  diffusers ControlNetModel by the table below (not by customgen code); or a diffusers folder (save_pretrained).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils import logging as tlog

from customgen.models.builders import CONFIGS

CROSS_WIDTHS = {"tiny": [32, 32, 32, 64],  # down_blocks.0 (1), up_blocks.1 (2), mid (1)
                "sd15": [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]}
TEXT_WIDTH = {"tiny": 32, "sd15": 768}
IMAGE_EMBED = {"tiny": 32, "sd15": 1024}  # the image encoder's projection width (ViT-H/14: 1024)
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _randn(shape, gen, std):
    return torch.randn(shape, generator=gen) * std


def ip_adapter_state(fam: str, *, seed: int = 0, width: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} at a family's shapes (`width`: another text width, e.g. SDXL's 2048)."""
    gen = torch.Generator().manual_seed(seed)
    cad, embed = width or TEXT_WIDTH[fam], IMAGE_EMBED[fam]
    proj = {"proj.weight": _randn((4 * cad, embed), gen, 0.2), "proj.bias": _randn((4 * cad,), gen, 0.1),
            "norm.weight": 1 + _randn((cad,), gen, 0.1), "norm.bias": _randn((cad,), gen, 0.1)}
    ip = {}
    for i, hidden in enumerate(CROSS_WIDTHS[fam]):
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * i + 1}.{part}.weight"] = _randn((hidden, cad), gen, 0.3)
    return {"image_proj": proj, "ip_adapter": ip}


def image_encoder(fam: str, *, seed: int = 0, embed: int | None = None) -> CLIPVisionModelWithProjection:
    """A small seeded CLIP vision encoder projecting to the family's image-embedding width."""
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=embed or IMAGE_EMBED[fam])).eval()


def write_ip_adapter(root: Path, fam: str = "tiny", *, suffix: str = ".safetensors", seed: int = 0,
                     width: int | None = None, encoder_bin: bool = False) -> Path:
    """root/models/ip-adapter_sd15<suffix> and root/models/image_encoder/ (h94/IP-Adapter's layout)."""
    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    state = ip_adapter_state(fam, seed=seed, width=width)
    path = models / f"ip-adapter_sd15{suffix}"
    if suffix == ".safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, path)
    encoder = image_encoder(fam, seed=seed + 1)
    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # transformers 5 draws a "Writing model shards" bar on stderr
    try:
        encoder.save_pretrained(models / "image_encoder")
    finally:
        if bars:
            tlog.enable_progress_bar()
    if encoder_bin:  # the pickled form (transformers 5 writes only safetensors)
        (models / "image_encoder" / "model.safetensors").unlink()
        torch.save(encoder.state_dict(), models / "image_encoder" / "pytorch_model.bin")
    return path


def seeded_controlnet(fam: str, *, seed: int = 0, **config) -> ControlNetModel:
    """A ControlNet from the shipped family config with seeded random weights (the zero convolutions too, so the
    control changes the output)."""
    cfg = json.loads((CONFIGS / fam / "controlnet" / "config.json").read_text()) | config
    torch.manual_seed(seed)
    net = ControlNetModel.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
        for conv in zero:
            conv.weight.copy_(_randn(conv.weight.shape, gen, 0.05))
    return net


def original_names(config) -> dict[str, str]:
    """diffusers ControlNetModel prefix → lllyasviel's original prefix (cldm.ControlNet), from the block layout."""
    n, levels = config["layers_per_block"], len(config["block_out_channels"])
    out = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "conv_in.": "input_blocks.0.0.", "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
           "controlnet_cond_embedding.conv_out.": "input_hint_block.14.", "controlnet_mid_block.": "middle_block_out.0.",
           "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
           "mid_block.resnets.1.": "middle_block.2."}
    for k in range(6):  # the hint encoder: conv, SiLU, conv, SiLU, ...: convs at 0, 2, ..., 14
        out[f"controlnet_cond_embedding.blocks.{k}."] = f"input_hint_block.{2 * (k + 1)}."
    for i in range(levels):
        for j in range(n):
            b = 1 + i * (n + 1) + j
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{b}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{b}.1."
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (n + 1)}.0.op."
    for z in range(levels * (n + 1)):  # one zero convolution per input block
        out[f"controlnet_down_blocks.{z}."] = f"zero_convs.{z}.0."
    return out


def original_state(net: ControlNetModel, *, dtype=None) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under `control_model.*` original names."""
    names = original_names(net.config)
    out = {}
    for key, value in net.state_dict().items():
        old = next(p for p in sorted(names, key=len, reverse=True) if key.startswith(p))
        rest = key[len(old):]
        if ".resnets." in old:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET.get(head, head)}.{tail}"
        out[f"control_model.{names[old]}{rest}"] = value.detach().to(dtype or value.dtype).contiguous()
    return out


def write_controlnet(path: Path, net: ControlNetModel, *, dtype=None) -> Path:
    """The original single file: .safetensors, or a .pth written by torch.save (as lllyasviel published them);
    a path without a suffix gets the diffusers folder (save_pretrained)."""
    path = Path(path)
    if not path.suffix:
        net.save_pretrained(path)
    elif path.suffix == ".safetensors":
        save_file(original_state(net, dtype=dtype), str(path))
    else:
        torch.save(original_state(net, dtype=dtype), path)
    return path


class Payload:
    """A pickle whose loading would run code (writes a marker file): what the weights-only unpickler must refuse."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def write_payload(path: Path, marker: Path) -> Path:
    """A torch.save file holding tensors and the payload."""
    torch.save({"control_model.time_embed.0.weight": torch.zeros(2, 2), "evil": Payload(marker)}, path)
    return path
