"""A file users bring, read once: what it is (the `customgen inspect` report) and what customgen applies from it
(a change per SD v1.5 layer, and embedding vectors per trigger word).

    adapter = read_adapter("downloads/paper_cut.safetensors")   # refused in one line if customgen cannot use it
    adapter.report["format"], adapter.report["triggers"]
    adapter.merge_into({"unet": unet, "text_encoder": te}, strength=0.8)

Nothing loads a model here: the layers are matched against SD v1.5's names and widths (the configs shipped in the
package), and keys that match no layer are one warning with their count and the first few, as ComfyUI's
"lora key not loaded". A layer the file names that the model in use lacks is an error, never a silent skip.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from packaging.version import Version
from transformers import CLIPTextConfig, CLIPTextModel

from customgen.errors import Notice, UserError
from customgen.formats import family as families
from customgen.formats import layouts
from customgen.formats.deltas import PARTS, REQUIRED, Delta, algorithm
from customgen.formats.names import kohya_table, layer_paths, sd1_layers
from customgen.formats.reading import Contents, check_finite, open_contents

SHOWN_KEYS = 5  # unmatched keys quoted in the warning
STOCK_BLOCKS = ("attentions.", "resnets.", "downsamplers.", "upsamplers.")  # layers diffusers' kohya converter maps
NEW_KOHYA_CONVERTER = Version(diffusers.__version__) >= Version("0.42")  # reads lora_te_ keys without `text_model.`
OTHER_USES = {"checkpoint": ("--model", "a full model checkpoint"), "controlnet": ("--controlnet", "a ControlNet"),
              "ip-adapter": ("--ip-adapter", "an IP-Adapter")}  # layouts customgen uses, but not as a style
UNUSABLE = {
    "hypernetwork": "a hypernetwork (AUTOMATIC1111), which customgen does not support; use a LoRA of the style",
    "unknown": "not a LoRA, LyCORIS, DoRA, embedding, checkpoint, ControlNet or IP-Adapter layout customgen knows",
}
FEW_STEP = (  # (file-name or ss_output_name pattern, what it is, the schedulers it samples with, its steps)
    (r"lcm", "an LCM-LoRA", ("lcm",), "4-8"),
    (r"tcd", "a TCD LoRA", ("tcd",), "4-8"),
    (r"hyper[-_ ]?sd", "a Hyper-SD LoRA", ("tcd", "ddim"), "1-8"),
)
UNSUPPORTED_PARTS = {"oft_blocks": "LyCORIS OFT/BOFT", "oft_diag": "LyCORIS OFT", "on_input": "LyCORIS (IA)³",
                     "a1.weight": "LyCORIS GLoRA", "diff": "LyCORIS full (diff)", "w_norm": "LyCORIS norm layers",
                     "b_norm": "LyCORIS norm layers", "scalar": "LyCORIS scalar"}


@dataclass
class Adapter:
    """A readable file for SD v1: its changes per (component, canonical layer path), embeddings per trigger word
    and its report."""

    path: Path
    report: dict
    deltas: dict[tuple[str, str], Delta] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def stock_loadable(self) -> bool:
        """Whether stock diffusers' `load_lora_weights` reads this file as it is (then customgen loads it that way, so
        its pixels are stock diffusers' own): plain LoRA/LoCon layers (no Tucker mid, no DoRA) of the blocks kohya's
        converter maps, no embeddings, in the kohya layout or diffusers' prefixed one."""
        layout, deltas = self.report.get("layout"), self.deltas
        if self.embeddings or not deltas or layout not in ("kohya", "diffusers-prefixed"):
            return False
        if layout == "kohya" and any(c == "text_encoder" for c, _ in deltas) and not stock_reads_kohya_te():
            return False
        return all(d.algo == "locon" and "lora_mid.weight" not in d.parts and d.dora_scale is None
                   and (c == "text_encoder" or any(b in p for b in STOCK_BLOCKS)) for (c, p), d in deltas.items())

    @property
    def parameters(self) -> int:
        return sum(d.parameters() for d in self.deltas.values()) + sum(e.numel() for e in self.embeddings.values())

    def merge_into(self, models: dict, strength: float) -> None:
        """Add this file's change at `strength` to the layers' weights in place (models: component → module)."""
        with torch.no_grad():
            for (component, path), delta in self.deltas.items():
                layer = find_layer(models, component, path, self.path)
                layer.weight.copy_(delta.merged(layer.weight, strength))

    def layers(self, models: dict) -> list:
        """The layers this file changes in `models`, each found or one line naming the first one missing."""
        return [find_layer(models, c, p, self.path) for c, p in self.deltas]


