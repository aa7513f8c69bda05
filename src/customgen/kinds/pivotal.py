"""Pivotal tuning (Mokady et al. 2022's pivot, as cloneofsimo's lora_pti and diffusers' advanced DreamBooth-LoRA script,
`--train_text_encoder_ti`, train it): new tokens `<s0><s1>…` take the place of a trigger word in the instance prompt
and train as text-encoder embeddings beside the UNet LoRA, with their own learning rate, during the first
⌈pivotal.frac × train.steps⌉ optimizer steps; the other embedding rows are restored after every step, as Textual
Inversion does. The LoRA kind calls this module (customgen.kinds.lora) for training, its files and inference.

Files, as diffusers' advanced script lays them out:
- `<name>_emb.safetensors` = {"clip_l": (tokens, 768)}: stock diffusers reads it with `load_lora_weights(folder)` +
  `load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=..., tokenizer=...)`; AUTOMATIC1111
  and ComfyUI read the same file from their embeddings folder as one embedding named by its file stem, `<name>_emb`,
  the word that stands for the tokens in their prompts;
- the LoRA files stay as they are: no `bundle_emb.<word>.*` inside the kohya file (AUTOMATIC1111 reads such a bundle,
  but one key that is not `lora_unet_`/`lora_te_` and diffusers' SD1 loader refuses the whole file, "Invalid LoRA
  checkpoint", and ComfyUI prints "lora key not loaded" for it).
style.json names the file (`embeddings`), the tokens (`tokens`) and the trigger prompt that uses them (`prompt`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customgen.errors import UserError
from customgen.kinds.files import export_stem, first_line, readable
from customgen.kinds.validate import RETRAIN, check_embeddings, refuse
from customgen.models.loading import load_tokenizer

KEY = "clip_l"  # the advanced script's key for SD v1's text encoder (CLIP ViT-L/14); SDXL files add clip_g
TOKEN = "<s{}>"  # the advanced script's token names: <s0>, <s1>, ...


def tokens_of(n: int) -> list[str]:
    """The names of `n` new tokens: <s0>, <s1>, ..."""
    return [TOKEN.format(i) for i in range(n)]


def embeddings_file(name: str) -> str:
    """`<name>_emb.safetensors`, the advanced script's file name (the WebUI's trigger word is its stem)."""
    return f"{export_stem(name)}_emb.safetensors"


def _word(trigger: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")


def replace_trigger(text: str, trigger: str, tokens: list[str]) -> str:
    """`text` with the trigger, as a whole word, replaced by the joined tokens ('a TOK dog' → 'a <s0><s1> dog'); the
    advanced script replaces the plain substring (`TOK` inside `TOKYO` too)."""
    return _word(trigger).sub(lambda _: "".join(tokens), text)


def word_ids(tokenizer, word: str) -> list[int]:
    """The base-vocabulary token ids of an init word, or one line when it has none (nothing, or special tokens only)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    if not ids or any(i in special for i in ids):
        raise UserError(f"pivotal.init {word!r} is no word this model's tokenizer knows (it gives "
                        f"{'no token' if not ids else 'special tokens'}); use a word such as 'person', or random")
    return ids


def check_config(cfg) -> None:
    """Pivotal tuning's settings, refused in one line before any weight loads: a trigger word that the instance
    prompt holds (the tokens' place), an init word the base tokenizer knows."""
    c = cfg.pivotal
    if not c.trigger.strip() or c.trigger != c.trigger.strip():
        raise UserError(f"pivotal.trigger {c.trigger!r} must be a word (the one prompt.instance uses for the subject, "
                        "e.g. TOK)")
    if not _word(c.trigger).search(cfg.prompt.instance):
        raise UserError(f"pivotal tuning needs a place for its tokens: pivotal.trigger {c.trigger!r} is not a word of "
                        f"prompt.instance {cfg.prompt.instance!r}; write it there (e.g. 'a photo of {c.trigger} "
                        "person') or set pivotal.trigger to the prompt's trigger word")
    if c.init != "random":
        word_ids(load_tokenizer(cfg.model.ref), c.init)


