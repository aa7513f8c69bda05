"""Regenerate the peak-memory tables of docs/training_guide.md from `customgen plan --json`.

    python scripts/memory_table.py                      # rewrites the tables between the markers in the doc
    python scripts/memory_table.py --no-doc             # prints them only

Every recipe × {T4, P100, L4, A100-40GB} × batch {1, 2} × prior preservation {off, on} at 512 px on `sd15-random`
(the SD v1.5 architecture; fake CUDA tensors: no GPU, no weights), under `train.memory: auto` — what training would
choose on that card — and the configurations whose memory has been published (DreamBooth of the whole UNet on a
T4, under `train.memory: manual`). The JSON of every plan goes to results/benchmarks/memory_plan_sd15.json.
Estimates of the same settings are computed once (the cards differ in precision and 8-bit Adam).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from customgen import __version__  # noqa: E402
from customgen.budget import total_bytes  # noqa: E402
from customgen.cli import main  # noqa: E402
from customgen.config import config_hash, find_config, load_config  # noqa: E402
from customgen.train import fit  # noqa: E402

RECIPES = {"lora_style": [], "dreambooth_style": [], "textual_inversion": [], "dreambooth_lora_subject": [],
           "lora_anime_kohya": [], "dreambooth_style scope full": ["dreambooth.scope=full"]}  # the whole UNet too
GPUS = {"t4": "T4", "p100": "P100", "l4": "L4", "a100-40": "A100 40GB"}
START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
SHORT = {"gradient checkpointing": "ckpt", "8-bit Adam": "8-bit", "text encoder/VAE off the GPU": "offload"}
# ShivamShrirao/diffusers examples/dreambooth README, "Tested on Tesla T4 GPU" (whole UNet, 512 px, prior
# preservation, latents and text embeddings cached): (batch, accumulation, checkpointing, 8-bit Adam) -> GB
SHIVAM_T4 = {(1, 1, True, True): 9.92, (1, 1, False, True): 11.17, (2, 1, True, True): 10.4,
             (1, 1, True, False): 15.79, (2, 1, False, True): 13.67}


def recipe_config(recipe: str):
    return load_config(find_config(recipe))


def cached(estimate):
    """estimate_training memoised per (config, plan settings)."""
    memo = {}

    def run(cfg, plan):
        key = (config_hash(cfg), replace(plan, how="", predicted_bytes=None))
        if key not in memo:
            memo[key] = estimate(cfg, plan)
        return memo[key]
    return run


def plan(recipe: str, gpu: str, sets: list[str]) -> tuple[int, dict]:
    """`customgen plan --json` in this process for a recipe or preset name: (exit code, report)."""
    argv = ["plan", str(find_config(recipe)), "--model", "sd15-random", "--gpu", gpu, "--json"]
    for s in sets:
        argv += ["--set", s]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if not out.getvalue().strip():
        raise SystemExit(f"{' '.join(argv)} failed: {err.getvalue().strip().splitlines()[-1]}")
    try:
        return code, json.loads(out.getvalue())
    except json.JSONDecodeError:
        raise SystemExit(f"{' '.join(argv)} printed no JSON: {out.getvalue()[:300]!r}") from None


def cell(rep: dict) -> str:
    """`6.2 ✓ ckpt, 8-bit` — the predicted total (GiB), whether it fits, what memory auto turned on."""
    rungs = [t["rung"] for t in rep["tried"]]
    chosen = [SHORT.get(r, r.replace(" x ", "×")) for r in rungs[1:]] if rep["fits"] else []
    mark = "✓" if rep["fits"] else "✗"
    return f"{rep['total_bytes'] / 2**30:.1f} {mark}" + (f" {', '.join(chosen)}" if chosen else "")


def grid() -> tuple[list[str], list[dict]]:
    rows, reports = [], []
    for label, extra in RECIPES.items():
        recipe = label.split()[0]
        for prior in (False, True):
            for batch in (1, 2):
                sets = [*extra, f"train.batch_size={batch}", f"prompt.prior={str(prior).lower()}"]
                if prior and not recipe_config(recipe).prompt.class_prompt:
                    sets.append("prompt.class_prompt=a photo")  # recipes without one; its text costs nothing
                cells = []
                for gpu in GPUS:
                    _, rep = plan(recipe, gpu, sets)
                    reports.append(rep)
                    cells.append(cell(rep))
                name = f"`{recipe}`" + label[len(recipe):]
                rows.append(f"| {name} | {batch} | {'on' if prior else 'off'} | " + " | ".join(cells) + " |")
    head = ["| recipe | batch | prior | " + " | ".join(GPUS.values()) + " |", "|---|---:|---|" + "---|" * len(GPUS)]
    return head + rows, reports


def published() -> tuple[list[str], list[dict]]:
    """DreamBooth of the whole UNet on a T4 as published, under train.memory: manual."""
    lines = ["| batch × accumulation | checkpointing | 8-bit Adam | published (GB, T4) | predicted total GiB "
             "(training step only) |", "|---|---|---|---:|---:|"]
    reports = []
    for (batch, accum, ckpt, eight), gb in SHIVAM_T4.items():
        sets = ["dreambooth.scope=full", "prompt.prior=true", "train.memory=manual", f"train.batch_size={batch}",
                f"train.grad_accum={accum}", f"train.gradient_checkpointing={str(ckpt).lower()}",
                f"train.optimizer={'adamw8bit' if eight else 'adamw'}"]
        _, rep = plan("dreambooth_style", "t4", sets)
        reports.append(rep)
        step_total = total_bytes(rep["bytes"]["step_peak"])
        lines.append(f"| {batch} × {accum} | {'yes' if ckpt else 'no'} | {'yes' if eight else 'no'} | {gb} | "
                     f"{rep['total_bytes'] / 2**30:.2f} ({step_total / 2**30:.2f}) |")
    return lines, reports


def presets() -> tuple[list[str], list[dict]]:
    """The study presets (configs/studies) on a T4: the study's settings exactly (train.memory=manual) and what
    memory auto chooses."""
    lines = ["| preset | the study's settings (manual) | memory auto |", "|---|---:|---|"]
    reports = []
    for path in sorted((ROOT / "configs" / "studies").glob("*.yaml")):
        _, manual = plan(path.stem, "t4", ["train.memory=manual"])
        _, auto = plan(path.stem, "t4", [])
        reports += [manual, auto]
        lines.append(f"| `{path.stem}` | {manual['total_bytes'] / 2**30:.1f} {'✓' if manual['fits'] else '✗'} | "
                     f"{cell(auto)} |")
    return lines, reports


def main_() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "training_guide.md")
    parser.add_argument("--no-doc", action="store_true", help="print the tables, leave the doc alone")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "benchmarks" / "memory_plan_sd15.json")
    args = parser.parse_args()
    fit.estimate_training = cached(fit.estimate_training)
    table, reports = grid()
    pub, pub_reports = published()
    studies, study_reports = presets()
    command = "python scripts/memory_table.py"
    note = (f"Made by `{command}` (customgen {__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, CPU only, no GPU): `customgen plan "
            "--model sd15-random --gpu CARD --json` per cell. GiB predicted on the card with fixed costs; ✓ fits, ✗ "
            "does not (the smallest plan shown); after ✓, what memory auto turned on.")
    text = "\n".join([START, *table, "", note, "", *pub, "", "The study presets (`configs/studies`) on a T4, same command "
                      "and model:", "", *studies, "", END])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "model": "sd15-random", "plans": reports,
                                     "published_comparison": pub_reports, "study_presets": study_reports},
                                    indent=2) + "\n")
    if args.no_doc:
        print(text)
        return 0
    doc = args.doc.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{args.doc} has no {START} ... {END} markers")
    args.doc.write_text(doc[:doc.index(START)] + text + doc[doc.index(END) + len(END):])
    print(f"wrote the tables into {args.doc} and every plan into {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
