"""The bench's files: one JSON with every measurement and one markdown table, both naming the command, the
device, the library versions and the model reference that produced them."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from customgen.bench.timing import BOUND_DEVICES, flop_bounds, utilisation

RANDOM_NOTE = ("Random weights: time, memory and FLOPs only, never quality. Figures from `tiny` are plumbing checks, "
               "not speed claims; GPU columns are FLOP lower bounds until measured on that GPU.")


def _num(x, fmt: str = "{:.3f}") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _gib(x) -> str:
    return _num(None if x is None else x / 2**30, "{:.2f}")


def _gflop(x) -> str:
    return _num(None if not x else x / 1e9, "{:.1f}")


def with_rates(row: dict, peak) -> dict:
    """A pair row plus achieved TFLOP/s, fraction of the device peak and FLOP bounds, for both sides."""
    for side in ("ours", "stock"):
        s = row[side]
        s |= utilisation(s["flops"], s["median_seconds"], peak) | {"flop_bound_seconds": flop_bounds(s["flops"])}
    return row


def medians(rows: list[dict]) -> float | None:
    """The median of the pairs' median ratios (pairs that ran)."""
    ratios = [r["median_ratio"] for r in rows if r.get("status", "ok") == "ok"]
    return statistics.median(ratios) if ratios else None


def _pair_line(label: str, r: dict, pixels: str) -> str:
    if r.get("status") == "oom":
        return f"| {label} | out of memory: {r['error']} |" + " |" * 8
    o, s = r["ours"], r["stock"]
    rate = _num(o.get("achieved_tflops"), "{:.3f}")
    frac = o.get("fraction_of_peak")
    bounds = " / ".join(_num(o["flop_bound_seconds"][d], "{:.3f}") for d in BOUND_DEVICES)
    return (f"| {label} | {_num(o['median_seconds'])} | {_num(s['median_seconds'])} | **{r['median_ratio']:.3f}** "
            f"[{r['min_ratio']:.3f}–{r['max_ratio']:.3f}] | {pixels} | {_gib(o['peak_bytes'])} ({_gib(o['start_bytes'])})"
            f" / {_gib(s['peak_bytes'])} ({_gib(s['start_bytes'])}) | {_gflop(o['flops'])} / {_gflop(s['flops'])} | "
            f"{rate}{'' if frac is None else f' ({100 * frac:.1f} %)'} | {bounds} |")


def _pixels(r: dict) -> str:
    if r["equal"]:
        return "equal"
    flag = "" if not r["must_equal"] else " **(must be equal!)**"
    return f"max {r['max_diff']}, mean {_num(r['mean_diff'])} levels{flag}"


PAIR_HEADER = ("| {what} | customgen s | {stock} s | ratio median [min–max] | pixels | peak GiB customgen (resident at "
               "start) / {stock} | GFLOP customgen / {stock} | customgen TFLOP/s (of peak) | FLOP bound s "
               + " / ".join(BOUND_DEVICES) + " |\n|" + "---|" * 9)


def stylize_section(rep: dict) -> list[str]:
    s = rep["settings"]
    lines = [f"## Stylize: {s['size']} px, {s['steps']} steps × strength {s['strength']} ({s['scheduler']})", "",
             PAIR_HEADER.format(what="pair", stock="stock")]
    lines += [_pair_line(r["pair"], r, _pixels(r) if r.get("status") == "ok" else "—") for r in rep["stylize"]]
    lines += ["", f"Median of the pairs' ratios: **{_num(medians(rep['stylize']))}**", ""]
    return lines


def fewstep_section(rep: dict) -> list[str]:
    s = rep["settings"]
    lines = [f"## Few-step LoRA: stylize at {s['size']} px × strength {s['strength']} against stock without it", "",
             PAIR_HEADER.format(what="pair", stock="stock")]
    return lines + [_pair_line(r["pair"], r, "different job") for r in rep["fewstep"]] + [""]