@functools.cache
def stock_reads_kohya_te() -> bool:
    """Whether stock diffusers reads an SD1 kohya file's `lora_te_` keys here: diffusers >= 0.42, or a CLIPTextModel
    that still has the `text_model.` level (transformers 5.15 dropped it, and older diffusers then raise IndexError in
    utils/peft_utils.py; docs/interop.md). Where it cannot, customgen merges such files itself."""
    if NEW_KOHYA_CONVERTER:
        return True
    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with torch.device("meta"):
        return hasattr(CLIPTextModel(config), "text_model")


def find_layer(models: dict, component: str, path: str, source) -> torch.nn.Module:
    """The Linear/Conv2d layer at a canonical path (peft-wrapped layers seen through), or one line."""
    model = models.get(component)
    layer = None if model is None else layer_paths(model, component).get(path)
    if layer is None:
        raise UserError(f"{source}: layer {component}.{path} is not in this model (the file was made for another "
                        "base model)")
    return layer


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def examine(path: str | Path) -> tuple[dict, Adapter | None]:
    """The report of any file and, for a style file, its Adapter. `usable` says whether customgen can use it at
    all (`use`: the option that takes it: --style, --model, --controlnet, --ip-adapter), else `reason` says why
    not. Only a missing path raises."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    report = {"file": str(path), "format": "unknown", "base": "unknown", "modules": {}, "rank": None, "alpha": None,
              "triggers": [], "metadata": {}, "usable": False, "use": None, "reason": None}
    try:
        adapter = _read(path, report)
    except UserError as err:
        report["reason"] = str(err)
        return report, None
    report["usable"] = True
    report["use"] = "--style" if adapter is not None else OTHER_USES[report["format"]][0]
    return report, adapter


def read_adapter(path: str | Path) -> Adapter:
    """The Adapter of a style file, else one `error:` line (the reason `inspect` gives, or what the file is for)."""
    report, adapter = examine(path)
    if adapter is None:
        use = OTHER_USES.get(report["format"])
        raise UserError(report["reason"] if use is None or not report["usable"] else
                        f"{path}: {use[1]}, not a style: pass it as {use[0]}")
    if report.get("unmatched"):
        n, first = report["unmatched"]["count"], ", ".join(report["unmatched"]["first"])
        warnings.warn(f"{path}: {n} key(s) match no SD v1.5 layer and are not loaded (first: {first})", Notice,
                      stacklevel=2)
    return adapter


def _read(path: Path, report: dict) -> Adapter | None:
    contents = open_contents(path)
    keys, meta = contents.keys(), contents.metadata
    report["metadata"] = {k: v for k, v in meta.items() if k.startswith("ss_")}
    kind = layouts.layout(keys, meta)
    report["format"] = kind
    cross, text = _widths(contents, kind)
    family, evidence = families.guess(keys, cross_width=cross, text_width=text)
    report["base"] = family
    what = OTHER_USES[kind][1] if kind in OTHER_USES else "a file"
    refusal = families.refusal(path, what, family, evidence)
    if refusal:
        raise UserError(refusal)
    if kind in UNUSABLE:
        raise UserError(f"{path}: {UNUSABLE[kind]}")
    if kind in OTHER_USES:
        return None
    adapter = Adapter(path, report)
    if kind == "embedding":
        adapter.embeddings = {path.stem: _vectors(contents, keys)}
    elif kind == "kohya":
        _kohya(contents, adapter)
        report["layout"] = "kohya"
    else:
        _diffusers(contents, adapter)
        prefixed = all(k.startswith(("unet.", "text_encoder.")) for k in keys)
        report["layout"] = "diffusers-prefixed" if prefixed else "diffusers"
    check_finite(contents, keys)
    _summarise(adapter, meta)
    return adapter


def _widths(contents: Contents, kind: str) -> tuple[int | None, int | None]:
    """(cross-attention input width, text-encoder width) as the file's shapes show them."""
    cross = text = None
    for key, shape in contents.shapes.items():
        reads_input = len(shape) == 2 and (any(m in key for m in ("lora_down", "lora_A", ".lora.down"))
                                          or key.endswith(("to_k.weight", "q_proj.weight")))
        if kind == "embedding" or key.startswith(layouts.BUNDLE):
            text = shape[-1] if len(shape) else text
        elif reads_input and "attn2" in key and ("to_k" in key or "to_v" in key):
            cross = shape[1]  # (rank or out, input width): the text encoder's width the UNet attends to
        elif reads_input and "text_model" in key and "q_proj" in key:
            text = shape[1]
    return cross, text


