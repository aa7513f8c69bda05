"""Stylize every (point, content) pair once: outputs on disk are reused, so an interrupted evaluation resumes.

A *point* is one model (a library style, or the plain SD img2img baseline) at one strength and style scale.
Each output PNG carries its settings (customgen.inference metadata) plus the generation time and peak
memory, so a re-run needs nothing but the images; settings that differ from the config are an error
unless `overwrite`. Under `accelerate launch` each process generates every n-th (point, content) pair on its
own device and the main process merges the lists (`merge`).
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from customgen import inference
from customgen.errors import Notice, UserError
from customgen.inference.images import read_settings, save_image, with_settings
from customgen.memory import peak_memory, sync
from customgen.models import resolve_ref

BASELINE = "baseline"  # model and method name of plain SD img2img (no style)
IP_ADAPTER = "ip-adapter"  # method of the IP-Adapter rows: no trained weights, a reference image as style image
EVAL_KEY = "eval"  # key in the PNG settings holding seconds / peak memory of the generation
RANKS = ".ranks"  # OUT/.ranks/<rank>.json: each process's outputs while a multi-process evaluation merges them


@dataclass(frozen=True)
class Point:
    """One model at one strength and style scale (scale is nan for the baseline)."""

    model: str  # library style name, or BASELINE
    method: str  # manifest method, or BASELINE
    kind: str  # the artifact's kind name (customgen.kinds), or BASELINE
    strength: float
    scale: float

    @property
    def folder(self) -> str:
        """images/<model>/s<strength>_w<scale> (stable across runs)."""
        scale = "none" if math.isnan(self.scale) else f"{self.scale:g}"
        return f"{self.model}/s{self.strength:g}_w{scale}"


@dataclass
class Output:
    """A generated image for (point, content): where it is, what it cost, whether it was reused."""

    point: Point
    content: Path
    path: Path
    seconds: float
    peak_memory_bytes: int | None
    reused: bool


def baseline_point(strength: float) -> Point:
    return Point(BASELINE, BASELINE, BASELINE, float(strength), math.nan)


def ip_point(reference: str, strength: float, scale: float) -> Point:
    """The IP-Adapter on one reference style's first reference image (model `ip-adapter@<style>`)."""
    return Point(f"{IP_ADAPTER}@{reference}", IP_ADAPTER, IP_ADAPTER, float(strength), float(scale))


def ip_reference(point: Point) -> str | None:
    """The reference style of an IP-Adapter point (None for other points)."""
    return point.model.split("@", 1)[1] if point.method == IP_ADAPTER else None


def style_point(style, strength: float, scale: float) -> Point:
    """A style at (strength, scale); the scale applies to kinds that have one (LoRA), the others run at 1."""
    kind = style.kind
    return Point(style.name, style.method, kind.name, float(strength), float(scale) if kind.has_scale else 1.0)


def output_names(contents: list[Path]) -> dict[Path, str]:
    """content → PNG file name (its stem; an index suffix where two contents share a stem)."""
    seen: dict[str, int] = {}
    names = {}
    for c in contents:
        n = seen.get(c.stem, 0)
        seen[c.stem] = n + 1
        names[c] = f"{c.stem}.png" if n == 0 else f"{c.stem}-{n}.png"
    return names


def expected_settings(point: Point, content: Path, e, model_ref: str) -> dict:
    """The settings an output for (point, content) must have been made with."""
    trained = point.model != BASELINE and point.method != IP_ADAPTER
    styles = [{"name": point.model, "scale": point.scale}] if trained else []
    model = resolve_ref(model_ref).value  # as the session records it (aliases, local paths resolved)
    local = lambda p: str(Path(p).expanduser()) if p else None  # noqa: E731 - as stylize records the files
    return {"model": model, "strength": point.strength, "seed": e.seed, "steps": e.steps,
            "scheduler": e.scheduler, "guidance": e.guidance, "size": e.size, "content": content.name,
            "styles": styles, "structure": e.structure or None,
            "controlnet": local(e.controlnet) if e.structure else None,
            "ip_adapter": local(e.ip_adapter) if point.method == IP_ADAPTER else None}


def found_settings(s: dict) -> dict:
    """The comparable part of the settings stored in an output PNG."""
    return {"model": s.get("model"), "strength": s.get("strength"), "seed": s.get("seed"), "steps": s.get("steps"),
            "scheduler": s.get("scheduler"), "guidance": s.get("guidance"),
            "size": min(s.get("working_size") or [0]), "content": Path(s.get("content") or "").name,
            "styles": [{"name": x.get("name"), "scale": x.get("scale")} for x in s.get("styles", [])],
            "structure": s.get("structure"), "controlnet": s.get("controlnet"), "ip_adapter": s.get("ip_adapter")}


