"""Prompts for styles: defaults from the manifests, and Textual Inversion scale as prompt-embedding interpolation.

A TI style at scale w uses embeds = E(prompt without its token) + w·(E(prompt) − E(prompt without its token)),
Compel's down-weighting rule (w = 1: the plain prompt; w = 0: the prompt without the token).
"""
from __future__ import annotations

from customgen.inference.library import Style


def style_prompt(session, style: Style) -> str:
    """A style's default prompt, with its token replaced by the alias it was loaded under (if any)."""
    return with_aliases(session, [style], style.default_prompt)


def with_aliases(session, styles: list[Style], text: str) -> str:
    """Replace TI tokens that had to be loaded under another name (two styles sharing one token)."""
    for style in styles:
        token = style.manifest.token
        if style.kind == "textual_inversion" and token and session.token(style) != token:
            text = text.replace(token, session.token(style))
    return text


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
    """Pipeline prompt arguments: plain strings, or interpolated embeddings when a TI style has scale != 1."""
    ti = [(session.token(s), float(w)) for s, w in specs if s.kind == "textual_inversion"]
    if all(w == 1.0 for _, w in ti) or not any(t in prompt for t, _ in ti):
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    tokens = [t for t, _ in ti]
    encode = lambda text: pipe.encode_prompt(text, pipe.unet.device, 1, False)[0]  # noqa: E731 - (1, 77, D)
    none = encode(without_tokens(prompt, tokens))
    embeds = none.clone()
    for token, weight in ti:
        only = encode(without_tokens(prompt, [t for t in tokens if t != token]))
        embeds = embeds + weight * (only - none)
    return {"prompt_embeds": embeds, "negative_prompt": negative_prompt}