def _vectors(contents: Contents, keys: list[str]) -> torch.Tensor:
    """One embedding's vectors (n, width) from the WebUI's or diffusers' keys."""
    if "clip_g" in keys and "clip_l" not in keys:
        raise UserError(f"{contents.path}: an SDXL embedding (clip_g only); use an SD 1.5 embedding")
    key = "clip_l" if "clip_l" in keys else keys[0]
    if len([k for k in keys if k.startswith("string_to_param.")]) > 1:
        raise UserError(f"{contents.path}: an embedding with several placeholder strings; the WebUI and diffusers "
                        "read one")
    vectors = contents.tensor(key)
    if vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise UserError(f"{contents.path}: embedding {key} has shape {tuple(vectors.shape)}, expected (vectors, width)")
    return vectors.reshape(-1, vectors.shape[-1]).float()


def _kohya(contents: Contents, adapter: Adapter) -> None:
    """kohya/LyCORIS layers (and bundled embeddings) matched against SD v1.5's names."""
    groups, bundle = layouts.kohya_groups(contents.keys())
    table, unmatched = kohya_table(), []
    for name, parts in groups.items():
        odd = [p for p in parts if p in UNSUPPORTED_PARTS]
        if odd:
            raise UserError(f"{contents.path}: layer {name} is {UNSUPPORTED_PARTS[odd[0]]}, which customgen does "
                            "not apply; use a LoRA, LoCon, LoHa, LoKr or DoRA file")
        if name not in table:
            unmatched += [parts[p] for p in sorted(parts)]
            continue
        adapter.deltas[table[name]] = _delta(contents, name, parts)
    for word, key in bundle.items():
        adapter.embeddings[word] = _vectors(contents, [key])
    _unmatched(adapter, unmatched)


def _delta(contents: Contents, name: str, parts: dict[str, str]) -> Delta:
    """One layer's Delta from its stored parts, refused in one line when a part is missing or unknown."""
    algo = algorithm(set(parts))
    known = set(PARTS.get(algo, ())) | {"alpha", "dora_scale"}
    extra = sorted(set(parts) - known)
    if algo is None or extra:
        raise UserError(f"{contents.path}: layer {name} has parts {sorted(parts)} that customgen does not know")
    missing = [p for p in REQUIRED[algo] if p not in parts]
    if algo == "lokr" and not ({"lokr_w1", "lokr_w1_a"} & set(parts) and {"lokr_w2", "lokr_w2_a"} & set(parts)):
        missing = ["lokr_w1 or lokr_w1_a/b", "lokr_w2 or lokr_w2_a/b"]
    if missing:
        raise UserError(f"{contents.path}: layer {name} lacks {', '.join(missing)} (a damaged file?)")
    tensors = contents.tensors(parts.values())
    alpha = tensors.pop(parts["alpha"]).float().item() if "alpha" in parts else None
    dora = tensors.pop(parts["dora_scale"]) if "dora_scale" in parts else None
    return Delta(algo, {p: tensors[k] for p, k in parts.items() if k in tensors}, alpha, dora)


