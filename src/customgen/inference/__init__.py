"""Inference: the style library, img2img stylization, text-to-image, masks, style images, structure guidance.

    from customgen.inference import stylize, generate, Request
    img = stylize("photo.jpg", ["impressionism"], stylization=0.7, model="tiny", seed=0)

Names are imported on first use (PEP 562), so `customgen --help` does not pay for torch and diffusers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "stylize": "img2img", "generate": "txt2img",
    "Request": "customgen.request", "DEFAULTS": "customgen.request", "stylization_knobs": "customgen.request",
    "Style": "library", "StyleLibrary": "library", "load_style": "library", "default_styles_dir": "library",
    "Session": "session", "get_session": "session", "clear_sessions": "session", "SCHEDULERS": "session",
    "load_contents": "images", "save_image": "images", "read_settings": "images", "canny_edges": "images",
    "nearest_style": "nearest",
    "sweep": "grid", "plot_grid": "grid", "timing_table": "grid", "save_grid": "grid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
