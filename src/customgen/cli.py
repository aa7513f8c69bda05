"""`customgen` command line: thin wiring over the package.

Exit codes: 0 success; 2 bad input or usage (one line `error: ...` on stderr, no traceback);
1 unexpected failure. `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path

from customgen.config import SMOKE_OVERRIDES, find_config, load_config
from customgen.errors import Notice, UserError, os_error_message
from customgen.request import DEFAULT_MODEL, DEFAULT_STRENGTH, DEFAULTS, SCHEDULERS, STRUCTURES, STYLE_IMAGE_MODES

# Each handler imports its command's module when it runs (marked `lazy` below): `customgen --help` and usage
# errors answer in a fraction of a second instead of paying several seconds for torch and diffusers.


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


@contextlib.contextmanager
def document_only(as_json: bool):
    """For `--json`: while the command works, whatever anything prints goes to stderr (sys.stdout, and file
    descriptor 1 for C code and child processes: torch.hub prints `Downloading: ...` on stdout); the document the
    command hands to the yielded `emit` is printed on stdout afterwards, alone. Without `--json`, `emit` prints."""
    if not as_json:
        yield lambda text: print(text, flush=True)
        return
    documents: list[str] = []
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 to move (a closed stream): Python's own stdout is redirected still
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield documents.append
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        for text in documents:
            print(text, flush=True)


def _cmd_inspect(args) -> int:
    from customgen.formats.report import file_report, format_file_report  # lazy
    from customgen.models import load_components  # lazy
    from customgen.models.inspect import format_report, inspect_components  # lazy

    with document_only(args.json) as emit:
        if Path(args.ref).expanduser().is_file():  # a file: what it is and whether customgen can use it
            report = file_report(args.ref)
            emit(json.dumps(report, indent=2) if args.json else format_file_report(report))
            return 0
        comps = load_components(args.ref, meta=True)  # architecture only: counts need no weights
        report = inspect_components(comps, rank=args.rank)
        emit(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_data_scan(args) -> int:
    from customgen.data import format_summary, scan_report  # lazy
    from customgen.data.buckets import bucket_spec  # lazy

    names = {"resolution": "--buckets", "min_bucket": "--min-bucket", "max_bucket": "--max-bucket",
             "step": "--bucket-step"}
    spec = None if args.buckets is None else bucket_spec(
        args.buckets, min_bucket=args.min_bucket, max_bucket=args.max_bucket, step=args.bucket_step,
        no_upscale=args.bucket_no_upscale, names=names)
    report = scan_report(
        args.root, layout=args.layout, out=args.out, seed=args.seed, overwrite=args.overwrite,
        min_size=args.min_size, buckets=spec,
    )
    print(format_summary(report))
    return 0


def _cmd_data_samples(args) -> int:
    from customgen.data.samples import write_samples  # lazy

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UserError(f"{args.out} is not empty; pass --overwrite or choose another folder")
    roots = write_samples(args.out, seed=args.seed)
    print(f"synthetic WikiArt-like styles: {roots['wikiart']}\nsynthetic COCO-like contents: {roots['coco']}")
    return 0


def load_cli_config(args):
    """CONFIG (a YAML file, or the name of a recipe or study preset in configs/) + --set overrides + --model, as the
    train/evaluate commands take them."""
    overrides = (list(SMOKE_OVERRIDES) if getattr(args, "smoke", False) else []) + list(args.set or [])
    if args.model:
        overrides.append(f"model.ref={args.model}")
    named = Path(args.config).suffix not in (".yaml", ".yml") and not Path(args.config).exists()
    return load_config(find_config(args.config) if named else args.config, overrides)


def _cmd_train(args) -> int:
    from customgen.train import train  # lazy

    cfg = load_cli_config(args)
    if args.max_steps is not None:  # a step count replaces an epoch count too
        cfg.train.steps, cfg.train.epochs = args.max_steps, 0
    out = train(cfg, output=args.output, resume=args.resume, overwrite=args.overwrite, resume_force=args.resume_force)
    print(f"artifact: {out}")
    return 0


SAMPLING_PLAN = ("sample", "style", "styles", "controlnet", "ip_adapter", "image_encoder", "size", "batch")


def _cmd_plan(args) -> int:
    asked = [f"--{k.replace('_', '-')}" for k in SAMPLING_PLAN if getattr(args, k) is not None]
    if args.config is None:
        return _cmd_sampling_plan(args)
    if asked:
        raise UserError(f"{' '.join(asked)} plan a sampling call, CONFIG a training run: give one of them")
    from customgen.train.plan import plan_command  # lazy

    cfg = load_cli_config(args)
    parts = ["customgen plan", args.config] + (["--model", args.model] if args.model else [])
    parts += (["--gpu", args.gpu] if args.gpu else []) + [f"--set {shlex.quote(kv)}" for kv in args.set or []]
    with document_only(args.json) as emit:
        return plan_command(cfg, gpu=args.gpu, as_json=args.json, command=" ".join(parts), emit=emit)


def _cmd_sampling_plan(args) -> int:
    """`customgen plan --sample stylize|generate ...`: no CONFIG (handler: customgen.inference.plan)."""
    if args.set or args.smoke:
        raise UserError("--set and --smoke change a training CONFIG: `customgen plan CONFIG`; a sampling call is "
                        "planned with --sample and its options")
    if args.sample is None and not any(getattr(args, k) is not None for k in SAMPLING_PLAN):
        raise UserError("give a CONFIG to plan a training run, or --sample stylize|generate to plan a sampling call")
    from customgen.inference.plan import sampling_plan_command  # lazy

    parts = ["customgen plan", "--sample", args.sample or "stylize"] + [
        f"{flag} {shlex.quote(str(v))}" for flag, v in
        [("--model", args.model)] + [("--style", v) for v in args.style or []]
        + [("--styles", args.styles), ("--controlnet", args.controlnet), ("--ip-adapter", args.ip_adapter),
           ("--image-encoder", args.image_encoder), ("--size", args.size), ("--batch", args.batch),
           ("--gpu", args.gpu)] if v is not None]
    with document_only(args.json) as emit:
        return sampling_plan_command(
            model=args.model or DEFAULT_MODEL, call=args.sample or "stylize", styles=args.style or (),
            styles_dir=args.styles, controlnet=args.controlnet, ip_adapter=args.ip_adapter,
            image_encoder=args.image_encoder, size=args.size, batch=args.batch if args.batch is not None else 1,
            gpu=args.gpu, as_json=args.json, command=" ".join(parts), emit=emit)


def _cmd_evaluate(args) -> int:
    from customgen.evaluate import evaluate  # lazy

    cfg = load_cli_config(args)
    if args.cap_gib is not None:
        cfg.eval.cap_gib = args.cap_gib
    parts = ["customgen evaluate", args.config] + (["--model", args.model] if args.model else [])
    parts += [f"--set {shlex.quote(kv)}" for kv in args.set or []] + (["--overwrite"] if args.overwrite else [])
    command = " ".join(parts)  # recorded in run.json and every figure's footer
    table = evaluate(cfg, overwrite=args.overwrite, command=command)
    if table is not None:  # None on the other processes of an `accelerate launch` run: the main one reports
        print(f"{len(table)} result rows in {cfg.eval.output}: {table.attrs.get('files', 'see summary.md')}")
    return 0


def _cmd_bench(args) -> int:
    from customgen.bench import BenchSettings, run_bench  # lazy

    command = "customgen bench " + " ".join(shlex.quote(a) for a in args.argv)  # recorded in both result files
    settings = BenchSettings(
        model=args.model, jobs=args.jobs.split(","), size=args.size, steps=args.steps, strength=args.strength,
        train_resolution=args.train_resolution, repeats=args.repeats, overhead_images=args.overhead_images,
        flops=not args.no_flops, cap_gib=args.cap_gib, device=args.device, dtype=args.dtype, out=str(args.out),
        name=args.name, overwrite=args.overwrite, command=command, pairs=[p for p in args.pairs.split(",") if p],
        fewstep_file=args.fewstep_file, fewstep_steps=args.fewstep_steps,
        **({"recipes": args.recipes.split(",")} if args.recipes else {}))
    _, paths = run_bench(settings)
    print(f"bench results: {paths[0]} and {paths[1]}")
    return 0


def _cmd_stylize(args) -> int:
    from customgen.inference.commands import cmd_stylize  # lazy

    return cmd_stylize(args)


def _cmd_generate(args) -> int:
    from customgen.inference.commands import cmd_generate  # lazy

    return cmd_generate(args)


def _cmd_export(args) -> int:
    from customgen.export import export  # lazy

    out = export(args.style, args.out, fmt=args.format, model=args.model, scale=args.scale, dtype=args.dtype,
                 styles_dir=args.styles, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    if args.styles is not None and not Path(args.styles).is_dir():
        raise UserError(f"--styles {args.styles} is not a folder (the style library: one artifact folder per style)")
    from customgen.demo import cmd_demo  # lazy

    return cmd_demo(args)


def _add_config_args(s, optional: bool = False) -> None:
    s.add_argument("config", nargs="?" if optional else None,
                   help="a YAML file of overrides, or a name in configs/ or configs/studies/ (subject_report)"
                        + ("; none with --sample" if optional else ""))
    s.add_argument("--model", default=None, help="model reference (overrides model.ref)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. data.root=/data")
    s.add_argument("--smoke", action="store_true", help="tiny settings (64 px, 2 steps): a plumbing check, not a result")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI surface (documented in the README)."""
    p = _Parser(prog="customgen", description="Customized image generation with Stable Diffusion v1.5.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("inspect", help="a model reference's components and parameter counts, or what a file is "
                                       "(LoRA, LyCORIS, embedding, checkpoint, ...) and whether customgen can use it")
    s.add_argument("ref", help="Hub id, local folder, tiny, sd15-random, or a file (.safetensors, .pt, .bin, .ckpt)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--rank", type=int, default=4, help="LoRA rank for the LoRA parameter count")
    s.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    s = d.add_parser("scan", help="scan a dataset, write the selection JSON and a report")
    s.add_argument("root")
    s.add_argument("--layout", choices=["wikiart", "coco", "folder", "kohya"], default=None,
                   help="how ROOT is organised (default: detect)")
    s.add_argument("--out", type=Path, default=None, help="write content/style selection JSON and the report here")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-size", type=int, default=None, help="shorter side below this is listed as small (default per layout)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_bucket_args(s)
    s.set_defaults(func=_cmd_data_scan)

    s = sub.add_parser("train", help="train a style or subject (LoRA, DreamBooth, Textual Inversion)")
    _add_config_args(s)
    s.add_argument("--output", default=None, help="artifact folder (default: train.output/NAME)")
    s.add_argument("--resume", default="auto", help="auto (latest intact checkpoint, if any) | never | PATH")
    s.add_argument("--resume-force", action="store_true",
                   help="resume a checkpoint made with another config (docs/reliability.md)")
    s.add_argument("--max-steps", type=int, default=None, help="override train.steps (and train.epochs)")
    s.add_argument("--overwrite", action="store_true", help="retrain into a folder that holds an artifact")
    s.set_defaults(func=_cmd_train)

    _add_plan_command(sub)
    s = sub.add_parser("evaluate", help="score every style (img2img on the content set) and every subject step "
                                        "(txt2img) against the base model; write metrics")
    _add_config_args(s)
    s.add_argument("--cap-gib", type=float, default=None, metavar="GiB",
                   help="plan VAE slicing/tiling for this much GPU memory (default: the GPU in use; = eval.cap_gib)")
    s.add_argument("--overwrite", action="store_true", help="regenerate stylized images already in eval.output")
    s.set_defaults(func=_cmd_evaluate)

    s = d.add_parser("samples", help="write a small synthetic dataset (3 procedural styles + contents) for smoke runs")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_data_samples)

    _add_inference_commands(sub)
    _add_export_command(sub)
    _add_demo_command(sub)
    _add_bench_command(sub)
    return p


