"""`customgen bench`: customgen side by side with stock diffusers doing the same job, in one process, on the same
weights, with alternating runs.

    customgen bench --model sd15-random --cap-gib 15          # a GPU (Kaggle T4: the real figures)
    customgen bench --model tiny --size 64 --steps 4          # plumbing check (what the tests run)

Jobs: `stylize` (no style vs StableDiffusionImg2ImgPipeline; every kind against each way stock tools apply it),
`overhead` (per-image time outside the UNet/VAE/text encoder, with its breakdown), `train` (one optimizer step per
recipe against diffusers' example-script step), `perceptual` (the LPIPS + Gram step against the L2 step, and its
pieces), `memory` (each recipe's predicted peak GPU memory against its real run at --size under --cap-gib; not in
the default jobs). Writes OUT/NAME.json and OUT/NAME.md (customgen.bench.report).
"""
from __future__ import annotations

import gc
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from customgen.bench import fixtures
from customgen.bench.memory import memory_job
from customgen.bench.perceptual import perceptual_job
from customgen.bench.report import with_rates, write_report
from customgen.bench.stylize import StylizeBench, fewstep_pair, stock_overhead
from customgen.bench.timing import device_peak
from customgen.bench.train import train_pair
from customgen.errors import UserError
from customgen.inference.images import writable_target
from customgen.kinds import RECIPES, package_versions
from customgen.memory import probe
from customgen.request import DEFAULT_STRENGTH, DEFAULTS

JOBS = ("stylize", "overhead", "fewstep", "train", "perceptual", "memory")
DEFAULT_JOBS = ("stylize", "overhead", "fewstep", "train", "perceptual")  # memory trains every recipe at --size


@dataclass
class BenchSettings:
    """What to bench and how (the CLI's options)."""

    model: str = "sd15-random"  # model reference; sd15-random: SD v1.5 shapes, random weights
    jobs: list[str] = field(default_factory=lambda: list(DEFAULT_JOBS))
    size: int = 512  # stylize working size (px)
    steps: int = DEFAULTS.steps  # stylize scheduler steps (img2img runs steps × strength of them)
    strength: float = DEFAULT_STRENGTH
    scheduler: str = DEFAULTS.scheduler
    train_resolution: int = 256  # training-step resolution (px)
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    pairs: list[str] = field(default_factory=list)  # stylize pairs whose label contains one of these ([]: all)
    fewstep_file: str = ""  # the few-step LoRA of the fewstep job (LCM/TCD/Hyper-SD); "": a random LCM-shaped one
    fewstep_steps: int = 4  # its steps
    repeats: int = 4  # timed runs per side, alternating (A B, B A, ...), after one warm-up each
    overhead_images: int = 5
    flops: bool = True  # count each job's FLOPs (one more run per side)
    cap_gib: float = 0.0  # cap CUDA memory at this many GiB (15: a T4 on a bigger GPU); 0: no cap
    device: str | None = None
    dtype: str | None = None
    out: str = "results/benchmarks"  # folder of NAME.json and NAME.md (missing folders are created)
    name: str = ""  # file name (default bench_<model>_<device>)
    overwrite: bool = False  # replace NAME.json and NAME.md of an earlier run
    command: str = ""

    def check(self) -> "BenchSettings":
        unknown = sorted(set(self.jobs) - set(JOBS))
        if unknown:
            raise UserError(f"unknown bench job {unknown[0]!r}; choose from {', '.join(JOBS)}")
        bad = sorted(set(self.recipes) - set(RECIPES))
        if bad:
            raise UserError(f"unknown recipe {bad[0]!r}; choose from {', '.join(RECIPES)}")
        if self.repeats < 1 or self.overhead_images < 1:
            raise UserError("--repeats and --overhead-images must be at least 1")
        return self


def cap_memory(info, cap_gib: float) -> None:
    """Emulate a smaller GPU (a 15 GiB T4) on a bigger one."""
    if info.device.startswith("cuda") and cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / info.total_bytes))


def header(s: BenchSettings, info) -> dict:
    peak = device_peak(info.name) if info.device.startswith("cuda") else None
    return {"command": s.command or "customgen.bench.run_bench(...)", "model": s.model,
            "device": {"device": info.device, "name": info.name, "total_bytes": info.total_bytes,
                       "dtype": str(info.dtype).replace("torch.", ""), "cap_gib": s.cap_gib or None,
                       "peak_label": peak[0] if peak else None, "peak_tflops": peak[1] if peak else None,
                       "cpu_threads": torch.get_num_threads(), "host": platform.node()},
            "versions": package_versions() | {"python": platform.python_version()},
            "settings": {k: v for k, v in vars(s).items() if k not in ("command", "out", "name", "overwrite")}}


