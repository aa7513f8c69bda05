"""Stylize pairs: `customgen.stylize` against stock diffusers doing the same img2img job on the same weights.

Stock sides are fresh pipelines over a second copy of the model, each style applied the way a diffusers user
applies it (the kind's `stock_variants`: `load_lora_weights` unfused and fused, `load_textual_inversion`, a
merged DreamBooth UNet); one stock scheduler per pipeline, reused across calls as a user would.
"""
from __future__ import annotations

import gc
import statistics
import time

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from customgen.bench.timing import ModelClock, Side, alternate, model_modules
from customgen.inference import Session, StyleLibrary, read_settings, stylize
from customgen.inference.session import make_scheduler
from customgen.memory import sync
from customgen.models import load_components
from customgen.request import Request

OVERHEAD_PHASES = ("resize", "prepare", "finish")  # customgen's own laps around the pipeline call


def stock_pipeline(model: str, *, device, dtype, scheduler: str) -> StableDiffusionImg2ImgPipeline:
    """A stock img2img pipeline over a fresh copy of `model`, no safety checker, its own scheduler."""
    c = load_components(model, device=device, dtype=dtype)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, safety_checker=None,
        scheduler=make_scheduler(scheduler, c.scheduler.config), feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_check(ours, stock) -> dict:
    """Whether two PIL outputs are equal, and the largest per-pixel difference in grey levels."""
    a, b = (np.asarray(x, dtype=np.int16) for x in (ours, stock))
    diff = np.abs(a - b) if a.shape == b.shape else None
    return {"equal": bool(diff is not None and not diff.any()),
            "max_diff": None if diff is None else int(diff.max()),
            "mean_diff": None if diff is None else float(diff.mean())}


class StylizeBench:
    """Our session (loaded once) and the request every pair uses."""

    def __init__(self, model: str, library, content, *, device, dtype, size: int, steps: int, strength: float,
                 seed: int = 0):
        self.model, self.library, self.content, self.device, self.dtype = model, library, content, device, dtype
        self.session = Session(load_components(model, device=device, dtype=dtype))
        self.request = Request(model=self.session, steps=steps, strength=strength, seed=seed, size=size)

    def ours(self, styles: list[str]):
        """One customgen stylize call (scale 1), returning a callable for the timing loop."""
        return lambda: stylize(self.content, styles or None, self.request, styles_dir=self.library)

    def stock(self, pipe, prompt: str):
        req = self.request
        return lambda: pipe(prompt=prompt, image=self.content, strength=req.strength, num_inference_steps=req.steps,
                            guidance_scale=req.guidance, generator=torch.Generator("cpu").manual_seed(req.seed)).images[0]

    def pairs(self) -> list[tuple]:
        """(label, our styles, style or None, stock variant, must the outputs be equal) for no style and for every
        stock variant of every library style's kind."""
        library = StyleLibrary(self.library)
        out = [("no style vs StableDiffusionImg2ImgPipeline", [], None, "", True)]
        for name in library.names():
            style = library.resolve(name)
            for variant, exact in style.kind.stock_variants().items():
                out.append((f"{style.kind.name} vs {variant}", [name], style, variant, exact))
        return out

    def run_pair(self, label: str, styles: list[str], style, variant: str, exact: bool, *, repeats: int,
                 flops: bool) -> dict:
        """Alternating timed runs of one pair, then the pixel check of their last outputs."""
        ours = Side("customgen", self.ours(styles))
        prompt = read_settings(ours.run())["prompt"]  # loads the style; the stock side gets the same prompt
        pipe = stock_pipeline(self.model, device=self.device, dtype=self.dtype, scheduler=self.request.scheduler)
        if style is not None:
            style.kind.load_stock(pipe, style, variant)
        stock = Side("stock", self.stock(pipe, prompt))
        result = alternate(ours, stock, repeats=repeats, flops=flops)
        pixels = pixel_check(ours.output, stock.output)
        del pipe, stock
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"pair": label, "styles": styles, "prompt": prompt, "must_equal": exact, **pixels, **result}

    def overhead(self, styles: list[str], *, images: int) -> dict:
        """Per image: wall time minus UNet/VAE/text-encoder time, split into the stock pipeline's own internals
        (pipeline call minus model time) and customgen's own work around the call (its laps, and the request,
        library and activation outside them); medians in milliseconds."""
        self.ours(styles)()  # warm: style loaded and fused
        clock, rows = ModelClock(model_modules(self.session.pipeline("img2img"))), []
        self.session.timings = {}
        try:
            for _ in range(images):
                clock.reset()
                self.session.timings.clear()
                sync()
                start = time.perf_counter()
                self.ours(styles)()
                sync()
                rows.append(_overhead_row(time.perf_counter() - start, dict(clock.seconds), self.session.timings))
        finally:
            self.session.timings = None
            clock.close()
        return {"styles": styles, "images": images,
                **{k: statistics.median(r[k] for r in rows) for k in rows[0]}}