def _add_bucket_args(s) -> None:
    """`data scan --buckets RES ...`: kohya's bucket settings, named as the data.* keys."""
    s.add_argument("--buckets", type=int, default=None, metavar="RES",
                   help="also the aspect-ratio bucket table at this resolution (kohya's buckets; data.buckets)")
    for flag, default in (("--min-bucket", 256), ("--max-bucket", 1024), ("--bucket-step", 64)):
        s.add_argument(flag, type=int, default=default,
                       help=f"as data.{flag[2:].replace('-', '_')} (default {default})")
    s.add_argument("--bucket-no-upscale", action="store_true", help="as data.bucket_no_upscale")


def _add_plan_command(sub) -> None:
    """`customgen plan` (handlers: customgen.train.plan for a CONFIG, customgen.inference.plan for --sample)."""
    s = sub.add_parser("plan", help="predict a training run's or a sampling call's peak GPU memory on a card (no GPU "
                                    "and no weights needed): fits or not")
    _add_config_args(s, optional=True)
    s.add_argument("--gpu", default=None, metavar="NAME|GiB",
                   help="t4, p100, l4, a10, a100-40, a100-80, h100 or a size in GiB (default: this GPU, else t4)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    g = s.add_argument_group("a sampling call instead of a CONFIG (stylize or generate with these styles and add-ons)")
    g.add_argument("--sample", choices=("stylize", "generate"), default=None, help="the call (default: stylize)")
    g.add_argument("--style", action="append", default=None, metavar="NAME|PATH",
                   help="a library style, artifact folder or file from elsewhere; repeat for a blend")
    g.add_argument("--styles", default=None, metavar="DIR",
                   help="style library folder (default $CUSTOMGEN_STYLES or outputs/styles)")
    g.add_argument("--size", default=None, metavar="N|WxH",
                   help="working size: a side (square) or WIDTHxHEIGHT (default: the model's resolution)")
    g.add_argument("--batch", type=int, default=None, metavar="N",
                   help="images per call: stylize's --batch, generate's --num-images (default 1)")
    _local_addon_args(g)
    s.set_defaults(func=_cmd_plan)


def _add_bench_command(sub) -> None:
    """`customgen bench` (handler: customgen.bench)."""
    b = sub.add_parser("bench", help="time customgen against stock diffusers on the same weights (JSON + markdown)")
    b.add_argument("--model", default="sd15-random", help="model reference (sd15-random: SD v1.5 shapes, random weights)")
    b.add_argument("--jobs", default="stylize,overhead,fewstep,train,perceptual",
                   help="comma-separated jobs: stylize, overhead, fewstep, train, perceptual, memory (not by default)")
    b.add_argument("--size", type=int, default=512, help="stylize working size in px")
    b.add_argument("--steps", type=int, default=DEFAULTS.steps, help="stylize scheduler steps")
    b.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="img2img strength")
    b.add_argument("--train-resolution", type=int, default=256, help="training-step resolution in px")
    b.add_argument("--recipes", default=None, help="comma-separated recipes for the train and memory jobs (default: all)")
    b.add_argument("--pairs", default="", help="only stylize pairs whose label contains one of these (comma-separated)")
    b.add_argument("--fewstep-file", default="", metavar="FILE",
                   help="the fewstep job's LoRA (LCM/TCD/Hyper-SD; default: a random LCM-shaped one)")
    b.add_argument("--fewstep-steps", type=int, default=4, help="its steps (default 4)")
    b.add_argument("--repeats", type=int, default=4, help="timed runs per side, alternating (A B, B A, ...)")
    b.add_argument("--overhead-images", type=int, default=5, help="images timed for the overhead breakdown")
    b.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (one run less per side)")
    b.add_argument("--cap-gib", type=float, default=0.0, help="cap CUDA memory, e.g. 15 to emulate a T4 (0: no cap)")
    b.add_argument("--device", default=None, help="cuda, cpu (default: CUDA if present)")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    b.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="folder for the JSON and markdown")
    b.add_argument("--name", default="", help="file name without extension (default bench_<model>_<device>)")
    b.add_argument("--overwrite", action="store_true", help="replace the JSON and markdown of an earlier run")
    b.set_defaults(func=_cmd_bench)


