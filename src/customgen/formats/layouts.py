"""Which layout a file's keys follow, and its keys grouped per layer.

    kohya      `lora_unet_<layer>.<part>` / `lora_te_<layer>.<part>` (kohya's sd-scripts, LyCORIS, OneTrainer, the
               WebUI; parts: lora_down/up/mid, hada_*, lokr_*, alpha, dora_scale), `bundle_emb.<word>.<vector>`
    diffusers  `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight` (and diffusers' older
               `lora.down` / `to_q_lora` / `lora_linear_layer` names, converted by diffusers' own converters);
               PEFT's `base_model.model.<module>.lora_A.weight` beside its adapter_config.json
    embedding  AUTOMATIC1111 (`string_to_param.*` in a .pt, `emb_params` in a .safetensors), SDXL-style
               `clip_l`/`clip_g`, diffusers' {token: vectors}
and the files that are not styles at all: checkpoints, ControlNets, IP-Adapters, hypernetworks.
"""
from __future__ import annotations

import json
import re

from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

KOHYA = re.compile(r"^(lora_unet_|lora_te\d?_|lora_transformer_|lycoris_)")
BUNDLE = "bundle_emb."
A1111_EMBEDDING = ("emb_params", "clip_l", "clip_g")
DIFFUSERS = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(?:down|up)|lora_magnitude_vector|"
                       r"(?:to_q|to_k|to_v|to_out)_lora\.(?:down|up))(\.weight)?$")
PEFT_PREFIX = "base_model.model."
OTHER = (  # (layout, a key prefix or fragment that marks it)
    ("checkpoint", "model.diffusion_model."), ("checkpoint", "first_stage_model."),
    ("checkpoint", "conditioner.embedders."), ("controlnet", "control_model."),
    ("controlnet", "controlnet_cond_embedding."), ("ip-adapter", "image_proj."), ("ip-adapter", "ip_adapter."),
)
PEFT_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector|alpha)(\.weight)?$")
DIFFUSERS_TO_KOHYA_PART = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
                           "lora_magnitude_vector": "dora_scale", "alpha": "alpha"}


def layout(keys: list[str], metadata: dict) -> str:
    """kohya | diffusers | embedding | checkpoint | controlnet | ip-adapter | hypernetwork | unknown."""
    if not keys:
        return "unknown"
    if "layer_structure" in metadata or any(re.match(r"^\d+\.\d+\.linear\.", k) for k in keys):
        return "hypernetwork"
    for name, mark in OTHER:
        if any(k.startswith(mark) or f".{mark}" in k for k in keys):
            return name
    if any(KOHYA.match(k) or k.startswith(BUNDLE) for k in keys):
        return "kohya"
    if any(DIFFUSERS.search(k) for k in keys):
        return "diffusers"
    if is_embedding(keys):
        return "embedding"
    if any(k.startswith(("down_blocks.", "up_blocks.", "text_model.", "transformer_blocks.")) for k in keys):
        return "checkpoint"  # one component's full weights (a diffusers unet/ or text_encoder/ file)
    return "unknown"


def is_embedding(keys: list[str]) -> bool:
    """An embedding file: the WebUI's keys, or diffusers' single {token: vectors}."""
    if all(k.startswith("string_to_param.") or k in A1111_EMBEDDING for k in keys):
        return True
    return len(keys) == 1 and "." not in keys[0]


def kohya_groups(keys: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """kohya layer name → {part → key}, and bundled embedding word → key (`bundle_emb.<word>.<vector>`)."""
    layers, bundle = {}, {}
    for key in keys:
        if key.startswith(BUNDLE):
            word = key[len(BUNDLE):].split(".", 1)[0]
            bundle.setdefault(word, key)
            continue
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = key
    return layers, bundle


def diffusers_groups(keys: list[str]) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """(component, module path) → {kohya part name → key} for a diffusers/PEFT LoRA file, its old names mapped by
    diffusers' own converters; and the keys that name no layer part."""
    renamed = {}
    for key in keys:
        new = key.replace(".processor.", ".")
        if new.startswith(PEFT_PREFIX):
            rest = new[len(PEFT_PREFIX):]
            new = ("text_encoder." if rest.startswith(("text_model.", "encoder.layers.")) else "unet.") + rest
        elif not new.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")):
            new = "unet." + new  # diffusers' oldest files: attention-processor names without a prefix
        renamed[new] = key
    unet = convert_unet_state_dict_to_peft({k: k for k in renamed if k.startswith("unet.")})
    te = {k: k for k in renamed if k.startswith("text_encoder.")}
    if any("lora_linear_layer" in k or "_lora." in k for k in te):
        te = convert_state_dict_to_peft(te)
    groups, stray = {}, []
    for new, old in list(unet.items()) + list(te.items()):
        m = PEFT_PART.match(new)
        if not m:
            stray.append(renamed[old])
            continue
        component, _, module = m["module"].partition(".")
        if component == "text_encoder" and not module.startswith("text_model."):
            module = f"text_model.{module}"  # written under transformers >= 5.15, which dropped the level
        groups.setdefault((component, module), {})[DIFFUSERS_TO_KOHYA_PART[m["part"]]] = renamed[old]
    stray += [renamed[k] for k in renamed if not k.startswith(("unet.", "text_encoder."))]
    return groups, stray


def diffusers_alphas(metadata: dict, config: dict | None) -> dict[str, dict]:
    """component → {"alpha": α, "pattern": {module regex: α}, "rslora": bool} from diffusers'
    `lora_adapter_metadata` or PEFT's adapter_config.json (α None: none was written, so the scale is 1, as diffusers
    loads such files)."""
    raw = metadata.get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    get = (lambda c, k: meta.get(f"{c}.{k}")) if meta else (lambda c, k: (config or {}).get(k))  # noqa: E731
    if not meta and not config:
        return {}
    return {c: {"alpha": get(c, "lora_alpha"), "pattern": get(c, "alpha_pattern") or {},
                "rslora": bool(get(c, "use_rslora"))} for c in ("unet", "text_encoder")}


def alpha_for(alphas: dict, component: str, module: str, rank: int) -> float | None:
    """α of one module in kohya's sense (scale α/r): peft's alpha_pattern (a key matching the module's name or its
    end), else the adapter's; rsLoRA's α/√r as the α that gives it."""
    entry = alphas.get(component)
    if not entry:
        return None
    alpha = next((v for p, v in entry["pattern"].items() if re.match(rf"(.*\.)?({p})$", module)), entry["alpha"])
    if alpha is None:
        return None
    return float(alpha) * rank ** 0.5 if entry["rslora"] else float(alpha)