def overhead_section(rep: dict) -> list[str]:
    o = rep["overhead"]
    keys = ["total_ms", "model_ms", "overhead_ms", "pipeline_internal_ms", "customgen_own_ms", "call_outside_laps_ms",
            "resize_ms", "prepare_ms", "finish_ms"]
    lines = [f"## Per-image overhead (ms, medians over {o['customgen'][0]['images']} images at {rep['settings']['size']} px)",
             "", "Overhead = wall time − time inside the UNet, VAE and text encoder = the stock pipeline's own internals "
             "(the pipeline call minus model time: image conversions, scheduler steps) + customgen's own work around "
             "the call (`customgen own`: request, style library and activation (`call outside laps`), resize, "
             "prepare (scheduler, prompt, generators), finish (resize back, mask, metadata)).", "",
             "| styles | " + " | ".join(k.removesuffix("_ms").replace("_", " ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for row in o["customgen"]:
        lines.append(f"| {', '.join(row['styles']) or 'none'} | " + " | ".join(_num(row[k], "{:.1f}") for k in keys) + " |")
    st = o["stock"]
    lines += ["", f"Stock StableDiffusionImg2ImgPipeline, no style: total {st['total_ms']:.1f} ms, model "
              f"{st['model_ms']:.1f} ms, overhead **{st['overhead_ms']:.1f} ms**.", ""]
    return lines


def training_section(rep: dict) -> list[str]:
    s = rep["settings"]
    lines = [f"## Training steps: {s['train_resolution']} px, the recipes' batch sizes (L2 loss; prior preservation "
             "where the recipe has it)", "", PAIR_HEADER.format(what="recipe", stock="diffusers example step")]
    lines += [_pair_line(f"{r['recipe']} (batch {r['batch_size']}{', prior' if r['prior'] else ''})"
                         if r.get("status") == "ok" else r["recipe"], r, "—") for r in rep["training"]]
    lines += ["", f"Median of the recipes' ratios: **{_num(medians(rep['training']))}**", ""]
    return lines


def perceptual_section(rep: dict) -> list[str]:
    p = rep["perceptual"][0]
    if p.get("status") == "oom":
        return ["## Perceptual step", "", f"Out of memory: {p['error']}", ""]
    pc = p["pieces"]
    lines = [f"## Perceptual step ({p['recipe']}, {p['resolution']} px, decode crop {pc['crop_pixels']} px, "
             f"batch {pc['batch']})", "",
             PAIR_HEADER.format(what="step", stock="L2 step"), _pair_line("L2 + LPIPS + Gram", p, "—"), "",
             "Pieces (ms, medians; the decode crop, then half its side):", "",
             f"| piece | {pc['crop_pixels']} px | {p['pieces_half_crop']['crop_pixels']} px |", "|---|---|---|"]
    half = p["pieces_half_crop"]["ms"]
    lines += [f"| {k} | {v:.1f} | {_num(half.get(k), '{:.1f}')} |" for k, v in pc["ms"].items()]
    return lines + [""]


def memory_section(rep: dict) -> list[str]:
    rows = rep["memory"]
    lines = [f"## Peak memory: predicted vs measured ({rows[0]['resolution']} px)", "",
             f"Measured by: {rows[0]['measured_by']}. Predicted: `customgen plan`'s tensor peak (fake CUDA tensors, "
             "the run's own code) and its total with fixed costs (CUDA context, cuBLAS workspaces, allocator slack).", "",
             "| recipe | settings | predicted tensor peak / total GiB | measured allocated / reserved GiB (CPU counter) "
             "| allocated ÷ predicted | reserved ÷ total | status |", "|" + "---|" * 7]
    for r in rows:
        p, m, st = r["predicted"], r["measured"], r["settings"]
        what = (f"batch {st['batch_size']}x{st['grad_accum']}, {st['mixed_precision']}, "
                f"{'checkpointing' if st['gradient_checkpointing'] else 'no checkpointing'}, {st['optimizer']}")
        lines.append(f"| {r['recipe']} | {what} | {_gib(p['tensor_peak'])} / {_gib(p['total'])} | "
                     f"{_gib(m['cuda_max_allocated'])} / {_gib(m['cuda_max_reserved'])} ({_gib(m['cpu_counter'])}) | "
                     f"{_num(r['ratio_allocated'])} | {_num(r['ratio_reserved'])} | {r['status']} |")
    return lines + [""]


def markdown(rep: dict) -> str:
    d, v = rep["device"], rep["versions"]
    head = [f"# customgen bench — `{rep['model']}` on {d['name']}", "",
            f"Command: `{rep['command']}`  ", f"Device: {d['name']} ({d['device']}, {d['dtype']}"
            f"{', capped at ' + str(d['cap_gib']) + ' GiB' if d.get('cap_gib') else ''}); peak "
            f"{_num(d['peak_tflops'], '{:.1f}')} TFLOPS ({d['peak_label'] or 'unknown'})  ",
            "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + "  ",
            f"Finished: {rep.get('finished') or 'not yet (partial: written after every pair)'}", "",
            f"> {RANDOM_NOTE}", "",
            "Ratios are customgen ÷ the other side per alternating repeat (A B, B A, A B, ...), median [min–max]; "
            "below 1 customgen is faster. Peak memory is the CUDA peak on a GPU, the peak resident set on a CPU "
            "(both sides' models stay resident, so compare the growth over the resident figure).", ""]
    sections = [("stylize", stylize_section), ("fewstep", fewstep_section), ("overhead", overhead_section),
                ("training", training_section),
                ("perceptual", perceptual_section), ("memory", memory_section)]
    for key, section in sections:
        if rep.get(key):
            head += section(rep)
    return "\n".join(head) + "\n"


def write_report(rep: dict, out: Path, name: str) -> tuple[Path, Path]:
    """OUT/NAME.json and OUT/NAME.md."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}.json", out / f"{name}.md"
    paths[0].write_text(json.dumps(rep, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(rep))
    return paths
