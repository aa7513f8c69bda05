"""Styles whose weights are merged in from a file customgen.formats reads: files from elsewhere (a kohya/LyCORIS
LoRA, LoCon, LoHa, LoKr or DoRA file, a diffusers/PEFT LoRA file or an AUTOMATIC1111/diffusers embedding: `--style
FILE`, loose files in the library), and artifacts whose main weights file is in such a layout (manifest kind
`merged`). They are used wherever an artifact is (blends, evaluation, the demo's list, export). This kind applies
what the file holds:

- layer changes are merged into the base weights at the style's scale, file after file in the order given, as
  ComfyUI and the WebUI merge several LoRAs (a DoRA file normalises the weight it meets); the weights before are
  kept on the CPU and copied back exactly when the styles change (`unfuse`), so the base model returns bit for bit;
- embeddings join the tokenizer under their trigger word (the file stem, as the WebUI names them; a kohya file's
  `bundle_emb.<word>`) through stock `load_textual_inversion`; several vectors become `word`, `word_1`, ... and the
  scale interpolates prompt embeddings, as for Textual Inversion styles.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from customgen.errors import UserError
from customgen.formats import Adapter, find_layer, read_adapter
from customgen.kinds.base import Kind
from customgen.kinds.files import first_line
from customgen.kinds.manifest import Manifest
from customgen.models import build_pipeline

NAME = "merged"  # the kind
FILE_METHOD = "file"  # the manifest method of a file from elsewhere (it was not trained by customgen)


@functools.lru_cache(maxsize=4)  # an Adapter holds the file's tensors (a community LoRA is up to ~150 MB): a few
def _cached(path: str, stamp: tuple) -> Adapter:  # blended at once, not a whole listed library
    return read_adapter(path)


def adapter_of(path: str | Path) -> Adapter:
    """The file's Adapter, read once per version of the file (its size and modification time)."""
    stat = os.stat(path)
    return _cached(str(Path(path).resolve()), (stat.st_size, stat.st_mtime_ns))


def file_manifest(path: str | Path) -> Manifest:
    """A manifest for a file (checked and refused in one line before any model loads): name = file stem, prompt =
    its embeddings' trigger words, rank and alpha from its layers. A file stock diffusers loads as it is (plain
    kohya/diffusers LoRA and LoCon) is a LoRA style, loaded by `load_lora_weights` (stock pixels, peft blends); the
    others are merged by this kind."""
    path = Path(path)
    adapter = adapter_of(path)
    r = adapter.report
    words = list(adapter.embeddings)
    return Manifest(name=path.stem, method=FILE_METHOD, kind="lora" if adapter.stock_loadable else NAME, base_model="", weights=path.name, prompt=" ".join(words),
                    token=words[0] if words else "", rank=(r["rank"] or [None])[-1],
                    alpha=(r["alpha"] or [None])[-1], text_encoder=bool(r["modules"].get("text_encoder")),
                    trainable_params=adapter.parameters, file_bytes=path.stat().st_size,
                    training={"format": r["format"], "triggers": r["triggers"], "metadata": r["metadata"],
                              "sampler": r["sampler"]})


def weights_path(style) -> Path:
    """The file a style's changes come from: the file itself, or the artifact's main weights file."""
    return style.source or style.folder / style.manifest.weights


def _models(comps) -> dict:
    return {"unet": comps.unet, "text_encoder": comps.text_encoder}


def check_file(style, comps) -> None:
    """Every layer a style's file names exists in `comps` with its shape, and its embeddings have this text encoder's
    width (one line otherwise; the file itself was checked when it was named)."""
    path = weights_path(style)
    adapter = adapter_of(path)
    models, width = _models(comps), comps.text_encoder.get_input_embeddings().weight.shape[1]
    for (component, layer_path), delta in adapter.deltas.items():
        layer = find_layer(models, component, layer_path, path)
        try:
            delta.diff(tuple(layer.weight.shape))
            delta.dora_axis(tuple(layer.weight.shape))
        except (ValueError, RuntimeError) as err:
            raise UserError(f"{path}: layer {component}.{layer_path} does not fit this model ({first_line(err)}); "
                            "the file was made for another base model") from err
    for word, vectors in adapter.embeddings.items():
        if vectors.shape[-1] != width:
            raise UserError(f"{path}: embedding {word} is {vectors.shape[-1]} wide, this text encoder {width} (the "
                            "file was made for another base model)")