def _sampling_args(p) -> None:
    """Options stylize and generate share."""
    p.add_argument("--style", action="append", default=None, metavar="NAME|PATH",
                   help="library style name or artifact folder; repeat to blend LoRA styles")
    p.add_argument("--style-scale", action="append", type=float, default=None, metavar="S",
                   help="style (adapter) scale; one for all styles or one per --style (default 1.0)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: Hub id, local folder, .safetensors file, tiny or sd15-random")
    p.add_argument("--styles", default=None, metavar="DIR", help="style library folder (default $CUSTOMGEN_STYLES or outputs/styles)")
    p.add_argument("--prompt", default=None, help="prompt (default: the styles' manifest prompts)")
    p.add_argument("--negative-prompt", default=DEFAULTS.negative_prompt, help="negative prompt")
    p.add_argument("--guidance", type=float, default=DEFAULTS.guidance, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="scheduler steps")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULTS.scheduler, help="sampler (default DPM-Solver++)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, stored in the PNG)")
    p.add_argument("--size", type=int, default=None, metavar="N", help="working resolution, short side, multiple of 8")
    p.add_argument("--out", type=Path, default=None, metavar="PATH", help="output .png (one image) or folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on T4, fp32 on CPU")
    p.add_argument("--cap-gib", type=float, default=None, metavar="GiB",
                   help="plan batch and VAE slicing/tiling for this much GPU memory (default: the GPU in use)")


