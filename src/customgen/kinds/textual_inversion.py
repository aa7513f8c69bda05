"""Textual Inversion (Gal et al. 2022): only the new token's embedding vectors learn. Recipe: `textual_inversion`.

Files: `learned_embeds.safetensors` = {token: (n_vectors, dim)}, what `pipe.load_textual_inversion` reads, and
`<name>.safetensors` = {"emb_params": (n_vectors, dim)}, the WebUI's own format, for a flat `embeddings` folder
of AUTOMATIC1111 / ComfyUI (the trigger word there is the file stem; diffusers reads it too). At
inference a TI style at scale w uses prompt embeddings E(prompt without its token) + w·(E(prompt) − E(prompt
without its token)), Compel's down-weighting rule (w = 1: the plain prompt; w = 0: the prompt without the token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from customgen.errors import UserError
from customgen.kinds.base import Kind, Method, Recipe
from customgen.kinds.files import export_stem, first_line, inside, tensor_values
from customgen.kinds.freeze import freeze
from customgen.kinds.validate import RETRAIN, check_embeddings
from customgen.models import build_pipeline

WEIGHTS = "learned_embeds.safetensors"
STYLE_TEMPLATES = (  # Textual Inversion prompt templates (Gal et al. 2022; diffusers' textual_inversion example)
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a picture in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a large painting in the style of {}", "a small painting in the style of {}", "a nice painting in the style of {}",
)
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}",
)


# --- files -------------------------------------------------------------------------------------------------
def save_textual_inversion(folder: str | Path, text_encoder, token_ids: list[int], *, token: str, name: str) -> str:
    """Save the learned vectors as {token: (n_vectors, dim)} (diffusers) and as `<name>.safetensors` with the
    WebUI's `emb_params` key; returns the export's file name."""
    weight = text_encoder.get_input_embeddings().weight
    embeds = weight[token_ids].detach().float().cpu().contiguous()
    save_file({token: embeds}, str(Path(folder) / WEIGHTS))
    export = f"{export_stem(name)}.safetensors"
    save_file({"emb_params": embeds}, str(Path(folder) / export), metadata={"customgen_token": token})
    return export


def load_textual_inversion(pipe, folder: str | Path, *, token: str, weights: str = WEIGHTS) -> None:
    """Load a TI artifact's `weights` file (stock loader; several vectors become token, token_1, ...)."""
    pipe.load_textual_inversion(str(Path(folder) / weights), token=token)


# --- training ----------------------------------------------------------------------------------------------
class TextualInversionMethod(Method):
    """Only the new token's vectors learn; the other embedding rows are restored after every step."""

    trains_text_encoder = True

    def __init__(self, cfg, kind):
        super().__init__(cfg, kind)
        c = cfg.textual_inversion
        self.tokens = [c.token] + [f"{c.token}_{i}" for i in range(1, c.num_vectors)]
        self.templates = STYLE_TEMPLATES if c.templates == "style" else OBJECT_TEMPLATES
        if c.caption:  # one fixed caption (the style plan: "sks style painting") instead of the templates
            if c.caption.count("{") != 1 or c.caption.count("}") != 1 or "{}" not in c.caption:
                raise UserError(f"textual_inversion.caption {c.caption!r} must hold {{}} once, where the token goes "
                                "(e.g. '{} painting')")
            self.templates = (c.caption,)

    def setup(self, comps) -> list[dict]:
        c = self.cfg.textual_inversion
        if comps.tokenizer.add_tokens(self.tokens) != len(self.tokens):
            raise UserError(f"token {c.token!r} is already in the tokenizer; choose a new one (e.g. <my-style>)")
        init = comps.tokenizer.encode(c.init_word, add_special_tokens=False)
        if not init:
            raise UserError(f"textual_inversion.init_word {c.init_word!r} gives no token; use a word like 'painting'")
        self.token_ids = comps.tokenizer.convert_tokens_to_ids(self.tokens)
        comps.text_encoder.resize_token_embeddings(len(comps.tokenizer))
        freeze(comps.unet, comps.vae, comps.text_encoder)
        emb = comps.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[self.token_ids] = emb[init].mean(0)  # a word of several tokens starts from their mean
        self.original = emb.detach().clone()
        self.keep = torch.ones(len(comps.tokenizer), dtype=torch.bool)
        self.keep[self.token_ids] = False
        emb.requires_grad_(True)
        return [{"params": [emb], "lr": self.cfg.train.lr, "weight_decay": 0.0}]

    def trainable_count(self, comps) -> int:
        return len(self.token_ids) * comps.text_encoder.get_input_embeddings().weight.shape[1]

    def caption(self, record_caption: str, generator: torch.Generator) -> str:
        """A template drawn from the example's generator, with the token (all its vectors) in place."""
        i = int(torch.randint(len(self.templates), (1,), generator=generator))
        return self.templates[i].format(" ".join(self.tokens))

    def after_step(self, comps) -> None:
        emb = comps.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[self.keep] = self.original[self.keep].to(emb.device, emb.dtype)

    def default_prompt(self) -> str:
        return self.templates[0].format(self.cfg.textual_inversion.token)

    def text_encoder_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # The embedding table trains in fp32 inside the text encoder; half-precision LayerNorm weights beside
        # fp32 activations fail on CPU ("mixed dtype") and lose precision on GPU. diffusers' TI example keeps the
        # whole text encoder in fp32 for the same reason.
        return torch.float32

    def settings(self) -> dict:
        c = self.cfg.textual_inversion
        return {"token": c.token, "num_vectors": c.num_vectors, "init_word": c.init_word,
                "captions": list(self.templates)}

    def saved_bytes(self, comps) -> int:
        """fp32 vectors of the new tokens, in two files: the diffusers file and the WebUI embedding."""
        width = comps.text_encoder.get_input_embeddings().weight.shape[1]
        return 2 * 4 * self.cfg.textual_inversion.num_vectors * width

    def save(self, folder: Path, comps, facts: dict) -> dict:
        token = self.cfg.textual_inversion.token
        export = save_textual_inversion(folder, comps.text_encoder, self.token_ids, token=token, name=facts["name"])
        return {"weights": WEIGHTS, "exports": [export], "token": token}


