"""`customgen plan CONFIG`: the predicted peak GPU memory of a training run on a card, as a table or JSON.

    customgen plan configs/lora_style.yaml --model sd15-random --gpu t4
    customgen plan configs/dreambooth_style.yaml --gpu 12 --set train.batch_size=2 --json

Under `train.memory: auto` it shows the plan training would choose (customgen.train.fit); under `manual` the
settings as set. A card nothing fits is an error (exit 2) after the table of the smallest plan.
"""
from __future__ import annotations

import json

from customgen.budget import GIB, fixed_costs, parse_gpu
from customgen.config import Config
from customgen.errors import UserError
from customgen.memory import default_gpu
from customgen.train.data import settle_data
from customgen.train.fit import Fitted, describe, plan_for, refusal
from customgen.train.optimizers import check_optimizer

CAVEAT = ("a prediction (fake CUDA tensors, the run's own code) until `customgen bench --jobs memory` has measured "
          "this card")


def report(cfg: Config, fitted: Fitted, *, command: str = "") -> dict:
    """Everything the table shows, for machines: bytes per part, fixed costs with sources, the verdict."""
    e = fitted.estimate
    return {
        "command": command, "model": cfg.model.ref, "method": cfg.method, "mode": fitted.mode,
        "gpu": {"name": fitted.gpu.name, "total_bytes": fitted.gpu.total_bytes, "source": fitted.gpu.source},
        "settings": e.settings,
        "bytes": {"weights": e.weights, "gradients": e.gradients, "optimizer_state": e.optimizer_state,
                  "activations": e.activations, "step_peak": e.step_peak, "validation_peak": e.validation_peak,
                  "setup_peak": e.setup_peak, "assembly_peak": e.assembly_peak, "tensor_peak": e.peak},
        "fixed": fixed_costs(e.peak), "total_bytes": fitted.total, "fits": fitted.fits,
        "tried": fitted.tried, "notes": fitted.notes, "seconds": round(e.seconds, 2), "device": e.device,
        "caveat": CAVEAT,
    }


def format_report(rep: dict) -> str:
    """The plan as one table: the parts, the fixed costs, the total against the card, the verdict."""
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    b, s, gpu = rep["bytes"], rep["settings"], rep["gpu"]
    rows = [("weights", b["weights"], "parameters and buffers on the GPU during the step"),
            ("gradients", b["gradients"], "of the trainable parameters"),
            ("optimizer state", b["optimizer_state"], s["optimizer"]),
            ("activations peak", b["activations"], "the step's peak above the three lines above"),
            ("validation peak", b["validation_peak"], f"one {s['validation']} call, training state resident"),
            ("setup peak", b["setup_peak"], "latent caching" + (", class images" if s["prior"] else "")),
            ("assembly peak", b["assembly_peak"], "adapters, loss networks and their Gram targets"),
            ("tensor peak", b["tensor_peak"], "the largest of the step, validation, setup and assembly")]
    rows += [(f["name"], f["bytes"], f["source"]) for f in rep["fixed"]]
    lines = [f"{rep['method']} on {rep['model']} · {gpu['name']} ({gpu['total_bytes'] / GIB:.2f} GiB) · "
             f"memory {rep['mode']}",
             f"settings: {describe(s)}, validation {s['validation']}", "",
             f"{'':34}{'GiB':>8}"]
    lines += [f"{name:34}{gib(value)}  {note}" for name, value, note in rows]
    free = gpu["total_bytes"] - rep["total_bytes"]
    verdict = f"fits ({free / GIB:.2f} GiB to spare)" if rep["fits"] else f"does not fit ({-free / GIB:.2f} GiB short)"
    lines += [f"{'total':34}{gib(rep['total_bytes'])}  of {gpu['total_bytes'] / GIB:.2f} GiB: {verdict}",
              f"{'':42}card memory: {gpu['source']}", ""]
    lines += [f"tried: {t['rung']} → {t['total_bytes'] / GIB:.2f} GiB" for t in rep["tried"]]
    lines += [f"note: {n}" for n in rep["notes"]]
    lines.append(f"{CAVEAT}; estimated in {rep['seconds']:.1f} s")
    return "\n".join(lines)


def plan_command(cfg: Config, *, gpu: str | None, as_json: bool, command: str = "", emit=print) -> int:
    """The handler's work: the plan through `emit` (the CLI's: JSON alone on stdout); a card nothing fits is one
    `error:` line (exit 2) after the table."""
    check_optimizer(cfg)
    chosen = parse_gpu(gpu) if gpu else default_gpu()
    cfg = settle_data(cfg)  # as train() does before its plan: buckets checked, no latent cache under random crops
    fitted = plan_for(cfg, chosen)
    rep = report(cfg, fitted, command=command)
    emit(json.dumps(rep, indent=2) if as_json else format_report(rep))
    if not fitted.fits:
        raise UserError(refusal(cfg, fitted) if fitted.mode == "auto" else
                        f"the settings as set need {fitted.total / GIB:.2f} GiB, more than {chosen.name} "
                        f"({chosen.total_gib:.2f} GiB): set train.memory=auto or change what the table shows")
    return 0