class Pivotal:
    """The pivotal-tuning part of a LoRA run: its tokens in the prompts, their embedding rows with their own optimizer
    group (a `frac` key: the loop stops it after that fraction of the steps), the other rows restored."""

    def __init__(self, cfg):
        check_config(cfg)
        self.c, self.ref, self.seed = cfg.pivotal, cfg.model.ref, cfg.train.seed
        self.tokens = tokens_of(self.c.tokens)

    def text(self, text: str) -> str:
        """A prompt with the trigger replaced by the tokens."""
        return replace_trigger(text, self.c.trigger, self.tokens)

    def add_tokens(self, comps) -> None:
        """The tokens join the tokenizer, rows for them the embedding table (before freezing: resizing makes a new
        table, whose weight would otherwise train)."""
        tokenizer = comps.tokenizer
        self.init = None if self.c.init == "random" else word_ids(tokenizer, self.c.init)
        self.base = len(tokenizer)  # rows of the base vocabulary; the new ones follow it
        if tokenizer.add_tokens(self.tokens) != len(self.tokens):
            raise UserError(f"the tokenizer of {self.ref} already holds {' or '.join(self.tokens)}; pivotal tuning "
                            "adds new tokens to a base model's tokenizer")
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        assert self.ids == list(range(self.base, self.base + len(self.tokens))), self.ids
        comps.text_encoder.resize_token_embeddings(len(tokenizer))

    def group(self, comps) -> dict:
        """Initialise the new rows (random: N(0, σ²) with σ the base rows' std, as the advanced script; a word: row i
        = its token i mod n, as diffusers' flux script's --initializer_concept), keep the base rows for `after_step`,
        and return the embedding table's optimizer group (no weight decay, as the textual_inversion recipe)."""
        emb = comps.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            if self.init is None:
                noise = torch.randn(len(self.ids), emb.shape[1], generator=torch.Generator().manual_seed(self.seed))
                emb[self.base:] = noise.to(emb.device, emb.dtype) * emb[:self.base].std()
            else:
                emb[self.base:] = emb[[self.init[i % len(self.init)] for i in range(len(self.ids))]]
        self.original = emb[:self.base].detach().clone()
        emb.requires_grad_(True)
        return {"params": [emb], "lr": self.c.lr, "weight_decay": 0.0, "frac": self.c.frac}

    def after_step(self, comps) -> None:
        """The base rows back as they were (the optimizer moved the whole table; only the new rows learn)."""
        with torch.no_grad():
            comps.text_encoder.get_input_embeddings().weight[:self.base].copy_(self.original)

    def rows(self, comps) -> torch.Tensor:
        """The trained vectors (tokens, width), fp32 on the CPU."""
        return comps.text_encoder.get_input_embeddings().weight[self.base:].detach().float().cpu().contiguous()

    def trainable_count(self, comps, total: int) -> int:
        """`total` trainable values with the embedding table counted as its new rows only."""
        emb = comps.text_encoder.get_input_embeddings().weight
        return total - emb.numel() + len(self.tokens) * emb.shape[1]

    def saved_bytes(self, comps) -> int:
        """fp32 vectors in the embedding file."""
        return 4 * len(self.tokens) * comps.text_encoder.get_input_embeddings().weight.shape[1]

    def settings(self) -> dict:
        return {"pivotal": {"tokens": len(self.tokens), "trigger": self.c.trigger, "init": self.c.init,
                            "lr": self.c.lr, "frac": self.c.frac}}

    def save(self, folder: Path, comps, *, name: str) -> dict:
        """Write `<name>_emb.safetensors`; the manifest's fields."""
        file = embeddings_file(name)
        save_file({KEY: self.rows(comps)}, str(Path(folder) / file), metadata={"customgen_tokens": "".join(self.tokens)})
        return {"embeddings": file, "tokens": list(self.tokens), "token": "".join(self.tokens)}


class PivotalHooks:
    """The Method hooks of pivotal tuning, for a method that holds `self.pivotal` (a Pivotal, or None when
    pivotal.tokens is 0): the tokens in every prompt, the base rows restored, the text encoder in fp32."""

    pivotal_tuning = True
    pivotal: Pivotal | None = None

    def caption(self, record_caption: str, generator: torch.Generator) -> str:
        text = super().caption(record_caption, generator)
        return self.pivotal.text(text) if self.pivotal else text

    def default_prompt(self) -> str:
        text = super().default_prompt()
        return self.pivotal.text(text) if self.pivotal else text

    def validation_prompts(self) -> list[str]:
        return [self.pivotal.text(p) if self.pivotal else p for p in super().validation_prompts()]

    def after_step(self, comps) -> None:
        super().after_step(comps)
        if self.pivotal:
            self.pivotal.after_step(comps)

    def text_encoder_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # the trained table sits inside the text encoder: fp32 as for Textual Inversion (CPU LayerNorm refuses fp32
        # activations beside half-precision weights; diffusers' TI example keeps it fp32 too)
        return torch.float32 if self.pivotal else super().text_encoder_dtype(weight_dtype)

    def trainable_count(self, comps) -> int:
        total = super().trainable_count(comps)
        return self.pivotal.trainable_count(comps, total) if self.pivotal else total


# --- inference ---------------------------------------------------------------------------------------------
def check_artifact(style, width: int) -> None:
    """The embedding file an artifact names: this text encoder's width, one row per token (one line otherwise)."""
    m = style.manifest
    path = style.folder / m.embeddings
    check_embeddings(path, width)
    with readable(path) as f:
        shape = f.get_slice(KEY).get_shape() if KEY in f.keys() else None
    if shape is None or len(shape) != 2 or shape[0] != len(m.tokens):
        raise refuse(path, f"expected {KEY} of {len(m.tokens)} rows for the tokens {''.join(m.tokens)}")


def single_file_refusal(style) -> UserError:
    """The line `customgen export --format single-file` answers for an artifact with token embeddings."""
    return UserError(f"{style.name} holds pivotal tuning's embeddings ({style.manifest.embeddings}), which a single-file "
                     "checkpoint cannot carry (every SD1 tool expects the original embedding table): export --format "
                     "diffusers, or give the tool its LoRA and embedding files")


def load_tokens(pipe, style, aliases: int = 0) -> dict[str, str]:
    """Load an artifact's embeddings through stock `load_textual_inversion` (its token list); a token the tokenizer
    already holds (another pivotal style's) is loaded under an alias `<s0-N>`. Returns token → loaded token."""
    m, vocab = style.manifest, pipe.tokenizer.get_vocab()
    loaded = {t: t if t not in vocab else f"{t[:-1]}-{aliases}>" for t in m.tokens}
    try:
        vectors = load_file(str(style.folder / m.embeddings))[KEY]
        pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=list(loaded.values()),
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load the tokens of {style.name} ({first_line(err)}); {RETRAIN}") from err
    return loaded


def aliased(text: str, loaded: dict[str, str]) -> str:
    """`text` with each token replaced by the name it was loaded under."""
    for token, name in loaded.items():
        text = text.replace(token, name) if name != token else text
    return text