def _local_addon_args(p) -> None:
    """Local ControlNet / IP-Adapter weights (Kaggle inputs with Internet off); stylize and the demo share them."""
    p.add_argument("--controlnet", default=None, metavar="PATH",
                   help="local ControlNet for the structure: a diffusers folder or an original single file "
                        "(.safetensors/.pth), e.g. control_v11p_sd15_canny.pth (default: lllyasviel's from the Hub)")
    p.add_argument("--ip-adapter", default=None, metavar="FILE",
                   help="local ip-adapter_sd15 .safetensors/.bin for the style image (default: h94/IP-Adapter from "
                        "the Hub)")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="the IP-Adapter's CLIP image encoder folder (default: image_encoder/ beside the file)")


def _add_inference_commands(sub) -> None:
    """`customgen stylize` and `customgen generate` (handlers: customgen.inference.commands)."""
    s = sub.add_parser("stylize", help="stylize content images with library styles (img2img)")
    s.add_argument("--content", nargs="+", required=True, metavar="IMG",
                   help="content image(s), a folder of images, or a content_paths.json selection")
    _sampling_args(s)
    s.add_argument("--strength", type=float, default=None, help=f"img2img denoising strength in [0, 1] (default {DEFAULT_STRENGTH})")
    s.add_argument("--stylization", type=float, default=None,
                   help="one knob in [0, 1] setting strength and scale together (see docs/inference.md)")
    s.add_argument("--mask", default=None, metavar="IMG", help="stylize only where this mask is white")
    s.add_argument("--feather", type=int, default=None, metavar="PX", help="mask edge blur radius (default short side/64)")
    s.add_argument("--style-image", default=None, metavar="IMG", help="take the style from this image")
    s.add_argument("--style-image-mode", choices=STYLE_IMAGE_MODES, default=DEFAULTS.style_image_mode,
                   help="IP-Adapter (Hub weights or --ip-adapter), nearest library style, or auto (IP-Adapter if it "
                        "can be had)")
    s.add_argument("--style-image-scale", type=float, default=DEFAULTS.style_image_scale, help="weight of the style image")
    s.add_argument("--structure", choices=STRUCTURES, default=None, help="keep structure with a ControlNet")
    s.add_argument("--structure-scale", type=float, default=DEFAULTS.structure_scale, help="ControlNet conditioning scale")
    _local_addon_args(s)
    s.add_argument("--batch", type=int, default=DEFAULTS.batch, metavar="N",
                   help="contents of one working size per pipeline call (faster on a GPU; not pixel-identical to 1)")
    s.set_defaults(func=_cmd_stylize)

    g = sub.add_parser("generate", help="text-to-image with library styles and subjects")
    _sampling_args(g)
    g.add_argument("--num-images", type=int, default=DEFAULTS.num_images, metavar="N", help="images in the batch")
    g.add_argument("--width", type=int, default=None, help="width (default: --size or the model's resolution)")
    g.add_argument("--height", type=int, default=None, help="height (default: --size or the model's resolution)")
    g.set_defaults(func=_cmd_generate)


