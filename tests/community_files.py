"""Files in the layouts other tools write, made by the tests themselves from a model's own module tree (seeded
random values), and the merge formulas those tools apply, written out here as the references customgen is checked
against (nothing below imports customgen.formats).

Layouts (the published key names):
- kohya / LyCORIS (kohya's sd-scripts networks/lora.py and LyCORIS's kohya-compatible files): one entry per layer,
  `lora_unet_<module path with _>` / `lora_te_<text_model path with _>` + `.lora_down.weight`, `.lora_up.weight`,
  `.lora_mid.weight` (LoCon Tucker), `.hada_w1_a` ... `.hada_t2` (LoHa), `.lokr_w1` ... `.lokr_t2` (LoKr),
  `.alpha`, `.dora_scale`; bundled embeddings `bundle_emb.<word>.string_to_param.*`;
- diffusers / PEFT: `unet.<module>.lora_A.weight` + `lora_adapter_metadata`; PEFT's `base_model.model.<module>...`
  with adapter_config.json;
- embeddings: AUTOMATIC1111's .pt ({string_to_token, string_to_param: {"*": (n, d)}, name, step}), its
  .safetensors (`emb_params`), `string_to_param.*` in a .safetensors, diffusers' {token: vectors}.

The merge formulas are ComfyUI's LoraLoader (comfy/weight_adapter: lora.py, loha.py, lokr.py, base.py's
weight_decompose) and LyCORIS's output-axis DoRA, in float64.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.reliability_fixtures import Evil
from tests.tolerance import gamma

ATTENTION = ("attentions.",)  # kohya's Transformer2DModel targets (Linear and 1x1 Conv2d)
CONV_BLOCKS = ("resnets.", "downsamplers.", "upsamplers.")  # + ResnetBlock2D/Downsample2D/Upsample2D (LoCon)
TE_BLOCKS = ("self_attn.", "mlp.")  # CLIPAttention, CLIPMLP


def canonical_te(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"


def target_layers(comps, *, conv: bool, text_encoder: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, canonical module path, layer) of every layer kohya's LoRA (and with `conv` its LoCon) trains."""
    out = []
    for name, m in comps.unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(b in name for b in ATTENTION) or (conv and any(b in name for b in CONV_BLOCKS)):
            out.append(("unet", name, m))
    if text_encoder:
        out += [("text_encoder", canonical_te(n), m) for n, m in comps.text_encoder.named_modules()
                if isinstance(m, torch.nn.Linear) and any(b in n for b in TE_BLOCKS)]
    return out


def kohya_key(component: str, path: str) -> str:
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def dims(layer) -> tuple[int, int, tuple]:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features, ()
    return layer.in_channels, layer.out_channels, tuple(layer.kernel_size)


def factor(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b, a the largest divisor ≤ √n (any split is a valid LoKr layout)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def layer_parts(algo: str, layer, *, rank: int, g: torch.Generator, std: float = 0.3, tucker: bool = False,
                decompose: tuple[bool, bool] = (False, True)) -> dict[str, torch.Tensor]:
    """One layer's stored parts in LyCORIS's shapes (conv: LoCon's 4-D down/up, LoHa/LoKr 2-D flattened or Tucker)."""
    i, o, k = dims(layer)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    tucker = tucker and bool(k) and k != (1, 1)
    if algo == "locon":
        if tucker:
            return {"lora_down.weight": r(rank, i, 1, 1), "lora_mid.weight": r(rank, rank, *k),
                    "lora_up.weight": r(o, rank, 1, 1)}
        ones = (1, 1) if k else ()
        return {"lora_down.weight": r(rank, i, *k), "lora_up.weight": r(o, rank, *ones)}
    if algo == "loha":
        if tucker:
            return {"hada_t1": r(rank, rank, *k), "hada_w1_a": r(rank, o), "hada_w1_b": r(rank, i),
                    "hada_t2": r(rank, rank, *k), "hada_w2_a": r(rank, o), "hada_w2_b": r(rank, i)}
        flat = i * math.prod(k)
        return {"hada_w1_a": r(o, rank), "hada_w1_b": r(rank, flat), "hada_w2_a": r(o, rank), "hada_w2_b": r(rank, flat)}
    (a, b), (c, d) = factor(o), factor(i)  # out = a·b, in = c·d; w1 (a, c) ⊗ w2 (b, d[, k])
    parts = {"lokr_w1_a": r(a, rank), "lokr_w1_b": r(rank, c)} if decompose[0] else {"lokr_w1": r(a, c)}
    if not decompose[1]:
        parts["lokr_w2"] = r(b, d, *k)
    elif tucker:
        parts |= {"lokr_t2": r(rank, rank, *k), "lokr_w2_a": r(rank, b), "lokr_w2_b": r(rank, d)}
    else:
        parts |= {"lokr_w2_a": r(b, rank), "lokr_w2_b": r(rank, d * math.prod(k))}
    return parts


def dora_scale(layer, axis: str, g: torch.Generator) -> torch.Tensor:
    """A magnitude near the weight's norms: (out, 1[, 1, 1]) per output row, or (1, in[, 1, 1]) per input column."""
    w = layer.weight.detach().float()
    extra = [1] * (w.dim() - 2)
    if axis == "output":
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], 1, *extra)
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *extra)
    return norm * (1 + 0.2 * torch.rand(norm.shape, generator=g))