# --- inference ---------------------------------------------------------------------------------------------
@dataclass
class TextualInversionState:
    """TI styles loaded into one session: artifact folder → the token it was loaded under."""

    tokens: dict = field(default_factory=dict)


class TextualInversionKind(Kind):
    name = "textual_inversion"
    weights = WEIGHTS
    method_class = TextualInversionMethod
    recipes = (Recipe("textual_inversion", "textual_inversion", "style", "tab:green"),)

    def check(self, style, comps) -> None:
        width = comps.text_encoder.get_input_embeddings().weight.shape[1]
        check_embeddings(style.folder / style.manifest.weights, width)

    def merge(self, comps, style, scale: float, *, single_file: bool) -> None:
        """A diffusers folder can carry the token (tokenizer and embedding grow by it); a single file cannot:
        every SD1 tool expects the original 49,408-row embedding table."""
        if single_file:
            raise UserError(f"{style.name} is a Textual Inversion embedding, not a model: put "
                            f"{style.manifest.exports[0] if style.manifest.exports else WEIGHTS} into the tool's "
                            "embeddings folder instead of exporting a single-file checkpoint")
        if scale != 1.0:
            raise UserError("a Textual Inversion style exports at scale 1 (its scale acts on prompts, not weights)")
        load_textual_inversion(build_pipeline(comps, kind="txt2img"), style.folder, token=style.manifest.token,
                               weights=style.manifest.weights)

    def new_state(self) -> TextualInversionState:
        return TextualInversionState()

    def load(self, session, style) -> None:
        token = style.manifest.token
        if not token:
            raise UserError(f"{style.folder}: textual inversion manifest has no token")
        state = session.state(self)
        if token in session.comps.tokenizer.get_vocab():  # another style (or the vocabulary) has it: load an alias
            token = f"<{style.name}-{len(state.tokens)}>"
        try:
            load_textual_inversion(session.pipeline("img2img"), style.folder, token=token,
                                   weights=style.manifest.weights)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load textual inversion {style.name} ({first_line(err)}); {RETRAIN}") from err
        state.tokens[style.folder] = token

    def activate(self, session, active: list[tuple]) -> None:
        return None  # a token is active when the prompt holds it; its scale acts through token_weights

    def stock_variants(self) -> dict[str, bool]:
        return {"load_textual_inversion": True}

    def load_stock(self, pipe, style, variant: str) -> None:
        load_textual_inversion(pipe, style.folder, token=style.manifest.token, weights=style.manifest.weights)

    def loaded_token(self, session, style) -> str:
        """The token a style was loaded under (its own, or an alias when another style already took it)."""
        return session.state(self).tokens.get(style.folder, style.manifest.token)

    def prompt(self, session, style, text: str) -> str:
        token, loaded = style.manifest.token, self.loaded_token(session, style)
        return text.replace(token, loaded) if token and loaded != token else text

    def token_weights(self, session, style, scale: float) -> list[tuple[str, float]]:
        return [(self.loaded_token(session, style), float(scale))]

    def resident_bytes(self, session, style) -> int:
        """The embedding rows its tokens added to the text encoder."""
        emb = session.comps.text_encoder.get_input_embeddings().weight
        token = self.loaded_token(session, style)
        rows = sum(1 for t in session.comps.tokenizer.get_vocab() if t == token or t.startswith(f"{token}_"))
        return rows * emb.shape[1] * emb.element_size()

    def planned_bytes(self, style, element_size: int) -> int:
        """Its rows, from the embedding file's tensor shapes."""
        return tensor_values(inside(style.folder, style.manifest.weights)) * element_size
