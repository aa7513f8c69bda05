"""LoRA (Hu et al. 2021): low-rank adapters on the UNet attention projections (and, for subjects, on the text
encoder); `lora.type` locon, loha, lokr and `lora.dora` train LyCORIS's algorithms through peft
(customgen.kinds.adapter_types). Recipes: `lora_style`, `dreambooth_lora_subject`, `lora_anime_kohya` (they differ
only by config).

Files, with SD1's canonical module names whatever transformers is installed (transformers 5 dropped the
`text_model.` level of CLIPTextModel; every SD1 tool expects it):
- `pytorch_lora_weights.safetensors`: diffusers (`pipe.load_lora_weights(folder)`), rank/alpha metadata (and the
  conv rank/alpha patterns), `unet.<module>.lora_A/B.weight` (+ `lora_magnitude_vector` for DoRA) and
  `text_encoder.text_model.encoder.layers.N.<module>.lora_A/B.weight`; types lora and locon only;
- `<name>.safetensors`: kohya/LyCORIS (`lora_unet_<module>`, `lora_te_text_model_encoder_layers_N_...`, `.alpha`,
  kohya's `ss_*` metadata; customgen.formats.writing) for kohya, AUTOMATIC1111 and ComfyUI: `<lora:NAME:1>` in a
  flat models/Lora folder. Types loha and lokr write only this file (diffusers cannot load them): their artifact is
  of kind `merged`, whose main weights it is (customgen.kinds.foreign merges it at inference).
At inference a LoRA style is a named peft adapter; scales blend through `set_adapters`, scale 0 or no LoRA is
`disable_lora()` (the base model, bit for bit).
"""
from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from customgen.errors import UserError
from customgen.formats.writing import kohya_metadata, kohya_state
from customgen.kinds.adapter_types import (TYPES, add_adapter, alpha_of, conv_settings, kohya_network,
                                           saved_parameters, text_encoder_config, trained_layers, unet_config)
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.files import export_stem, first_line, inside, readable, tensor_values
from customgen.kinds.foreign import NAME as MERGED, check_applied, check_file
from customgen.kinds.freeze import freeze
from customgen.kinds.pivotal import Pivotal, PivotalHooks, aliased, check_artifact, load_tokens, single_file_refusal
from customgen.kinds.validate import RETRAIN, check_lora
from customgen.models import build_pipeline, canonical_text_encoder

WEIGHTS = "pytorch_lora_weights.safetensors"
# LoraConfig fields every supported peft knows: newer peft adds fields (lora_bias, target_parameters, ...) that
# an older peft's LoraConfig(**metadata) refuses, so a file written under the newest peft would not load on Kaggle.
PORTABLE_CONFIG = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights",
                   "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


# --- files -------------------------------------------------------------------------------------------------
def _peft_state(model, adapter_name: str) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def _dora_weight(state: dict) -> dict:
    """Text-encoder DoRA magnitudes as `lora_magnitude_vector.weight`. transformers 5 loads a text-encoder adapter
    through peft's `build_peft_weight_mapping`, which renames `lora_magnitude_vector` to `…vector.<adapter>` without
    the `.weight` its DoRA module holds: stock `load_lora_weights` would leave every magnitude at its initial ‖W‖
    ("UNEXPECTED"/"MISSING" in transformers' load report). With `.weight` both that mapping and peft's own loader
    (transformers 4) find it."""
    return {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}


def portable_config(config: LoraConfig) -> dict:
    """The adapter's LoraConfig as metadata any supported peft can rebuild (rank and alpha survive reload)."""
    data = config.to_dict()
    if not isinstance(data["target_modules"], str):  # a set in memory (JSON wants a list); a str is a regex
        data["target_modules"] = sorted(data["target_modules"])
    return {k: data[k] for k in PORTABLE_CONFIG if k in data}


def save_kohya(folder: str | Path, unet, text_encoder=None, *, facts: dict, adapter_name: str = "default",
               settings=None) -> str:
    """The kohya/LyCORIS file `<name>.safetensors` (customgen.formats.writing) with kohya's metadata, for kohya's
    sd-scripts, the WebUI and ComfyUI (`<lora:NAME:1>` in a flat models/Lora folder); returns its file name.
    `settings` (cfg.lora) names the type and conv settings in the metadata (None: plain LoRA)."""
    layers = trained_layers(unet, "unet", adapter_name)
    if text_encoder is not None:
        layers += trained_layers(text_encoder, "text_encoder", adapter_name)
    config = unet.peft_config[adapter_name]
    alpha = getattr(config, "lora_alpha", None) or config.alpha  # LoraConfig's name, LoHa/LoKrConfig's name
    network = ("networks.lora", {}) if settings is None else kohya_network(settings)
    export = f"{export_stem(facts['name'])}.safetensors"
    save_file(kohya_state(layers), str(Path(folder) / export), metadata=kohya_metadata(
        facts, rank=config.r, alpha=alpha, text_encoder=text_encoder is not None, network=network))
    return export


