"""`customgen plan --sample stylize|generate`: one sampling call's predicted peak GPU memory on a card, with its
styles (artifacts or files from elsewhere) and local add-ons, before any weight loads.

    customgen plan --sample stylize --style downloads/ink_locon.safetensors --controlnet control_v11p_sd15_canny.pth \
        --size 768 --batch 4 --gpu t4
    customgen plan --sample generate --style my_lora --batch 4 --json

The prediction is the one stylize and generate make before each call (customgen.inference.fit): the base model's
architecture on a fake CUDA device in the card's dtype (bf16 where it computes bf16, else fp16), one denoising
step and the VAE decode, the add-ons' weights and activations, plus what each style keeps beside the base weights
(a LoRA adapter, embedding rows; a merged file nothing), read from its manifest or file; then the same ladder:
as asked, VAE slicing, a smaller batch (stylize only), VAE tiling. Every file is checked (and a file customgen
cannot use refused) as stylize checks it; nothing is downloaded and no weights load.
"""
from __future__ import annotations

import json
import re

import torch

from customgen.budget import GIB, Gpu, fixed_costs, parse_gpu
from customgen.errors import UserError
from customgen.inference.fit import ladder, too_big
from customgen.inference.library import StyleLibrary, check_compatible
from customgen.models.addons import controlnet_file, ip_adapter_file, planned_addons
from customgen.models.footprint import sampling_peak
from customgen.models.loading import load_architecture
from customgen.memory import default_gpu
from customgen.models.weightfile import family

CALLS = {"stylize": "img2img", "generate": "txt2img"}  # the command → the pipeline kind its calls run
CAVEAT = ("a prediction (fake CUDA tensors, the pipeline's own code) until `customgen bench --jobs memory` has "
          "measured this card")


def parse_size(text: str | int | None, default: int) -> tuple[int, int]:
    """--size N (square) or WxH → (height, width), multiples of 8 as the pipelines need."""
    if text is None:
        return default, default
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not m:
        raise UserError(f"--size {text!r}: give a side in pixels (512) or WIDTHxHEIGHT (768x512)")
    width = int(m.group(1))
    height = int(m.group(2) or width)
    if min(width, height) < 8 or max(width, height) > 8192 or width % 8 or height % 8:
        raise UserError(f"--size {text!r}: sides must be multiples of 8 between 8 and 8192 px")
    return height, width


def sampling_plan(*, model: str, call: str = "stylize", styles=(), styles_dir=None, controlnet=None,
                  ip_adapter=None, image_encoder=None, size=None, batch: int = 1, gpu: Gpu,
                  command: str = "") -> dict:
    """The plan as a JSON-able dict: the parts, the fixed costs, each rung tried, the one that fits (or none)."""
    if call not in CALLS:
        raise UserError(f"--sample {call!r}: choose stylize or generate")
    if int(batch) < 1:
        raise UserError(f"--batch {batch}: give at least 1")
    if controlnet is not None and call != "stylize":
        raise UserError("--controlnet guides stylize (img2img): plan it with --sample stylize")
    fam = family(model)
    net = controlnet_file(controlnet, fam) if controlnet is not None else None  # checked before anything else
    ip = ip_adapter_file(ip_adapter, image_encoder, fam) if ip_adapter is not None else None
    library = StyleLibrary(styles_dir)
    chosen = [library.resolve(s) for s in styles]
    comps = load_architecture(model)
    for style in chosen:
        check_compatible(style, comps)
    dtype = torch.bfloat16 if gpu.bf16 else torch.float16
    element = torch.empty((), dtype=dtype).element_size()
    style_rows = [{"name": s.name, "source": str(s.key), "kind": s.manifest.kind,
                   "bytes": s.kind.planned_bytes(s, element)} for s in chosen]
    style_bytes = sum(r["bytes"] for r in style_rows)
    native = comps.unet.config.sample_size * 2 ** (len(comps.vae.config.block_out_channels) - 1)
    hw = parse_size(size, native)
    kind, split, addons = CALLS[call], call == "stylize", planned_addons(net, ip)
    tried, fit = [], None
    for b, slicing, tiling, need in ladder(comps, kind=kind, size=hw, batch=int(batch), dtype=dtype, split=split,
                                           addons=addons, styles=style_bytes):
        tried.append({"batch": b, "vae_slicing": slicing, "vae_tiling": tiling, "total_bytes": need})
        if need <= gpu.total_bytes:
            fit = tried[-1]
            break
    last = fit or tried[-1]
    tensor_peak = sampling_peak(comps, kind=kind, size=hw, batch=last["batch"], dtype=dtype,
                                slicing=last["vae_slicing"], tiling=last["vae_tiling"], addons=addons) + style_bytes
    return {
        "command": command, "call": call, "model": str(model), "dtype": str(dtype).removeprefix("torch."),
        "gpu": {"name": gpu.name, "total_bytes": gpu.total_bytes, "source": gpu.source},
        "size": {"height": hw[0], "width": hw[1]}, "batch": int(batch), "styles": style_rows,
        "controlnet": str(net) if net else None, "ip_adapter": str(ip) if ip else None,
        "bytes": {"styles": style_bytes, "tensor_peak": tensor_peak}, "fixed": fixed_costs(tensor_peak),
        "total_bytes": last["total_bytes"], "fits": fit is not None, "runs_with": fit, "tried": tried,
        "caveat": CAVEAT,
    }