def reuse(path: Path, want: dict, *, found=found_settings) -> dict | None:
    """The stored settings of an existing output made with `want` (compared with `found(stored)`); UserError when
    made with other settings; None (generate it again, with a Notice) when the file cannot be read whole: a kill or
    a full disk cut it short."""
    try:
        with Image.open(path) as img:
            img.load()  # every pixel: a truncated PNG fails here, not later while scoring
            stored = read_settings(img)
    except (OSError, ValueError, SyntaxError) as err:  # PIL: OSError (truncated, unidentified); JSON: ValueError
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        warnings.warn(f"{path} is unreadable ({detail}); generating it again", Notice, stacklevel=2)
        return None
    if not stored:
        raise UserError(f"{path} holds no customgen settings (not made by this evaluation); "
                        "delete it or pass --overwrite")
    have = found(stored)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{path} was made with {k}={have.get(k)!r}, this run uses {want[k]!r}; "
                        "pass --overwrite to regenerate or choose another eval.output")
    return stored


def stylize_one(point: Point, content: Path, style_folder: Path | None, cfg, *, device=None,
                style_image: Path | None = None):
    """One output through customgen.inference.stylize (looked up at call time, so tests can count calls);
    `style_folder`: the artifact folder or style file; an IP-Adapter point takes `style_image` through
    eval.ip_adapter."""
    e = cfg.eval
    styles = None if style_folder is None else [str(style_folder)]
    scale = None if style_folder is None else point.scale
    request = e.request(cfg.model.ref, strength=point.strength, scale=scale, dtype=cfg.model.dtype).replace(device=device)
    if point.method == IP_ADAPTER:
        request = request.replace(style_image=str(style_image), style_image_mode="ip-adapter", ip_adapter=e.ip_adapter,
                                  image_encoder=e.image_encoder or None, style_image_scale=point.scale)
    with peak_memory() as mem:
        sync()
        t0 = time.perf_counter()
        img = inference.stylize(str(content), styles, request, styles_dir=e.styles)
        sync()
        seconds = time.perf_counter() - t0
    return img, seconds, mem.peak_bytes


def generate(points: list[Point], inputs, cfg, out: Path, *, overwrite: bool = False, progress: bool = True,
             rank: int = 0, world: int = 1, device=None) -> list[Output]:
    """This process's share of the (point, content) outputs under OUT/images — every `world`-th pair of the grid,
    starting at `rank` — generating only those not on disk yet."""
    folders = {s.name: s.key for s in inputs.styles}  # the artifact folder, or the file
    names = output_names(inputs.contents)
    grid = [(point, content) for point in points for content in inputs.contents][rank::world]
    plan = []  # every existing output is checked before anything runs: a mismatch fails fast, in one line
    for point, content in grid:
        path = out / "images" / point.folder / names[content]
        want = expected_settings(point, content, cfg.eval, cfg.model.ref)
        plan.append((point, content, path, reuse(path, want) if path.is_file() and not overwrite else None))
    outputs = []
    todo = sum(stored is None for *_, stored in plan)
    bar = tqdm(total=todo, desc="stylize", unit="img", disable=not progress or todo == 0)
    for point, content, path, stored in plan:
        if stored is not None:
            cost = stored.get(EVAL_KEY, {})
            outputs.append(Output(point, content, path, float(cost.get("seconds", math.nan)),
                                  cost.get("peak_memory_bytes"), True))
            continue
        bar.set_postfix_str(f"{point.model} s={point.strength:g}", refresh=False)
        ref = ip_reference(point)
        img, seconds, peak = stylize_one(point, content, folders.get(point.model), cfg, device=device,
                                         style_image=inputs.references[ref][0] if ref else None)
        settings = json.loads(img.info.get("customgen", "{}"))
        settings[EVAL_KEY] = {"seconds": seconds, "peak_memory_bytes": peak}
        save_image(with_settings(img, settings), path, overwrite=True)
        outputs.append(Output(point, content, path, seconds, peak, False))
        bar.update()
    bar.close()
    return outputs


def exchange(mine: list, folder: Path, state) -> dict[str, dict] | None:
    """Every process's images (records with path, seconds, peak_memory_bytes and reused) as rows by path, on
    the main process; None elsewhere. Each process writes folder/<rank>.json, then all wait; the main process
    reads them all and removes the folder."""
    rows = [{"path": str(o.path), "seconds": o.seconds, "peak": o.peak_memory_bytes, "reused": o.reused} for o in mine]
    if state.num_processes > 1:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{state.process_index}.json").write_text(json.dumps(rows))
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        rows = [r for rank in range(state.num_processes) for r in json.loads((folder / f"{rank}.json").read_text())]
        shutil.rmtree(folder)
    return {r["path"]: r for r in rows}


def merge(mine: list[Output], points: list[Point], inputs, out: Path, state) -> list[Output] | None:
    """Every process's outputs, in grid order, on the main process (None elsewhere); a single process returns its
    own list."""
    if state.num_processes == 1:
        return mine
    done = exchange(mine, out / RANKS, state)
    if done is None:
        return None
    names = output_names(inputs.contents)
    outputs = []
    for point in points:
        for content in inputs.contents:
            r = done[str(out / "images" / point.folder / names[content])]
            outputs.append(Output(point, content, Path(r["path"]), r["seconds"], r["peak"], r["reused"]))
    return outputs