def save_lora(folder: str | Path, unet, text_encoder=None, *, facts: dict, adapter_name: str = "default",
              settings=None) -> str:
    """Save LoRA weights in diffusers format (rank/alpha metadata) and as `<name>.safetensors` for kohya/WebUI;
    returns the export's file name."""
    unet_state = _peft_state(unet, adapter_name)
    te_state = _dora_weight(canonical_text_encoder(_peft_state(text_encoder, adapter_name))) \
        if text_encoder is not None else None
    meta = lambda m: portable_config(m.peft_config[adapter_name])  # noqa: E731 - rank/alpha survive reload
    StableDiffusionPipeline.save_lora_weights(  # peft key layout (lora_A/lora_B), as diffusers writes it today
        folder, unet_lora_layers=unet_state, text_encoder_lora_layers=te_state or None,
        weight_name=WEIGHTS, unet_lora_adapter_metadata=meta(unet),
        text_encoder_lora_adapter_metadata=meta(text_encoder) if te_state else None,
    )
    return save_kohya(folder, unet, text_encoder if te_state else None, facts=facts, adapter_name=adapter_name,
                      settings=settings)


def load_lora(pipe, folder: str | Path, *, adapter_name: str, weights: str = WEIGHTS) -> None:
    """Load a LoRA artifact's `weights` file into a pipeline under `adapter_name` (stock diffusers loader). A file
    written without the canonical `text_model.` level (customgen under transformers 5 before 2026-11) is read
    through a canonical copy, so it loads under either transformers."""
    path = Path(folder) / weights
    with readable(path) as f:
        legacy = any(k.startswith("text_encoder.encoder.") for k in f.keys())
        metadata = f.metadata()
    if not legacy:
        pipe.load_lora_weights(str(folder), weight_name=weights, adapter_name=adapter_name)
        return
    state = load_file(str(path))
    state = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.", 1): v for k, v in state.items()}
    with tempfile.TemporaryDirectory(prefix="customgen-lora-") as tmp:
        save_file(state, str(Path(tmp) / WEIGHTS), metadata=metadata)
        pipe.load_lora_weights(tmp, weight_name=WEIGHTS, adapter_name=adapter_name)


# --- training ----------------------------------------------------------------------------------------------
class LoraMethod(PivotalHooks, Method):
    """LoRA (or LoCon, LoHa, LoKr, DoRA: lora.type, lora.dora) on the UNet (cfg.lora.targets, plus the ResNet blocks
    for locon/loha/lokr), optionally on the text encoder too, optionally with pivotal tuning's new tokens
    (customgen.kinds.pivotal: PivotalHooks and the lines below marked "pivotal")."""

    def __init__(self, cfg, kind):
        super().__init__(cfg, kind)
        self.pivotal = Pivotal(cfg) if cfg.pivotal.tokens else None  # pivotal: its settings checked here
        self.trains_text_encoder = cfg.lora.text_encoder or self.pivotal is not None

    def setup(self, comps) -> list[dict]:
        if self.pivotal:  # pivotal: the tokens join the tokenizer and the embedding table before freezing
            self.pivotal.add_tokens(comps)
        freeze(comps.unet, comps.vae, comps.text_encoder)
        add_adapter(comps.unet, unet_config(self.cfg.lora))
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.train.lr}]
        if self.cfg.lora.text_encoder:
            add_adapter(comps.text_encoder, text_encoder_config(self.cfg.lora))
            groups.append({"params": [p for p in comps.text_encoder.parameters() if p.requires_grad],
                           "lr": self.cfg.lora.text_encoder_lr})
        return groups + ([self.pivotal.group(comps)] if self.pivotal else [])  # pivotal: the embeddings' group

    def settings(self) -> dict:
        c = self.cfg.lora
        te = {"text_encoder_lr": c.text_encoder_lr, "text_encoder_targets": list(c.text_encoder_targets)}
        conv_rank, conv_alpha = conv_settings(c)
        convs = {"conv_rank": conv_rank, "conv_alpha": float(conv_alpha)} if unet_config(c).rank_pattern else {}
        return {"rank": c.rank, "alpha": float(alpha_of(c)), "targets": list(c.targets), "type": c.type,
                "dora": c.dora} | convs | {"text_encoder": c.text_encoder} | (te if c.text_encoder else {}) | (
                    self.pivotal.settings() if self.pivotal else {})

    def saved_bytes(self, comps) -> int:
        """fp32 tensors of every adapted layer: in two files (the diffusers file and the kohya export) where diffusers
        loads the type, else in the kohya/LyCORIS file with one alpha per layer; pivotal's embeddings."""
        c = self.cfg.lora
        values, layers = saved_parameters(comps, c, text_encoder=c.text_encoder)
        adapter = 2 * 4 * values if TYPES[c.type].diffusers else 4 * (values + layers)
        return adapter + (self.pivotal.saved_bytes(comps) if self.pivotal else 0)

    def memory_savers(self) -> list[str]:
        c = self.cfg.lora
        return ((["lora.dora=false"] if c.dora else []) + (["lora.conv_rank=0"] if unet_config(c).rank_pattern else [])
                + (["lora.text_encoder=false"] if c.text_encoder else [])
                + (["pivotal.tokens=0"] if self.pivotal else []))

    def save(self, folder: Path, comps, facts: dict) -> dict:
        c = self.cfg.lora
        te = comps.text_encoder if c.text_encoder else None
        fields = {"rank": c.rank, "alpha": float(alpha_of(c)), "text_encoder": c.text_encoder}
        fields |= self.pivotal.save(folder, comps, name=facts["name"]) if self.pivotal else {}
        if TYPES[c.type].diffusers:
            export = save_lora(folder, comps.unet, te, facts=facts, settings=c)
            return {"weights": WEIGHTS, "exports": [export]} | fields
        main = save_kohya(folder, comps.unet, te, facts=facts, settings=c)  # what customgen merges at inference
        return {"kind": MERGED, "weights": main, "exports": []} | fields


