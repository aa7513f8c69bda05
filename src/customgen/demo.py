"""Gradio demo over customgen.inference: stylize an uploaded photo with a library style (or a style image),
an optional painted mask and structure guidance; a text-to-image tab. Local by default (127.0.0.1, no share
link unless asked), upload size and pixel limits, and every bad input shown as a message, never a traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers

import gradio as gr  # noqa: E402 - after the analytics switch above

from customgen.data.io import ImageRejected, probe_image  # noqa: E402
from customgen.errors import Notice, UserError  # noqa: E402
from customgen.inference.images import load_content, read_settings, save_image  # noqa: E402
from customgen.inference.img2img import stylize  # noqa: E402
from customgen.inference.library import StyleLibrary  # noqa: E402
from customgen.inference.session import get_session  # noqa: E402
from customgen.inference.txt2img import generate  # noqa: E402
from customgen.models.addons import controlnet_file, ip_adapter_file  # noqa: E402
from customgen.models.weightfile import family  # noqa: E402
from customgen.request import (DEFAULT_MODEL, DEFAULT_SCALE, DEFAULT_STYLIZATION, DEFAULTS, MAX_IMAGES,  # noqa: E402
                               MAX_SEED, STYLE_IMAGE_MODES, Request, STRUCTURES as STRUCTURE_NAMES)

log = logging.getLogger("customgen.demo")
MAX_FILE_SIZE = "20mb"  # per upload, enforced by Gradio before our code runs
MAX_PIXELS = 4096 * 4096  # larger uploads are refused from the header (decoding them would stall the demo)
FORMATS = "a PNG, JPEG or WebP photo"
NONE = "(none)"
ALL = "all methods"
STRUCTURES = ("none", *STRUCTURE_NAMES)
HELP = ("Upload a photo, pick a style from the library (or upload a style image), set the stylization and "
        "click **Stylize**. Paint on the mask to stylize only part of the image. The PNG download carries "
        "every setting in its metadata.")


def _ui(fn):
    """Run a handler: UserError → gr.Error (message only), Notices → gr.Warning, other failures logged."""
    @functools.wraps(fn)
    def wrapped(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", Notice)
            try:
                result = fn(*args)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001 - the UI shows one line; the log keeps the traceback
                log.exception("demo handler failed")
                raise gr.Error(f"unexpected failure: {type(err).__name__}: {err}", print_exception=False) from None
        for w in caught:
            if issubclass(w.category, Notice):
                gr.Warning(str(w.message))
        return result
    return wrapped


def upload_message(name: str, err: ImageRejected, max_pixels: int) -> str:
    """One plain sentence for an upload that is not a usable image."""
    if err.reason == "empty":
        return f"{name} is empty (0 bytes): upload {FORMATS}."
    if err.reason == "too_large":
        return (f"{name} has more than {max_pixels / 1e6:.1f} million pixels, this demo's limit: resize it and "
                "upload it again.")
    if err.reason == "not_an_image":
        return f"{name} is not an image: upload {FORMATS}."
    return f"{name} cannot be read as an image ({err.reason}): upload another copy or {FORMATS}."


def checked_upload(image: gr.Image, max_pixels) -> gr.Image:
    """Check what is uploaded to `image` before Gradio decodes it: a non-image, an empty file or one over
    `max_pixels()` is one plain sentence, not "Could not preprocess input component ..." (customgen.data.io checks).
    Wraps the instance's preprocess: a gr.Image subclass would make Gradio write a .pyi stub into this package."""
    decode = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:
            name = Path(payload.orig_name or payload.path).name
            try:
                probe_image(payload.path, max_pixels=max_pixels())
            except ImageRejected as err:
                raise gr.Error(upload_message(name, err, max_pixels()), print_exception=False) from None
        return decode(payload)

    image.preprocess = preprocess
    return image


def mask_background(payload, max_pixels: int) -> dict | None:
    """The mask editor's value for Gradio's raw upload payload of the content (preprocess=False): the photo as
    background, or None (an empty editor) for a file that is not a usable image. It raises nothing: the content is
    checked once, by the Stylize click, so a bad upload is one message, not one per change event."""
    path = (payload or {}).get("path")
    if not path:
        return None
    try:
        probe_image(path, max_pixels=max_pixels, decode=False)  # the header only: the browser draws the photo
    except ImageRejected:
        return None
    return {"background": path, "layers": [], "composite": path}