def format_sampling_plan(rep: dict) -> str:
    """The plan as a short table: what it holds, the total against the card, the rungs tried."""
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    gpu, size = rep["gpu"], rep["size"]
    rows = [("tensor peak", rep["bytes"]["tensor_peak"],
             "weights, one denoising step and the VAE decode" + (", add-ons" if rep["controlnet"] or rep["ip_adapter"]
                                                                 else "") + ", styles")]
    rows += [(f"  style {s['name']}", s["bytes"], f"{s['kind']}: {s['source']}") for s in rep["styles"]]
    rows += [(f["name"], f["bytes"], f["source"]) for f in rep["fixed"]]
    lines = [f"{rep['call']} on {rep['model']} ({rep['dtype']}) · {size['width']}x{size['height']} px, batch "
             f"{rep['batch']} · {gpu['name']} ({gpu['total_bytes'] / GIB:.2f} GiB)"]
    lines += [f"controlnet: {rep['controlnet']}"] if rep["controlnet"] else []
    lines += [f"ip-adapter: {rep['ip_adapter']}"] if rep["ip_adapter"] else []
    lines += ["", f"{'':34}{'GiB':>8}"] + [f"{name:34}{gib(value)}  {note}" for name, value, note in rows]
    free = gpu["total_bytes"] - rep["total_bytes"]
    verdict = f"fits ({free / GIB:.2f} GiB to spare)" if rep["fits"] else f"does not fit ({-free / GIB:.2f} GiB short)"
    lines += [f"{'total':34}{gib(rep['total_bytes'])}  of {gpu['total_bytes'] / GIB:.2f} GiB: {verdict}", ""]
    lines += [f"tried: batch {t['batch']}{', VAE slicing' if t['vae_slicing'] else ''}"
              f"{', VAE tiling' if t['vae_tiling'] else ''} → {t['total_bytes'] / GIB:.2f} GiB" for t in rep["tried"]]
    lines.append(CAVEAT)
    return "\n".join(lines)


def sampling_plan_command(*, gpu: str | None, as_json: bool, emit=print, **request) -> int:
    """The handler's work: the plan through `emit`; a card nothing fits is one `error:` line (exit 2) after it."""
    card = parse_gpu(gpu) if gpu else default_gpu()
    rep = sampling_plan(gpu=card, **request)
    emit(json.dumps(rep, indent=2) if as_json else format_sampling_plan(rep))
    if not rep["fits"]:
        t = rep["tried"][-1]
        raise UserError(too_big(CALLS[rep["call"]], (rep["size"]["height"], rep["size"]["width"]), t["total_bytes"],
                                t["batch"], card.total_bytes, rep["call"] == "stylize"))
    return 0