# --- inference ---------------------------------------------------------------------------------------------
LORA_COMPONENTS = ("unet", "text_encoder")  # pipeline components LoRA styles adapt (stock fuse_lora names)


@dataclass
class LoraState:
    """LoRA styles loaded into one session: style key (artifact folder or file) → peft adapter name, and what is
    active now."""

    adapters: dict = field(default_factory=dict)
    active: tuple | None = None  # ((adapter, weight), ...) last set; None: nothing set yet
    fused: dict | None = None  # peft layer → (weight, bias) of its base layer before fusing, on the CPU
    tokens: dict = field(default_factory=dict)  # pivotal: style key → {token: the name it was loaded under}


def lora_layers(pipe, adapter: str) -> list:
    """The peft LoRA layers of the pipeline's UNet and text encoder that hold `adapter`."""
    return [m for c in LORA_COMPONENTS for m in getattr(pipe, c).modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})]


def _base_copy(layer) -> tuple:
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    return base.weight.detach().to("cpu", copy=True), None if bias is None else bias.detach().to("cpu", copy=True)


class LoraKind(Kind):
    """LoRA styles as named peft adapters. One active style is fused into the base weights at its scale (stock
    `fuse_lora`: the LoRA branch costs nothing per step); blends run unfused through `set_adapters`. Unfusing
    copies the saved base weights back, so switching styles restores the base model bit for bit."""

    name = "lora"
    weights = WEIGHTS
    has_scale = True
    method_class = LoraMethod
    recipes = (Recipe("lora_style", "lora", "style", "tab:blue"),
               Recipe("dreambooth_lora_subject", "lora", "subject", "tab:purple"),
               Recipe("lora_anime_kohya", "lora", "subject", "tab:red"))

    def check(self, style, comps) -> None:
        if getattr(style, "source", None) is not None:  # a file from elsewhere (kohya or diffusers layout): its layers against comps
            check_file(style, comps)
            return
        check_lora(style.folder / style.manifest.weights, {"unet": comps.unet, "text_encoder": comps.text_encoder})
        if style.manifest.embeddings:  # pivotal
            check_artifact(style, comps.text_encoder.get_input_embeddings().weight.shape[1])

    def merge(self, comps, style, scale: float, *, single_file: bool) -> None:
        """Fuse the adapter into the base weights at `scale` (diffusers' fuse_lora), then drop the adapter; pivotal
        tuning's tokens join the tokenizer (a diffusers folder only)."""
        if style.manifest.embeddings and single_file:  # pivotal
            raise single_file_refusal(style)
        pipe = build_pipeline(comps, kind="txt2img")
        load_lora(pipe, style.folder, adapter_name="export", weights=style.manifest.weights)
        components = ["unet", "text_encoder"] if style.manifest.text_encoder else ["unet"]
        pipe.fuse_lora(components=components, lora_scale=float(scale), adapter_names=["export"])
        pipe.unload_lora_weights()
        if style.manifest.embeddings:  # pivotal
            load_tokens(pipe, style)

    def new_state(self) -> LoraState:
        return LoraState()

    def load(self, session, style) -> None:
        state = session.state(self)
        name = f"{re.sub(r'[^0-9A-Za-z_]', '_', style.name)}_{len(state.adapters)}"  # unique, no dots (peft keys)
        try:
            with warnings.catch_warnings():  # peft warns on every second adapter; named adapters are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora(session.pipeline("img2img"), style.folder, adapter_name=name,
                          weights=style.manifest.weights)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load LoRA style {style.name} from {style.key} ({first_line(err)}); "
                            f"{RETRAIN}") from err
        state.adapters[style.key] = name  # the artifact folder, or the file (two files may share a folder)
        state.active = None  # peft activates a newly loaded adapter: set the active set again
        if getattr(style, "source", None) is not None:
            check_applied(style, len(lora_layers(session.pipeline("img2img"), name)))
        if style.manifest.embeddings:  # pivotal: its tokens, under aliases where another style holds them
            state.tokens[style.key] = load_tokens(session.pipeline("img2img"), style, len(state.tokens))

    def activate(self, session, active: list[tuple]) -> None:
        state = session.state(self)
        if not state.adapters:
            return
        # An adapter at weight 0 adds exactly nothing: leaving it out lets a single remaining style fuse.
        weighted = tuple((state.adapters[s.key], float(w)) for s, w in active if float(w) != 0.0)
        if weighted == state.active:
            return  # nothing changed: set_adapters walks every module of the UNet
        pipe = session.pipeline("img2img")
        if not weighted:
            pipe.disable_lora()  # peft skips the LoRA branch: the base output, bit for bit
        else:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in weighted], adapter_weights=[w for _, w in weighted])
        state.active = weighted

    def resident_bytes(self, session, style) -> int:
        """The adapter's tensors (lora_A, lora_B, a DoRA magnitude): peft keeps them on the device, fused or not."""
        name = session.state(self).adapters.get(style.key)
        if name is None:
            return 0
        tensors = [t for layer in lora_layers(session.pipeline("img2img"), name)
                   for holder in (layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", {}))
                   if name in holder for t in holder[name].parameters()]
        emb = session.comps.text_encoder.get_input_embeddings().weight  # pivotal: its embedding rows
        rows = len(session.state(self).tokens.get(style.key, {})) * emb.shape[1] * emb.element_size()
        return sum(t.numel() * t.element_size() for t in tensors) + rows

    def planned_bytes(self, style, element_size: int) -> int:
        """The adapter's values (and a pivotal run's new rows), from the files' tensor shapes."""
        m = style.manifest
        files = [inside(style.folder, m.weights)] + ([inside(style.folder, m.embeddings)] if m.embeddings else [])
        return sum(tensor_values(f) for f in files) * element_size

    def stock_variants(self) -> dict[str, bool]:
        return {"load_lora_weights": False, "load_lora_weights + fuse_lora": True}  # customgen fuses one style

    def load_stock(self, pipe, style, variant: str) -> None:
        load_lora(pipe, style.folder, adapter_name="style", weights=style.manifest.weights)
        if style.manifest.embeddings:  # pivotal: the README's load_textual_inversion of clip_l
            load_tokens(pipe, style)
        if variant.endswith("fuse_lora"):
            pipe.fuse_lora(components=list(LORA_COMPONENTS), lora_scale=1.0)

    def prompt(self, session, style, text: str) -> str:
        return aliased(text, session.state(self).tokens.get(style.key, {}))  # pivotal: its tokens' loaded names

    def token_weights(self, session, style, scale: float) -> list[tuple[str, float]]:
        """Pivotal tuning's tokens follow the LoRA's scale (Textual Inversion's prompt interpolation: at 0 the prompt
        without them, beside the disabled adapter, is the base model's)."""
        return [(t, float(scale)) for t in session.state(self).tokens.get(style.key, {}).values()]

    def fuse(self, session) -> None:
        """Fuse a single active adapter at its scale, as stock `fuse_lora(lora_scale=w)` does it (the adapter at
        weight 1, then the scale); the base weights of its layers are kept on the CPU for `unfuse`."""
        state = session.state(self)
        if state.fused is not None or not state.active or len(state.active) != 1:
            return
        (name, weight), = state.active
        pipe = session.pipeline("img2img")
        state.fused = {layer: _base_copy(layer) for layer in lora_layers(pipe, name)}
        pipe.set_adapters([name], adapter_weights=[1.0])
        pipe.fuse_lora(components=list(LORA_COMPONENTS), lora_scale=weight, adapter_names=[name])

    def unfuse(self, session) -> None:
        """Unmerge (peft's bookkeeping), then copy the saved base weights back: exact, unlike W + ΔW − ΔW."""
        state = session.state(self)
        if state.fused is None:
            return
        with warnings.catch_warnings():  # layers of other (unfused) adapters say so, once each
            warnings.filterwarnings("ignore", message="Already unmerged")
            session.pipeline("img2img").unfuse_lora(components=list(LORA_COMPONENTS))
        with torch.no_grad():
            for layer, (weight, bias) in state.fused.items():
                base = layer.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
        state.fused, state.active = None, None  # fusing rescaled the layers: set the adapters again
