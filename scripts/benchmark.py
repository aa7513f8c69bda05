"""Speed and peak memory of each training recipe and of img2img, for a model reference on this machine.

Meant for `sd15-random` on a GPU with memory capped like a 16 GB T4:
    python scripts/benchmark.py --model sd15-random --cap-gib 15 --out results/benchmarks/sd15_<device>.json
Training uses the recipes' own settings (GPU probe: fp16, gradient checkpointing, 8-bit Adam when available) on
synthetic images; a recipe that does not fit is recorded as "oom", not hidden. Random weights: time and memory
only, never quality.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from customgen.config import find_config, load_config
from customgen.data.samples import write_samples
from customgen.memory import peak_memory, probe

RECIPES = ("lora_style", "dreambooth_style", "textual_inversion", "dreambooth_lora_subject")


def bench_recipe(recipe: str, args, data: dict, work: Path) -> dict:
    """Median seconds per optimizer step and peak memory of `recipe` (after `args.warmup` steps)."""
    from customgen.train import build_run
    from customgen.train.loop import optimizer_step

    root = [f"data.root={data['wikiart']}", "data.style=Stripes"]
    if recipe == "dreambooth_lora_subject":
        root = [f"data.root={data['wikiart'] / 'Stripes'}"]
    cfg = load_config(find_config(recipe), [f"model.ref={args.model}", f"data.resolution={args.resolution}",
                                            "data.min_size=64", "prompt.num_class_images=2", "prompt.class_steps=2",
                                            *root])
    try:
        run = build_run(cfg, work / recipe)
        times = []
        with peak_memory() as peak:
            for step in range(args.warmup + args.steps):
                t = time.perf_counter()
                optimizer_step(run, step)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        return {"recipe": recipe, "seconds_per_step": statistics.median(times[args.warmup:]),
                "peak_memory_bytes": peak.peak_bytes or 0, "batch_size": cfg.train.batch_size,
                "plan": run.plan.__dict__, "status": "ok"}
    except torch.cuda.OutOfMemoryError as err:
        return {"recipe": recipe, "status": "oom", "error": str(err).splitlines()[0]}


def bench_img2img(args, data: dict) -> dict:
    """Median seconds per image (DPM-Solver++, args.infer_steps) and peak memory of stylize without a style."""
    from customgen.inference import stylize

    content = sorted(data["coco"].iterdir())[0]
    kw = dict(model=args.model, strength=0.6, steps=args.infer_steps, size=args.resolution, seed=0)
    stylize(content, **kw)  # warm-up: loads the model once
    times = []
    with peak_memory() as peak:
        for _ in range(args.repeats):
            t = time.perf_counter()
            stylize(content, **kw)
            times.append(time.perf_counter() - t)
    return {"seconds_per_image": statistics.median(times), "peak_memory_bytes": peak.peak_bytes or 0,
            "steps": args.infer_steps, "resolution": args.resolution}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-random")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--infer-steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap-gib", type=float, default=15.0, help="cap CUDA memory like a T4 (0: no cap)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    info = probe()
    if torch.cuda.is_available() and args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / info.total_bytes))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_samples(Path(tmp) / "data", per_style=4, n_content=2)
        rows = [bench_recipe(r, args, data, Path(tmp) / "runs") for r in args.recipes.split(",") if r]
        infer = bench_img2img(args, data)
    report = {"command": "python scripts/benchmark.py " + " ".join(argv or []), "model": args.model,
              "device": info.name, "device_memory_bytes": info.total_bytes, "cap_gib": args.cap_gib,
              "torch": torch.__version__, "host": platform.node(), "training": rows, "img2img": infer,
              "note": "random weights: time and memory only, not quality"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    import sys

    print(json.dumps(main(sys.argv[1:]), indent=2, default=str))