def guarded(label: dict, job, peak) -> dict:
    """Run one pair; a pair that does not fit in (capped) GPU memory is recorded as "oom", not hidden."""
    name = next(iter(label.values()))
    try:
        row = with_rates(job(), peak) | {"status": "ok"}
        print(f"bench: {name}: median ratio {row['median_ratio']:.3f}", file=sys.stderr, flush=True)
        return row
    except torch.cuda.OutOfMemoryError as err:
        gc.collect()
        torch.cuda.empty_cache()
        print(f"bench: {name}: out of memory", file=sys.stderr, flush=True)
        return label | {"status": "oom", "error": str(err).splitlines()[0]}


class Report:
    """The report being filled: every finished pair is written at once (OUT/NAME.json and .md), so a long run
    that is stopped keeps what it measured; `finished` is set at the end."""

    def __init__(self, rep: dict, out: Path, name: str, peak):
        self.rep, self.out, self.name, self.peak = rep, out, name, peak

    def add(self, section: str, label: dict, job) -> None:
        self.rep.setdefault(section, []).append(guarded(label, job, self.peak))
        self.save()

    def save(self) -> tuple[Path, Path]:
        return write_report(self.rep, self.out, self.name)


def stylize_jobs(s: BenchSettings, info, data: dict, work: Path, report: Report) -> None:
    """Random-weight styles of every kind, our session, then the pairs and the overhead breakdown."""
    lib = work / "styles"
    for recipe in fixtures.style_recipes():
        fixtures.make_style(recipe, s.model, lib / recipe)
    bench = StylizeBench(s.model, lib, fixtures.content_image(data, s.size), device=info.device, dtype=info.dtype,
                         size=s.size, steps=s.steps, strength=s.strength)
    if "stylize" in s.jobs:
        for pair in (p for p in bench.pairs() if not s.pairs or any(k in p[0] for k in s.pairs)):
            report.add("stylize", {"pair": pair[0]}, lambda p=pair: bench.run_pair(*p, repeats=s.repeats, flops=s.flops))
    if "fewstep" in s.jobs:
        path = Path(s.fewstep_file) if s.fewstep_file else fixtures.fewstep_file(lib, work / "lcm")
        report.add("fewstep", {"pair": path.name}, lambda: fewstep_pair(bench, path, steps=s.fewstep_steps,
                                                                        repeats=s.repeats, flops=s.flops))
    if "overhead" in s.jobs:
        styles = [[]] + [[name] for name in sorted(p.name for p in lib.iterdir())]
        report.rep["overhead"] = {"customgen": [bench.overhead(st, images=s.overhead_images) for st in styles],
                                  "stock": stock_overhead(bench, images=s.overhead_images)}
        report.save()


def run_bench(settings: BenchSettings) -> tuple[dict, tuple[Path, Path]]:
    """Run the jobs, write the JSON and markdown (after every pair); returns (report, paths)."""
    s = settings.check()
    info = probe(s.device, s.dtype)
    cap_memory(info, s.cap_gib)
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{s.model}_{info.name}".lower()).strip("-")
    out, name = Path(s.out), s.name or f"bench_{slug}"
    for path in (out / f"{name}.json", out / f"{name}.md"):  # refused before any job runs
        writable_target(path, overwrite=s.overwrite)
    report = Report(header(s, info), out, name, device_peak(info.name) if info.device.startswith("cuda") else None)
    with tempfile.TemporaryDirectory(prefix="customgen-bench-") as tmp:
        work = Path(tmp)
        data = fixtures.write_data(work / "data", size=max(s.size, s.train_resolution))
        if {"stylize", "overhead", "fewstep"} & set(s.jobs):
            stylize_jobs(s, info, data, work, report)
        for r in s.recipes if "train" in s.jobs else []:
            report.add("training", {"recipe": r}, lambda r=r: train_pair(
                r, s.model, data, work / "train", resolution=s.train_resolution, repeats=s.repeats, flops=s.flops))
        if "perceptual" in s.jobs:
            report.add("perceptual", {"recipe": "perceptual"}, lambda: perceptual_job(
                s.model, data, work / "perceptual", resolution=s.train_resolution, repeats=s.repeats, flops=s.flops))
        for r in s.recipes if "memory" in s.jobs else []:
            report.rep.setdefault("memory", []).append(
                memory_job(r, s.model, data, work / "memory", resolution=s.size, cap_gib=s.cap_gib, info=info))
            print(f"bench: memory {r}: {report.rep['memory'][-1]['ratio_allocated']:.3f} of predicted",
                  file=sys.stderr, flush=True)
            report.save()
    report.rep["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report.rep, report.save()


__all__ = ["BenchSettings", "DEFAULT_JOBS", "JOBS", "run_bench"]
