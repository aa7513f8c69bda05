"""Prompts for styles: defaults from the manifests, token aliases, and prompt-embedding interpolation.

A kind may weight tokens (Textual Inversion's scale): for (token, w) the prompt embeddings become
E(prompt without the token) + w·(E(prompt) − E(prompt without the token)), Compel's down-weighting rule
(w = 1: the plain prompt; w = 0: the prompt without the token).

`conditioning` encodes a prompt once while the session's active styles stay the same: the pipeline gets the
tensors it would have computed from the strings, so outputs are unchanged and the text encoder runs once.
"""
from __future__ import annotations

import torch

from customgen.inference.library import Style


def with_aliases(session, styles: list[Style], text: str) -> str:
    """`text` with each style's token replaced by what the session loaded it under (two styles, one token)."""
    for style in styles:
        text = style.kind.prompt(session, style, text)
    return text


def style_prompt(session, style: Style) -> str:
    """A style's default prompt, with its token replaced by the alias it was loaded under (if any)."""
    return with_aliases(session, [style], style.default_prompt)


def build_prompt(session, specs: list[tuple[Style, float]], prompt: str | None) -> str:
    """The user's prompt (tokens aliased), else the styles' default prompts joined with commas."""
    styles = [s for s, _ in specs]
    if prompt is not None:
        return with_aliases(session, styles, prompt)
    return ", ".join(p for p in (style_prompt(session, s) for s in styles) if p)


def without_tokens(text: str, tokens: list[str]) -> str:
    """`text` with the given tokens removed and whitespace tidied."""
    for token in tokens:
        text = text.replace(token, " ")
    return " ".join(text.split())


def prompt_kwargs(session, pipe, specs: list[tuple[Style, float]], prompt: str, negative_prompt: str) -> dict:
    """Pipeline prompt arguments: plain strings, or interpolated embeddings when a weighted token has w != 1."""
    weighted = [tw for s, w in specs for tw in s.kind.token_weights(session, s, w)]
    if all(w == 1.0 for _, w in weighted) or not any(t in prompt for t, _ in weighted):
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    tokens = [t for t, _ in weighted]
    encode = lambda text: pipe.encode_prompt(text, pipe.unet.device, 1, False)[0]  # noqa: E731 - (1, 77, D)
    none = encode(without_tokens(prompt, tokens))
    embeds = none.clone()
    for token, weight in weighted:
        only = encode(without_tokens(prompt, [t for t in tokens if t != token]))
        embeds = embeds + weight * (only - none)
    return {"prompt_embeds": embeds, "negative_prompt": negative_prompt}


def conditioning(session, pipe, specs: list[tuple[Style, float]], prompt: str, negative_prompt: str, *,
                 guidance: float, batch: int = 1) -> dict:
    """prompt_embeds (+ negative_prompt_embeds under classifier-free guidance) for `batch` images, encoded as the
    pipeline encodes the strings and cached in the session until the active styles change."""
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipelines' own test
    key = (prompt, negative_prompt, cfg, tuple((s.key, float(w)) for s, w in specs))
    if key not in session.prompts:
        kw = prompt_kwargs(session, pipe, specs, prompt, negative_prompt)
        with torch.inference_mode():
            session.prompts[key] = pipe.encode_prompt(kw.get("prompt"), pipe._execution_device, 1, cfg,
                                                      negative_prompt, prompt_embeds=kw.get("prompt_embeds"))
    embeds, negative = session.prompts[key]  # (1, 77, D) each; negative is None without guidance
    out = {"prompt_embeds": embeds.expand(batch, -1, -1)}
    if negative is not None:
        out["negative_prompt_embeds"] = negative.expand(batch, -1, -1)
    return out
