"""Generate every (point, prompt) batch once: images on disk are reused, so an interrupted evaluation resumes.

A *point* is one set of weights: a subject at one step (a snapshot or the final artifact), or the base model (the
baseline, shared by every subject whose prompts it has). A *shot* is one txt2img call of a point on one prompt:
`eval.samples_per_prompt` images from one generator seeded `eval.seed`, so every step of every subject and the
baseline start from the same noise. Images go to OUT/subject_images/<subject>/step-NNNNNN/<prompt>/<i>.png (the
baseline: OUT/subject_images/baseline/<prompt>/<i>.png), each with its settings and cost in its PNG text. Under
`accelerate launch` each process makes every n-th shot and the main process gathers the list.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from customgen import inference
from customgen.evaluate.generate import BASELINE, EVAL_KEY, exchange, reuse
from customgen.inference.images import save_image, with_settings
from customgen.memory import peak_memory, sync
from customgen.models import resolve_ref

IMAGES = "subject_images"  # OUT/subject_images/...
RANKS = ".subject-ranks"  # OUT/.subject-ranks/<rank>.json while a multi-process evaluation gathers its images
COMPARED = ("model", "seed", "steps", "scheduler", "guidance", "size", "batch_size", "batch_index")


@dataclass(frozen=True)
class Point:
    """One set of weights: a subject's artifact or snapshot at `step`, or the base model (folder None, step 0)."""

    subject: str  # library name of the subject ("" for the baseline)
    step: int
    folder: Path | None
    identity: str  # what made the weights (customgen.evaluate.subjects.inputs.SubjectStep.identity)

    @property
    def model(self) -> str:
        return BASELINE if self.folder is None else self.subject

    @property
    def where(self) -> str:
        """Its image folder below OUT/subject_images."""
        return BASELINE if self.folder is None else f"{self.subject}/step-{self.step:06d}"


BASE_POINT = Point("", 0, None, BASELINE)


@dataclass(frozen=True)
class Shot:
    """One txt2img batch: a point on one prompt."""

    point: Point
    prompt: str


@dataclass
class Sample:
    """One generated image: which shot and batch index, where it is, what it cost, whether it was reused."""

    shot: Shot
    index: int
    path: Path
    seconds: float  # the batch's generation time / its size
    peak_memory_bytes: int | None
    reused: bool


def slug(prompt: str) -> str:
    """A folder name for a prompt: its words (at most 60 characters) and 8 hex digits of its sha1."""
    words = re.sub(r"[^0-9A-Za-z]+", "_", prompt).strip("_")[:60] or "empty"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


def image_path(out: Path, shot: Shot, index: int) -> Path:
    return out / IMAGES / shot.point.where / slug(shot.prompt) / f"{index}.png"


def points_of(subject) -> list[Point]:
    """The baseline, then the subject's steps in order."""
    return [BASE_POINT] + [Point(subject.name, s.step, s.folder, s.identity) for s in subject.steps]


def plan_shots(subjects) -> list[Shot]:
    """Every (point, prompt) the subjects need, each once (the baseline's shots are shared across subjects)."""
    shots = []
    for subject in subjects:
        for point in points_of(subject):
            shots += [Shot(point, p) for p in (*subject.prompts, subject.class_prompt)]
    return list(dict.fromkeys(shots))


def expected(shot: Shot, index: int, cfg) -> dict:
    """The settings image `index` of a shot must have been made with."""
    e = cfg.eval
    return {"model": resolve_ref(cfg.model.ref).value, "seed": e.seed, "steps": e.steps, "scheduler": e.scheduler,
            "guidance": e.guidance, "size": [e.size, e.size], "batch_size": e.samples_per_prompt,
            "batch_index": index, "prompt": shot.prompt, "weights": shot.point.identity}


def found(stored: dict) -> dict:
    """The comparable part of a stored image's settings (the prompt as asked, before any token alias)."""
    cost = stored.get(EVAL_KEY, {})
    return {k: stored.get(k) for k in COMPARED} | {"prompt": cost.get("prompt"), "weights": cost.get("weights")}


def render(shot: Shot, cfg, *, device=None) -> tuple[list, float, int | None]:
    """One batch through customgen.inference.generate (looked up at call time, so tests can count calls)."""
    e = cfg.eval
    request = e.request(cfg.model.ref, dtype=cfg.model.dtype).replace(num_images=e.samples_per_prompt, device=device)
    styles = None if shot.point.folder is None else [str(shot.point.folder)]
    with peak_memory() as mem:
        sync()
        t0 = time.perf_counter()
        images = inference.generate(shot.prompt, styles, request)
        sync()
        seconds = time.perf_counter() - t0
    return (images if isinstance(images, list) else [images]), seconds, mem.peak_bytes


def stored_shot(shot: Shot, cfg, out: Path, overwrite: bool) -> list[dict] | None:
    """The stored settings of every image of a shot when all of them can be reused, else None."""
    if overwrite:
        return None
    stored = []
    for i in range(cfg.eval.samples_per_prompt):
        path = image_path(out, shot, i)
        stored.append(reuse(path, expected(shot, i, cfg), found=found) if path.is_file() else None)
    return None if any(s is None for s in stored) else stored


def generate_shots(shots: list[Shot], cfg, out: Path, *, overwrite: bool = False, progress: bool = True,
                   rank: int = 0, world: int = 1, device=None) -> list[Sample]:
    """This process's share of the shots (every `world`-th, from `rank`), generating only those not on disk."""
    plan = [(shot, stored_shot(shot, cfg, out, overwrite)) for shot in shots[rank::world]]  # checks first
    samples = []
    bar = tqdm(total=sum(s is None for _, s in plan), desc="generate", unit="batch",
               disable=not progress or all(s is not None for _, s in plan))
    for shot, stored in plan:
        if stored is not None:
            samples += [Sample(shot, i, image_path(out, shot, i), float(s[EVAL_KEY].get("seconds", math.nan)),
                               s[EVAL_KEY].get("peak_memory_bytes"), True) for i, s in enumerate(stored)]
            continue
        bar.set_postfix_str(f"{shot.point.model} step {shot.point.step}", refresh=False)
        images, seconds, peak = render(shot, cfg, device=device)
        per_image = seconds / len(images)
        for i, img in enumerate(images):
            settings = json.loads(img.info.get("customgen", "{}"))
            settings[EVAL_KEY] = {"seconds": per_image, "peak_memory_bytes": peak, "prompt": shot.prompt,
                                  "weights": shot.point.identity}
            path = save_image(with_settings(img, settings), image_path(out, shot, i), overwrite=True)
            samples.append(Sample(shot, i, path, per_image, peak, False))
        bar.update()
    bar.close()
    return samples


def gather(mine: list[Sample], shots: list[Shot], cfg, out: Path, state) -> list[Sample] | None:
    """Every process's samples, in shot order, on the main process (None elsewhere)."""
    if state.num_processes == 1:
        return mine
    done = exchange(mine, out / RANKS, state)
    if done is None:
        return None
    samples = []
    for shot in shots:
        for i in range(cfg.eval.samples_per_prompt):
            r = done[str(image_path(out, shot, i))]
            samples.append(Sample(shot, i, Path(r["path"]), r["seconds"], r["peak"], r["reused"]))
    return samples