def check_applied(style, layers: int) -> None:
    """A loader applied every layer the file names (stock diffusers skips keys it cannot map: that is an error here,
    never a silent skip)."""
    named = len(adapter_of(weights_path(style)).deltas)
    if layers != named:
        raise UserError(f"{weights_path(style)}: the file names {named} layers and {layers} were applied; use "
                        "`customgen inspect` on it and report the file")


@dataclass
class FileState:
    """Files loaded into one session: style key → (Adapter, {trigger word: loaded token}); what is merged now."""

    adapters: dict = field(default_factory=dict)
    active: list = field(default_factory=list)  # [(key, scale)] to merge at the next fuse
    saved: dict | None = None  # layer → its weight before merging (CPU), while merged


class MergedKind(Kind):
    """Layer changes merged into the base weights (restored exactly); embeddings as tokens."""

    name = NAME
    has_scale = True

    def files(self, manifest: Manifest) -> list[str]:
        return [manifest.weights]

    def check(self, style, comps) -> None:
        check_file(style, comps)

    def merge(self, comps, style, scale: float, *, single_file: bool) -> None:
        """Bake the layer changes in at `scale`; embeddings join the tokenizer (a diffusers folder only)."""
        adapter = adapter_of(weights_path(style))
        if adapter.embeddings and single_file:
            raise UserError(f"{weights_path(style)} holds embeddings ({', '.join(adapter.embeddings)}), which a single-file "
                            "checkpoint cannot carry: export --format diffusers, or put the file in the tool's "
                            "embeddings folder")
        adapter.merge_into(_models(comps), float(scale))
        if adapter.embeddings:
            pipe = build_pipeline(comps, kind="txt2img")
            for word, vectors in adapter.embeddings.items():
                pipe.load_textual_inversion(vectors, token=word)

    def new_state(self) -> FileState:
        return FileState()

    def load(self, session, style) -> None:
        adapter = adapter_of(weights_path(style))
        tokens, state, vocab = {}, session.state(self), session.comps.tokenizer.get_vocab()
        for word, vectors in adapter.embeddings.items():
            token = word if word not in vocab else f"<{word}-{len(state.adapters)}>"  # taken: load an alias
            try:
                session.pipeline("img2img").load_textual_inversion(vectors.to(session.comps.text_encoder.dtype),
                                                                   token=token)
            except (ValueError, RuntimeError) as err:
                raise UserError(f"cannot load embedding {word} from {weights_path(style)} ({first_line(err)})") from err
            tokens[word] = token
        state.adapters[style.key] = (adapter, tokens)

    def activate(self, session, active: list[tuple]) -> None:
        """Remember the files to merge (merging happens in `fuse`, after every kind has activated)."""
        session.state(self).active = [(s.key, float(w)) for s, w in active if float(w) != 0.0]

    def fuse(self, session) -> None:
        """Merge the active files' layer changes, in order, keeping the weights before on the CPU."""
        state = session.state(self)
        if state.saved is not None or not state.active:
            return
        models, saved = _models(session.comps), {}
        with torch.no_grad():
            for key, scale in state.active:
                adapter = state.adapters[key][0]
                for layer in adapter.layers(models):
                    saved.setdefault(layer, layer.weight.detach().to("cpu", copy=True))
                adapter.merge_into(models, scale)
        state.saved = saved

    def unfuse(self, session) -> None:
        """Copy the saved weights back: the weights before merging, bit for bit."""
        state = session.state(self)
        if state.saved is None:
            return
        with torch.no_grad():
            for layer, weight in state.saved.items():
                layer.weight.copy_(weight)
        state.saved = None

    def resident_bytes(self, session, style) -> int:
        """Its embeddings' rows; its layer changes are merged into the weights (nothing beside them), computed layer
        by layer on the device before sampling starts (at most three float32 copies of its largest layer)."""
        loaded = session.state(self).adapters.get(style.key)
        if loaded is None:
            return 0
        emb = session.comps.text_encoder.get_input_embeddings().weight
        return sum(v.shape[0] for v in loaded[0].embeddings.values()) * emb.shape[1] * emb.element_size()

    def planned_bytes(self, style, element_size: int) -> int:
        """Its embeddings' values, from the file."""
        return sum(v.numel() for v in adapter_of(weights_path(style)).embeddings.values()) * element_size

    def default_prompt(self, style) -> str:
        return style.manifest.prompt

    def prompt(self, session, style, text: str) -> str:
        for word, token in session.state(self).adapters.get(style.key, (None, {}))[1].items():
            if token != word:
                text = text.replace(word, token)
        return text

    def token_weights(self, session, style, scale: float) -> list[tuple[str, float]]:
        return [(t, float(scale)) for t in session.state(self).adapters.get(style.key, (None, {}))[1].values()]
