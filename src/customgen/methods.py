"""Method objects: what differs between LoRA, DreamBooth and Textual Inversion inside the one loop.

Each supplies the same hooks: `setup` (freeze, add/unfreeze, return optimizer parameter groups),
`captions` (the prompt of each example), `after_step`, `trained_params` (for checkpoints) and `save`.
"""
from __future__ import annotations

import torch

from customgen import artifacts
from customgen.errors import UserError
from customgen.freeze import freeze, scope_names, unfreeze

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


class Method:
    """Base: the UNet is frozen, the text encoder too, captions come from the config or the data."""

    name = "base"
    kind = ""

    def __init__(self, cfg):
        self.cfg = cfg
        self.trains_text_encoder = False

    def setup(self, comps) -> list[dict]:
        """Freeze everything, make the method's parameters trainable; optimizer parameter groups."""
        raise TypeError(f"{type(self).__name__} must define setup()")

    def trained_params(self, comps) -> dict[str, torch.Tensor]:
        """Name → trainable tensor, for checkpoints and the 'frozen stays frozen' check."""
        return {f"unet.{n}": p for n, p in comps.unet.named_parameters() if p.requires_grad} | {
            f"text_encoder.{n}": p for n, p in comps.text_encoder.named_parameters() if p.requires_grad}

    def trainable_count(self, comps) -> int:
        """Parameters the method really learns (TI: only the new rows)."""
        return sum(p.numel() for p in self.trained_params(comps).values())

    def caption(self, record_caption: str, generator: torch.Generator) -> str:
        """The prompt of one example: the instance prompt, else the record's caption, else ""."""
        return self.cfg.prompt.instance or record_caption or ""

    def after_step(self, comps) -> None:
        """Called after every optimizer step (TI restores the frozen embedding rows)."""
        return None

    def default_prompt(self) -> str:
        return self.cfg.prompt.instance

    def manifest_fields(self) -> dict:
        return {}

    def save(self, folder, comps) -> dict:
        """Write the weights into `folder`; returns manifest fields."""
        raise TypeError(f"{type(self).__name__} must define save()")


class LoraMethod(Method):
    """LoRA (Hu et al. 2021) on the UNet attention projections, optionally on the text encoder too."""

    name, kind = "lora", "lora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trains_text_encoder = cfg.lora.text_encoder

    def _lora_config(self, targets):
        from peft import LoraConfig

        c = self.cfg.lora
        return LoraConfig(r=c.rank, lora_alpha=c.alpha if c.alpha is not None else c.rank,
                          init_lora_weights=c.init, target_modules=list(targets))

    def setup(self, comps) -> list[dict]:
        freeze(comps.unet, comps.vae, comps.text_encoder)
        comps.unet.add_adapter(self._lora_config(self.cfg.lora.targets))
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.train.lr}]
        if self.trains_text_encoder:
            comps.text_encoder.add_adapter(self._lora_config(("q_proj", "k_proj", "v_proj", "out_proj")))
            groups.append({"params": [p for p in comps.text_encoder.parameters() if p.requires_grad],
                           "lr": self.cfg.lora.text_encoder_lr})
        return groups

    def manifest_fields(self) -> dict:
        c = self.cfg.lora
        return {"rank": c.rank, "alpha": float(c.alpha if c.alpha is not None else c.rank), "text_encoder": c.text_encoder}

    def save(self, folder, comps) -> dict:
        artifacts.save_lora(folder, comps.unet, comps.text_encoder if self.trains_text_encoder else None)
        return {"weights": artifacts.LORA_WEIGHTS, **self.manifest_fields()}


class DreamBoothMethod(Method):
    """DreamBooth (Ruiz et al. 2023) on a scope of UNet parameters; the artifact holds only those."""

    name, kind = "dreambooth", "dreambooth"

    def setup(self, comps) -> list[dict]:
        freeze(comps.unet, comps.vae, comps.text_encoder)
        self.names = scope_names(comps.unet, self.cfg.dreambooth.scope)
        return [{"params": unfreeze(comps.unet, self.names), "lr": self.cfg.train.lr}]

    def manifest_fields(self) -> dict:
        return {"scope": self.cfg.dreambooth.scope}

    def save(self, folder, comps) -> dict:
        artifacts.save_dreambooth(folder, comps.unet, self.names, scope=self.cfg.dreambooth.scope)
        return {"weights": artifacts.DREAMBOOTH_WEIGHTS, **self.manifest_fields()}


class TextualInversionMethod(Method):
    """Textual Inversion (Gal et al. 2022): only the new token's vectors learn; other rows are restored."""

    name, kind = "textual_inversion", "textual_inversion"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trains_text_encoder = True
        c = cfg.textual_inversion
        self.tokens = [c.token] + [f"{c.token}_{i}" for i in range(1, c.num_vectors)]
        self.templates = STYLE_TEMPLATES if c.templates == "style" else OBJECT_TEMPLATES

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
        i = int(torch.randint(len(self.templates), (1,), generator=generator))
        return self.templates[i].format(" ".join(self.tokens))

    def after_step(self, comps) -> None:
        emb = comps.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[self.keep] = self.original[self.keep].to(emb.device, emb.dtype)

    def default_prompt(self) -> str:
        return self.templates[0].format(self.cfg.textual_inversion.token)

    def manifest_fields(self) -> dict:
        return {"token": self.cfg.textual_inversion.token}

    def save(self, folder, comps) -> dict:
        artifacts.save_textual_inversion(folder, comps.text_encoder, self.token_ids, token=self.cfg.textual_inversion.token)
        return {"weights": artifacts.TI_WEIGHTS, **self.manifest_fields()}


METHODS = {  # config `method` → method object; LoRA recipes differ only by config
    "lora_style": LoraMethod,
    "dreambooth_lora_subject": LoraMethod,
    "lora_anime_kohya": LoraMethod,
    "dreambooth_style": DreamBoothMethod,
    "textual_inversion": TextualInversionMethod,
}


def make_method(cfg) -> Method:
    """The method object for `cfg.method`."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    method = METHODS[cfg.method](cfg)
    method.name = cfg.method
    return method