def checked_seed(number: gr.Number) -> gr.Number:
    """A seed box whose bad values (NaN, a fraction) are one sentence too, not Gradio's ValueError."""
    convert = number.preprocess

    def preprocess(payload):
        try:
            return convert(payload)
        except gr.Error:
            raise
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"The seed must be a whole number from 0 to {MAX_SEED}, or -1 for a random one.",
                           print_exception=False) from None

    number.preprocess = preprocess
    return number


def seed_box() -> gr.Number:
    """The seed input: -1 for a random seed, else 0..MAX_SEED (out-of-range values refused by Gradio)."""
    return checked_seed(gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)"))


def editor_mask(value) -> np.ndarray | None:
    """The painted strokes of a gr.ImageEditor value as a white-on-black mask; None when nothing is painted."""
    layers = (value or {}).get("layers") or []
    alphas = [np.asarray(layer)[..., 3] for layer in layers if layer is not None and np.asarray(layer).ndim == 3
              and np.asarray(layer).shape[-1] == 4]
    if not alphas or max(int(a.max()) for a in alphas) == 0:
        return None
    return np.where(np.maximum.reduce(alphas) > 0, 255, 0).astype(np.uint8)  # (H, W)


@dataclass(frozen=True)
class LocalAddons:
    """Local add-on weights the demo uses (Kaggle inputs with Internet off): a ControlNet for one structure, an
    IP-Adapter (+ its image encoder folder) for style images. None: the Hub's."""

    controlnet: str | None = None
    controlnet_structure: str = "canny"  # the conditioning the local ControlNet was trained on
    ip_adapter: str | None = None
    image_encoder: str | None = None

    def checked(self, model) -> "LocalAddons":
        """The files checked against the model's family (one line each), before the base model loads."""
        if self.image_encoder is not None and self.ip_adapter is None:
            raise UserError("--image-encoder is used only with --ip-adapter")
        if self.controlnet_structure not in STRUCTURE_NAMES:
            raise UserError(f"unknown ControlNet structure {self.controlnet_structure!r}; choose from "
                            f"{', '.join(STRUCTURE_NAMES)}")
        fam = family(model)
        net = controlnet_file(self.controlnet, fam) if self.controlnet is not None else None
        ip = ip_adapter_file(self.ip_adapter, self.image_encoder, fam) if self.ip_adapter is not None else None
        return LocalAddons(net, self.controlnet_structure, ip, None)

    def describe(self) -> str:
        """The local files as the page header names them ('' when none)."""
        parts = ([f"ControlNet ({self.controlnet_structure}): `{self.controlnet}`"] if self.controlnet else []) + \
            ([f"IP-Adapter: `{self.ip_adapter}`"] if self.ip_adapter else [])
        return "".join(f" · {p}" for p in parts)


class DemoState:
    """What the handlers share: the model reference, the style library, local add-ons and the output folder."""

    def __init__(self, model, styles_dir, device, dtype, max_pixels: int, cap_gib: float | None = None,
                 addons: LocalAddons | None = None):
        self.addons = (addons or LocalAddons()).checked(model)  # before the base model loads
        self.session = get_session(model, device=device, dtype=dtype)  # load now: errors show before the UI
        self.cap_gib = cap_gib  # batch and VAE slicing/tiling planned for this much GPU memory (None: the GPU)
        self.library = StyleLibrary(styles_dir)
        self.styles = {s.name: s for s in self.library.styles()}
        self.max_pixels = max_pixels
        self.out = Path(tempfile.mkdtemp(prefix="customgen-demo-"))

    def choices(self, method: str = ALL) -> list[str]:
        """Style names for the dropdown, filtered by method."""
        return [NONE] + [n for n, s in self.styles.items() if method in (ALL, None) or s.manifest.method == method]

    def methods(self) -> list[str]:
        return [ALL] + sorted({s.manifest.method for s in self.styles.values()})

    def table(self) -> list[list[str]]:
        return [[n, s.manifest.method, s.kind.name, s.manifest.base_model, s.default_prompt, triggers(s)]
                for n, s in self.styles.items()]

    def save(self, img, prefix: str) -> str:
        return str(save_image(img, self.out / f"{prefix}-{uuid.uuid4().hex[:8]}.png"))