def kohya_state(comps, algo: str, *, rank: int = 4, alpha: float | None = 2.0, conv: bool = True,
                text_encoder: bool = True, seed: int = 0, dora: str | None = None, **kw) -> dict[str, torch.Tensor]:
    """A kohya/LyCORIS state dict for every target layer of `comps`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, path, layer in target_layers(comps, conv=conv, text_encoder=text_encoder):
        name = kohya_key(component, path)
        for part, value in layer_parts(algo, layer, rank=rank, g=g, **kw).items():
            state[f"{name}.{part}"] = value.contiguous()
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
        if dora:
            state[f"{name}.dora_scale"] = dora_scale(layer, dora, g)
    return state


def kohya_metadata(name: str, **extra) -> dict[str, str]:
    return {"ss_output_name": name, "ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps({"10_paper cut": {"paper cut": 12, "red": 3, "bird": 7}})} | extra


def write(path: Path, state: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def diffusers_state(comps, *, rank: int = 4, seed: int = 0, text_encoder: bool = True, prefix: str = "",
                    dora: bool = False) -> dict[str, torch.Tensor]:
    """diffusers' peft-key LoRA layout (attention layers), `unet.` / `text_encoder.` prefixed unless `prefix`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, path, layer in target_layers(comps, conv=False, text_encoder=text_encoder):
        i, o, k = dims(layer)
        head = prefix or f"{component}."
        state[f"{head}{path}.lora_A.weight"] = torch.randn(rank, i, *k, generator=g) * 0.3
        state[f"{head}{path}.lora_B.weight"] = torch.randn(o, rank, *([1, 1] if k else []), generator=g) * 0.3
        if dora:
            state[f"{head}{path}.lora_magnitude_vector"] = dora_scale(layer, "output", g).reshape(-1)
    return state