def _add_export_command(sub) -> None:
    """`customgen export` (handler: customgen.export)."""
    e = sub.add_parser("export", help="merge a DreamBooth or LoRA style into a full SD v1.5 checkpoint for other tools")
    e.add_argument("style", metavar="STYLE", help="library style name or artifact folder")
    e.add_argument("--format", choices=["single-file", "diffusers"], default="single-file",
                   help="single-file: original-layout .safetensors (A1111/ComfyUI); diffusers: a model folder")
    e.add_argument("--out", type=Path, required=True, metavar="PATH", help="the .safetensors file or the folder to write")
    e.add_argument("--scale", type=float, default=1.0, help="style scale baked in (LoRA weight; DreamBooth interpolation)")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="weights dtype (default fp16: 2 GB)")
    e.add_argument("--model", default=None, help="base model (default: the one in the style's manifest)")
    e.add_argument("--styles", default=None, metavar="DIR", help="style library folder (default $CUSTOMGEN_STYLES or outputs/styles)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.set_defaults(func=_cmd_export)


def _add_demo_command(sub) -> None:
    """`customgen demo` (handler: customgen.demo)."""
    d = sub.add_parser("demo", help="Gradio app: stylize photos and generate images in the browser")
    d.add_argument("--model", default=DEFAULT_MODEL, help="base model reference")
    d.add_argument("--styles", default=None, metavar="DIR", help="style library folder (default $CUSTOMGEN_STYLES or outputs/styles)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=None, help="port (default: first free from 7860)")
    d.add_argument("--share", action="store_true", help="also open a public gradio.live link (anyone with it can use the demo)")
    d.add_argument("--device", default=None, help="cuda, cpu (default: CUDA if present)")
    d.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    d.add_argument("--cap-gib", type=float, default=None, metavar="GiB",
                   help="plan batch and VAE slicing/tiling for this much GPU memory (default: the GPU in use)")
    _local_addon_args(d)
    d.add_argument("--controlnet-structure", choices=STRUCTURES, default="canny",
                   help="the structure guidance the local --controlnet serves (default canny; the other uses the Hub)")
    d.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv[argv.index("bench") + 1:] if args.command == "bench" else argv
        fmt = warnings.formatwarning
        with warnings.catch_warnings():
            if not debug:  # library deprecation chatter is for developers; users see our notices
                warnings.simplefilter("ignore")
                warnings.simplefilter("always", Notice)
            warnings.formatwarning = lambda msg, cat, *a, **k: f"note: {msg}\n"
            try:
                return int(args.func(args) or 0)
            finally:
                warnings.formatwarning = fmt
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk or a path the user may not use is theirs to fix, like a bad input
        message = os_error_message(err)
        if message is None:
            return _unexpected(err, debug)
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        return _unexpected(err, debug)


def _unexpected(err: BaseException, debug: bool) -> int:
    """Exit 1: the traceback with --debug, else one line."""
    if debug:
        traceback.print_exc()
    else:
        print(f"error: unexpected failure: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