def triggers(style) -> str:
    """The words that call a style up: a file's (embedding words, kohya's output name and top tags), else the
    artifact's token."""
    words = style.manifest.training.get("triggers") or ([style.manifest.token] if style.manifest.token else [])
    return ", ".join(words)


def _seed(value):
    """-1 (or any negative) → None (random); other values go to Request.check as they are."""
    return None if value is None or (isinstance(value, (int, float)) and value < 0) else value


def _int(value):
    """A checked whole number from the UI (Gradio sends floats) as an int; None stays None."""
    return None if value is None else int(value)


def stylize_handler(state: DemoState, content, style, style_image, mode, mask_value, stylization, steps, seed,
                    structure):
    """Stylize button: returns (result path, download path, settings)."""
    request = Request(stylization=stylization, steps=steps, seed=_seed(seed)).check()  # the UI's numbers, first
    if not content:
        raise UserError("upload a content image first")
    image = load_content(content, max_pixels=state.max_pixels)
    image.info["source"] = Path(content).name  # not the server's temp path
    if style_image:
        load_content(style_image, max_pixels=state.max_pixels)  # same limits for the style image
    styles = [state.styles[style]] if style and style != NONE else []
    structure = None if structure == "none" else structure
    local = state.addons
    request = request.replace(stylization=float(stylization), steps=int(steps), seed=_int(request.seed),
                              model=state.session, cap_gib=state.cap_gib, mask=editor_mask(mask_value),
                              style_image=style_image or None, style_image_mode=mode, structure=structure,
                              controlnet=local.controlnet if structure == local.controlnet_structure else None,
                              ip_adapter=local.ip_adapter if style_image and mode != "nearest" else None)
    out = stylize(image, styles, request, styles_dir=state.library.root)
    path = state.save(out, "stylized")
    return path, path, read_settings(out)


def generate_handler(state: DemoState, prompt, negative, style, scale, steps, guidance, seed, count):
    """Generate button: returns (gallery paths, download paths)."""
    request = Request(scales=scale, steps=steps, guidance=guidance, seed=_seed(seed), num_images=count).check()
    styles = [state.styles[style]] if style and style != NONE else []
    request = request.replace(scales=float(scale), steps=int(steps), guidance=float(guidance), seed=_int(request.seed),
                              num_images=int(count), model=state.session, negative_prompt=negative or "",
                              cap_gib=state.cap_gib)
    out = generate(prompt or None, styles, request, styles_dir=state.library.root)
    paths = [state.save(img, "generated") for img in (out if isinstance(out, list) else [out])]
    return paths, paths