def _diffusers(contents: Contents, adapter: Adapter) -> None:
    """diffusers/PEFT LoRA layers (PEFT's adapter_config.json beside the file gives α)."""
    config_path = contents.path.with_name("adapter_config.json")
    config = json.loads(config_path.read_text()) if contents.path.name.startswith("adapter_model") and \
        config_path.is_file() else None
    groups, stray = layouts.diffusers_groups(contents.keys())
    alphas = layouts.diffusers_alphas(contents.metadata, config)
    known, unmatched = sd1_layers(), list(stray)
    for (component, module), parts in groups.items():
        if component not in known or module not in known[component]:
            unmatched += sorted(parts.values())
            continue
        delta = _delta(contents, f"{component}.{module}", parts)
        if delta.alpha is None:
            delta.alpha = layouts.alpha_for(alphas, component, module, delta.rank)
        if delta.dora_scale is not None:
            delta.dora_scale = delta.dora_scale.reshape(-1, 1)  # peft's magnitude: one per output row
        adapter.deltas[(component, module)] = delta
    _unmatched(adapter, unmatched)


def _unmatched(adapter: Adapter, keys: list[str]) -> None:
    if keys:
        adapter.report["unmatched"] = {"count": len(keys), "first": keys[:SHOWN_KEYS]}
    if not adapter.deltas and not adapter.embeddings:
        raise UserError(f"{adapter.path}: none of its {len(keys)} keys matches an SD v1.5 layer (first: "
                        f"{', '.join(keys[:SHOWN_KEYS])}); it was made for another model")


def _summarise(adapter: Adapter, meta: dict) -> None:
    """format, modules per component, rank and alpha ranges, triggers (embedding words; kohya's output name and
    top tags)."""
    r, deltas = adapter.report, adapter.deltas.values()
    algos = {d.algo for d in deltas}
    layers = sd1_layers()
    conv = any(layers[c][p][2] not in ((), (1, 1)) for c, p in adapter.deltas)
    if r["format"] == "kohya":  # named after the richest algorithm it holds; DoRA on plain LoRA/LoCon layers
        dora = any(d.dora_scale is not None for d in deltas) and algos == {"locon"}
        r["format"] = next((a for a in ("loha", "lokr") if a in algos), None) or (
            "dora" if dora else "locon" if conv else "lora" if deltas else "embedding")
    elif r["format"] == "diffusers":
        r["format"] = "diffusers-lora"
    r["modules"] = dict(Counter(c for c, _ in adapter.deltas))
    ranks = [d.rank for d in deltas if d.rank is not None]
    alphas = [d.alpha for d in deltas if d.alpha is not None]
    r["rank"] = [min(ranks), max(ranks)] if ranks else None
    r["alpha"] = [min(alphas), max(alphas)] if alphas else None
    r["dora"] = sorted({"output" if d.dora_scale.shape[0] != 1 else "input" for d in deltas
                        if d.dora_scale is not None})
    r["embeddings"] = {w: int(v.shape[0]) for w, v in adapter.embeddings.items()}
    r["triggers"] = list(adapter.embeddings) + _kohya_triggers(meta)
    r["parameters"] = adapter.parameters
    r["sampler"] = few_step(adapter.path.stem + " " + meta.get("ss_output_name", ""))


def few_step(name: str) -> dict | None:
    """A few-step LoRA (LCM, TCD, Hyper-SD), known by its name as these files are published and shared: what it
    is, the schedulers it samples with, its steps; None for other files."""
    for pattern, what, schedulers, steps in FEW_STEP:
        if re.search(pattern, name, re.IGNORECASE):
            return {"what": what, "schedulers": list(schedulers), "steps": steps}
    return None


def _kohya_triggers(meta: dict, top: int = 10) -> list[str]:
    """kohya's `ss_output_name`, then the most frequent tags of `ss_tag_frequency` (summed over its folders)."""
    out = [meta["ss_output_name"]] if meta.get("ss_output_name") else []
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    counts = Counter()
    for tags in freq.values() if isinstance(freq, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return out + [t for t, _ in counts.most_common(top) if t and t not in out]