def diffusers_metadata(state: dict, *, rank: int, alpha: float) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata` (peft LoraConfig fields per component) for a diffusers_state."""
    meta = {}
    for component in ("unet", "text_encoder"):
        modules = sorted({re.split(r"(?:transformer_blocks|attentions|layers)\.\d+\.", k.rsplit(".lora_", 1)[0])[-1]
                          for k in state if k.startswith(component + ".")})  # peft's suffixes: to_q, ff.net.2, fc1
        if modules:
            fields = {"r": rank, "lora_alpha": alpha, "target_modules": modules, "lora_dropout": 0.0, "bias": "none",
                      "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "rank_pattern": {},
                      "alpha_pattern": {}, "use_dora": any(k.endswith("lora_magnitude_vector") for k in state
                                                           if k.startswith(component + "."))}  # a LoraConfig's fields
            meta |= {f"{component}.{k}": v for k, v in fields.items()}
    return {"lora_adapter_metadata": json.dumps(meta), "format": "pt"}


# --- the references: ComfyUI's LoraLoader math (and LyCORIS's output-axis DoRA), in float64 ------------------
COMFY_PARTS = {  # the parts ComfyUI's weight adapters read per layer (comfy/weight_adapter/lora.py, loha.py, lokr.py)
    "locon": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
COMFY_SHARED = {"alpha", "dora_scale"}  # read by every adapter (comfy/weight_adapter/base.py)
COMFY_REQUIRED = {"locon": {"lora_up.weight", "lora_down.weight"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                            "hada_w2_b"}, "lokr": set()}


def comfy_algo(parts) -> str:
    """The ComfyUI adapter that loads a layer with these parts: LoHa for hada_*, LoKr for lokr_*, else LoRA."""
    return "loha" if any(k.startswith("hada_") for k in parts) else "lokr" if any(
        k.startswith("lokr_") for k in parts) else "locon"


def comfy_diff(algo: str, parts: dict, alpha: float | None, shape) -> tuple[torch.Tensor, float]:
    """(ΔW before the scale, the scale ComfyUI applies): comfy/weight_adapter/{lora,loha,lokr}.py."""
    p = {k: v.double() for k, v in parts.items()}
    if algo == "locon":
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        if "lora_mid.weight" in p:  # LoCon Tucker: up ×mid× down
            diff = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), p["lora_mid.weight"], down.flatten(1))
        else:
            diff = up.flatten(1) @ down.flatten(1)
        rank = down.shape[0]
    elif algo == "loha":
        if "hada_t1" in p:
            m1 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            m2 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        diff, rank = m1 * m2, p["hada_w1_b"].shape[0]
    else:
        rank = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        w2 = p.get("lokr_w2")
        if w2 is None:
            rank = p["lokr_w2_b"].shape[0]
            w2 = (torch.einsum("ijkl,jr,ip->prkl", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]) if "lokr_t2" in p
                  else p["lokr_w2_a"] @ p["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2.contiguous())  # ComfyUI passes the einsum result as it is: torch 2.14 refuses it
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    return diff.reshape(shape), scale


def comfy_merge(weight: torch.Tensor, algo: str, parts: dict, alpha: float | None, strength: float,
                dora: torch.Tensor | None = None, *, comfy_output_norm: bool = False) -> torch.Tensor:
    """The merged weight in float64. DoRA: the per-input-column norm of W+ΔW for (1, in) scales (ComfyUI), the
    per-output-row norm of W+ΔW for (out, 1) scales (LyCORIS; `comfy_output_norm`: ComfyUI's ‖W‖ instead)."""
    w = weight.double()
    diff, scale = comfy_diff(algo, parts, alpha, w.shape)
    if dora is None:
        return w + strength * scale * diff
    calc = w + scale * diff
    m = dora.double()
    if m.shape[0] == w.shape[0]:  # output axis
        src = w if comfy_output_norm else calc
        norm = src.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * (w.dim() - 1))
        norm = norm.transpose(0, 1)
    return w + strength * (calc * (m / (norm + torch.finfo(weight.dtype).eps)) - w)  # eps of the weight's dtype


def merge_magnitude(weight, algo: str, parts: dict, alpha, strength: float) -> torch.Tensor:
    """|W| + |k·s|·(the same products of |factors|): what a rounding bound of the merge scales with (the formula is
    multilinear in the factors, so |factors| give Σ|terms|)."""
    diff, scale = comfy_diff(algo, {k: v.abs() for k, v in parts.items()}, alpha, weight.shape)
    return weight.double().abs() + abs(strength * scale) * diff


def dora_bound(w, algo, parts, alpha, strength, dora, n, dtype=torch.float64) -> torch.Tensor:
    """How far a DoRA merge computed in `dtype` may lie from the float64 formula (two float64 merges: dtype float64):
    W+sΔW within e1 = γ_n·(|W| + |s|M); its row/column norm then within ‖e1‖ + γ_{L+2}·norm; the rescale and the
    strength blend add a few roundings (Higham 2002, §3.1). A float64 reference adds its own float64 bound."""
    def one(u_dtype):
        diff, scale = comfy_diff(algo, parts, alpha, w.shape)
        calc = w.double() + scale * diff
        e1 = gamma(n, u_dtype) * merge_magnitude(w, algo, parts, alpha, 1.0)
        out_axis = dora.shape[0] == w.shape[0]
        flat = (lambda t: t.reshape(t.shape[0], -1)) if out_axis else (
            lambda t: t.transpose(0, 1).reshape(t.shape[1], -1))
        norm, enorm = flat(calc).norm(dim=1), flat(e1).norm(dim=1)
        shape = (-1, *[1] * (w.dim() - 1)) if out_axis else (1, -1, *[1] * (w.dim() - 2))
        length = flat(calc).shape[1]
        q = dora.double().reshape(shape) / norm.reshape(shape)
        rel_q = (enorm / norm).reshape(shape) + gamma(length + 4, u_dtype)
        scaled = (calc * q).abs()
        return abs(strength) * (q.abs() * e1 + scaled * (rel_q + gamma(2, u_dtype))) + gamma(3, u_dtype) * (
            w.double().abs() * (1 + abs(strength)) + abs(strength) * scaled)

    return one(dtype) + (one(torch.float64) if dtype != torch.float64 else 0)


def chain_length(algo: str, parts: dict) -> int:
    """Roundings in a row of one merged value: terms of the longest expanded sum + multiplications per term +
    scale, strength and the add (Higham 2002, §3.1)."""
    shapes = {k: v.shape for k, v in parts.items()}
    if algo == "locon":
        r = shapes["lora_down.weight"][0]
        return (r * r + 2 if "lora_mid.weight" in shapes else r + 1) + 3
    if algo == "loha":
        r = shapes["hada_w1_b"][0]
        return (r ** 4 + 5 if "hada_t1" in shapes else r * r + 3) + 3
    w1 = shapes["lokr_w1_b"][0] if "lokr_w1_b" in shapes else 0
    r2 = shapes["lokr_w2_b"][0] if "lokr_w2_b" in shapes else 0
    return w1 + (r2 * r2 if "lokr_t2" in shapes else r2) + 2 + 3


# --- embeddings --------------------------------------------------------------------------------------------
def embedding(width: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.1


def write_a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """AUTOMATIC1111's textual_inversion .pt (a pickle of plain containers and tensors)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500,
                "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, str(path))
    return path


def write_embedding(path: Path, vectors: torch.Tensor, layout: str) -> Path:
    """layout: a1111-pt | emb_params | string_to_param | diffusers | clip_l."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "a1111-pt":
        return write_a1111_pt(path, vectors)
    key = {"emb_params": "emb_params", "string_to_param": "string_to_param.*", "clip_l": "clip_l",
           "diffusers": "<my-token>"}[layout]
    save_file({key: vectors.contiguous()}, str(path))
    return path


# --- files customgen refuses (each with the words its one line must hold) ------------------------------------
def refused_files(folder: Path, comps, marker: Path) -> dict[str, tuple[Path, str]]:
    """case → (file, pattern of its one-line refusal): other families, unsafe or damaged files, unsupported layouts."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = kohya_state(comps, "locon", conv=False, seed=9)
    r = lambda *s: torch.randn(*s, generator=torch.Generator().manual_seed(1)) * 0.1  # noqa: E731
    xl_te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(4, 768),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(768, 4),
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(4, 1280),
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(1280, 4)}
    wide = lambda width: {  # noqa: E731 - an SD1-named layer reading a wider text encoder
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": r(4, width),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": r(640, 4)}
    nan = dict(lora)
    first = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[first] = nan[first].clone().fill_(float("nan"))
    files = {
        "sdxl lora_te1_/lora_te2_": (write(folder / "xl_lora.safetensors", xl_te), r"for SDXL \(SDXL's two text encoders"),
        "sdxl 2048-wide": (write(folder / "xl_wide.safetensors", wide(2048)), r"for SDXL \(2048-wide cross-attention\)"),
        "sd2 1024-wide": (write(folder / "sd2_lora.safetensors", wide(1024)), r"for SD 2.x \(1024-wide cross-attention\)"),
        "sd3 keys": (write(folder / "sd3_lora.safetensors", {
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": r(4, 1536),
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": r(1536, 4)}), r"for SD3"),
        "flux keys": (write(folder / "flux_lora.safetensors", {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": r(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": r(9216, 4)}), r"for Flux"),
        "sdxl embedding (clip_g)": (write(folder / "xl_emb.safetensors", {"clip_g": r(2, 1280), "clip_l": r(2, 768)}),
                                    r"for SDXL"),
        "NaN values": (write(folder / "nan_lora.safetensors", nan), r"holds NaN or infinite values"),
        "hypernetwork": (_hypernetwork(folder / "hn.pt"), r"a hypernetwork \(AUTOMATIC1111\)"),
        "LyCORIS OFT": (write(folder / "oft.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": r(4, 8, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}), r"LyCORIS OFT"),
        "no SD1 layer": (write(folder / "elsewhere.safetensors", {"lora_unet_foo_bar.lora_down.weight": r(2, 2)}),
                         r"none of its 1 keys matches an SD v1.5 layer"),
        "checkpoint as a style": (write(folder / "model.safetensors", {
            "model.diffusion_model.input_blocks.0.0.weight": r(4, 4, 3, 3)}), r"a full model checkpoint, not a style: "
                                                                             r"pass it as --model"),
    }
    whole = (folder / "xl_lora.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file at all" * 4)
    (folder / "garbage.pt").write_bytes(b"\x80\x04 not a pickle either" * 4)
    torch.save({"string_to_param": {"*": Evil(marker)}}, str(folder / "payload.pt"))
    return files | {
        "truncated": (folder / "truncated.safetensors", r"not readable as a safetensors file .*truncated"),
        "not safetensors": (folder / "garbage.safetensors", r"not readable as a safetensors file"),
        "not a pickle": (folder / "garbage.pt", r"not readable as a weights-only pickle"),
        "pickle payload": (folder / "payload.pt", r"a pickle that torch's weights-only unpickler refuses .*never runs"),
    }


def _hypernetwork(path: Path) -> Path:
    """AUTOMATIC1111's hypernetwork .pt: {width: [state dicts]} plus its settings."""
    layer = {"linear.0.weight": torch.zeros(1536, 768), "linear.0.bias": torch.zeros(1536)}
    torch.save({768: [layer, layer], 320: [layer, layer], "name": path.stem, "layer_structure": [1, 2, 1],
                "activation_func": "linear", "step": 100}, str(path))
    return path