def _stylize_tab(gr, state: DemoState) -> None:
    with gr.Row():
        content = gr.Image(type="filepath", label="Content", sources=["upload"], height=360, elem_id="content")
        result = gr.Image(type="filepath", label="Result", interactive=False, height=360, elem_id="result")
    with gr.Row():
        method = gr.Dropdown(state.methods(), value=ALL, label="Method", elem_id="method")
        style = gr.Dropdown(state.choices(), value=NONE, label="Style", elem_id="style")
        style_image = gr.Image(type="filepath", label="…or a style image", sources=["upload"], elem_id="style-image")
        mode = gr.Radio(list(STYLE_IMAGE_MODES), value=DEFAULTS.style_image_mode, label="Style image mode")
    with gr.Row():
        strength = gr.Slider(0, 1, value=round(DEFAULT_STYLIZATION, 2), step=0.01, label="Stylization",
                             elem_id="stylization")
        steps = gr.Slider(1, 50, value=DEFAULTS.steps, step=1, label="Steps")
        seed = seed_box()
        structure = gr.Radio(list(STRUCTURES), value="none", label="Structure guidance")
    with gr.Accordion("Mask (optional): paint where the style applies", open=False):
        mask = gr.ImageEditor(type="numpy", label="Mask", sources=[], elem_id="mask",
                              brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff"))
    for upload in (content, style_image):
        checked_upload(upload, lambda: state.max_pixels)  # the same cap the handler applies
    button = gr.Button("Stylize", variant="primary", elem_id="stylize")
    download = gr.File(label="Download (PNG with settings)", interactive=False, elem_id="download")
    settings = gr.JSON(label="Settings")
    method.change(lambda m: gr.Dropdown(choices=state.choices(m), value=NONE), method, style)
    # preprocess=False: the sync passes the upload's path on without the content check (Gradio fires `change`
    # twice when a photo replaces another; each would show the check's error before the click shows it again)
    content.change(lambda payload: mask_background(payload, state.max_pixels), content, mask, preprocess=False)
    button.click(_ui(functools.partial(stylize_handler, state)),
                 [content, style, style_image, mode, mask, strength, steps, seed, structure],
                 [result, download, settings], api_name="stylize")


def _generate_tab(gr, state: DemoState) -> None:
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks person wearing a suit", elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        style = gr.Dropdown(state.choices(), value=NONE, label="Style or subject")
        scale = gr.Slider(0, 1.5, value=DEFAULT_SCALE, step=0.05, label="Style scale")
        steps = gr.Slider(1, 50, value=DEFAULTS.steps, step=1, label="Steps")
        guidance = gr.Slider(0, 15, value=DEFAULTS.guidance, step=0.5, label="Guidance")
        seed = seed_box()
        count = gr.Slider(1, min(4, MAX_IMAGES), value=DEFAULTS.num_images, step=1, label="Images")
    button = gr.Button("Generate", variant="primary", elem_id="generate")
    gallery = gr.Gallery(label="Images", elem_id="gallery")
    files = gr.File(label="Download", file_count="multiple", interactive=False)
    button.click(_ui(functools.partial(generate_handler, state)),
                 [prompt, negative, style, scale, steps, guidance, seed, count], [gallery, files], api_name="generate")


def create_app(*, model=DEFAULT_MODEL, styles_dir=None, device=None, dtype=None,
               max_pixels: int = MAX_PIXELS, cap_gib: float | None = None, addons: LocalAddons | None = None):
    """Build the Gradio Blocks app (loads the base model once; does not launch)."""
    state = DemoState(model, styles_dir, device, dtype, max_pixels, cap_gib, addons)
    with gr.Blocks(title="customgen", analytics_enabled=False) as app:
        gr.Markdown(f"# customgen\n{HELP}\n\nModel: `{state.session.comps.ref}` · styles: `{state.library.root}`"
                    + state.addons.describe())
        with gr.Tab("Stylize"):
            _stylize_tab(gr, state)
        with gr.Tab("Text to image"):
            _generate_tab(gr, state)
        with gr.Tab("Library"):
            gr.Dataframe(state.table(), headers=["name", "method", "kind", "base model", "prompt", "triggers"],
                         interactive=False)
    app.queue(default_concurrency_limit=1)  # one generation at a time: the model is shared
    app.customgen_state = state
    return app


def launch(app, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False):
    """Serve the app on host:port (127.0.0.1 unless told); a public share link only with share=True."""
    if share:
        warnings.warn("--share makes the demo reachable by anyone with the link for 72 hours", Notice, stacklevel=2)
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                      prevent_thread_lock=prevent_thread_lock, allowed_paths=[str(app.customgen_state.out)],
                      show_error=True, quiet=True)


def cmd_demo(args) -> int:
    """Handler of `customgen demo`."""
    if args.styles is not None and not Path(args.styles).is_dir():
        raise UserError(f"--styles {args.styles} is not a folder (the style library: one artifact folder per style)")
    if args.cap_gib is not None and not 0 < args.cap_gib <= 4096:
        raise UserError(f"--cap-gib {args.cap_gib}: give a memory size in GiB between 0 and 4096")
    addons = LocalAddons(args.controlnet, args.controlnet_structure, args.ip_adapter, args.image_encoder)
    app = create_app(model=args.model, styles_dir=args.styles, device=args.device, dtype=args.dtype,
                     cap_gib=args.cap_gib, addons=addons)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0