def fewstep_pair(bench: StylizeBench, path, *, steps: int, repeats: int, flops: bool) -> dict:
    """customgen with a few-step LoRA file (its own scheduler, `steps` steps, guidance 1 as LCM-LoRA and TCD are
    sampled) against the stock pipeline without it at the bench's steps and scheduler: what the file saves."""
    style = StyleLibrary(bench.library).resolve(str(path))
    sampler = style.manifest.training.get("sampler") or {"schedulers": [bench.request.scheduler]}
    request = bench.request.replace(steps=steps, scheduler=sampler["schedulers"][0], guidance=1.0)
    ours = Side("customgen", lambda: stylize(bench.content, [str(path)], request, styles_dir=bench.library))
    pipe = stock_pipeline(bench.model, device=bench.device, dtype=bench.dtype, scheduler=bench.request.scheduler)
    stock = Side("stock", bench.stock(pipe, ""))
    result = alternate(ours, stock, repeats=repeats, flops=flops)
    del pipe, stock
    gc.collect()
    return {"pair": f"{style.name} ({request.scheduler}, {steps} steps, guidance 1) vs stock "
                    f"({bench.request.scheduler}, {bench.request.steps} steps, guidance {bench.request.guidance})",
            "file": str(path), "steps": steps, "scheduler": request.scheduler, "stock_steps": bench.request.steps,
            **result}


def _overhead_row(total: float, model: dict, laps: dict) -> dict:
    """One image's overhead breakdown in milliseconds."""
    ms = {k: 1000 * sum(v) for k, v in laps.items()}
    model_ms = 1000 * sum(model.values())
    row = {"total_ms": 1000 * total, "model_ms": model_ms, "overhead_ms": 1000 * total - model_ms,
           "pipeline_internal_ms": ms.get("pipeline", 0.0) - model_ms,
           "customgen_own_ms": 1000 * total - ms.get("pipeline", 0.0),
           "call_outside_laps_ms": 1000 * total - sum(ms.values())}
    return row | {f"{k}_ms": ms.get(k, 0.0) for k in OVERHEAD_PHASES} | {
        f"{k}_ms": 1000 * v for k, v in model.items()}


def stock_overhead(bench: StylizeBench, *, images: int) -> dict:
    """The stock pipeline's own per-image overhead (call minus model time), for comparison."""
    pipe = stock_pipeline(bench.model, device=bench.device, dtype=bench.dtype, scheduler=bench.request.scheduler)
    run = bench.stock(pipe, "")
    run()
    clock, rows = ModelClock(model_modules(pipe)), []
    try:
        for _ in range(images):
            clock.reset()
            sync()
            start = time.perf_counter()
            run()
            sync()
            total, model = time.perf_counter() - start, sum(clock.seconds.values())
            rows.append({"total_ms": 1000 * total, "model_ms": 1000 * model, "overhead_ms": 1000 * (total - model)})
    finally:
        clock.close()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}
