"""`customgen stylize` and `customgen generate`: argument wiring over customgen.inference (imports stay lazy)."""
from __future__ import annotations

import re
from pathlib import Path

DEFAULT_OUT = {"stylize": Path("outputs/stylized"), "generate": Path("outputs/generated")}
SCHEDULER_NAMES = ("dpm++", "ddim", "euler", "pndm", "ddpm")  # = session.SCHEDULERS (kept here: no torch import)


def _common(p) -> None:
    """Options stylize and generate share."""
    p.add_argument("--style", action="append", default=None, metavar="NAME|PATH",
                   help="library style name or artifact folder; repeat to blend LoRA styles")
    p.add_argument("--style-scale", action="append", type=float, default=None, metavar="S",
                   help="style (adapter) scale; one for all styles or one per --style (default 1.0)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="base model: Hub id, local folder, .safetensors file, tiny or sd15-random")
    p.add_argument("--styles", default=None, metavar="DIR", help="style library folder (default $CUSTOMGEN_STYLES or outputs/styles)")
    p.add_argument("--prompt", default=None, help="prompt (default: the styles' manifest prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=25, help="scheduler steps")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="dpm++", help="sampler (default DPM-Solver++)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, stored in the PNG)")
    p.add_argument("--size", type=int, default=None, metavar="N", help="working resolution, short side, multiple of 8")
    p.add_argument("--out", type=Path, default=None, metavar="PATH", help="output .png (one image) or folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on T4, fp32 on CPU")


def register(sub) -> None:
    """Add the stylize and generate subcommands to the CLI's subparsers."""
    s = sub.add_parser("stylize", help="stylize content images with library styles (img2img)")
    s.add_argument("--content", nargs="+", required=True, metavar="IMG",
                   help="content image(s), a folder of images, or a content_paths.json selection")
    _common(s)
    s.add_argument("--strength", type=float, default=None, help="img2img denoising strength in [0, 1] (default 0.6)")
    s.add_argument("--style-strength", type=float, default=None,
                   help="one knob in [0, 1] setting strength and scale together (see docs/inference.md)")
    s.add_argument("--mask", default=None, metavar="IMG", help="stylize only where this mask is white")
    s.add_argument("--feather", type=int, default=None, metavar="PX", help="mask edge blur radius (default short side/64)")
    s.add_argument("--style-image", default=None, metavar="IMG", help="take the style from this image")
    s.add_argument("--style-image-mode", choices=["auto", "ip-adapter", "nearest"], default="auto",
                   help="IP-Adapter (needs Hub weights), nearest library style, or auto (IP-Adapter if reachable)")
    s.add_argument("--style-image-scale", type=float, default=1.0, help="weight of the style image")
    s.add_argument("--structure", choices=["canny", "depth"], default=None, help="keep structure with a ControlNet")
    s.add_argument("--structure-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    s.set_defaults(func=cmd_stylize)

    g = sub.add_parser("generate", help="text-to-image with library styles and subjects")
    _common(g)
    g.add_argument("--num-images", type=int, default=1, metavar="N", help="images in the batch")
    g.add_argument("--width", type=int, default=None, help="width (default: --size or the model's resolution)")
    g.add_argument("--height", type=int, default=None, help="height (default: --size or the model's resolution)")
    g.set_defaults(func=cmd_generate)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")[:limit] or "image"


def output_paths(out: Path | None, command: str, stems: list[str], *, overwrite: bool) -> list[Path]:
    """Where each output goes: --out FILE.png for one image, else files named by stem in a folder; all checked
    before any work starts, so an existing file stops the run at once."""
    from customgen.errors import UserError
    from customgen.inference.images import check_writable

    if out is not None and out.suffix.lower() == ".png":
        if len(stems) != 1:
            raise UserError(f"--out {out} names one file but there are {len(stems)} outputs: pass a folder")
        paths = [out]
    else:
        folder, seen = (out or DEFAULT_OUT[command]), {}
        paths = []
        for stem in stems:
            seen[stem] = seen.get(stem, -1) + 1
            paths.append(folder / (f"{stem}.png" if not seen[stem] else f"{stem}-{seen[stem]}.png"))
    return [check_writable(p, overwrite=overwrite) for p in paths]


def cmd_stylize(args) -> int:
    """Handler of `customgen stylize`."""
    from customgen.inference.images import content_paths, save_image
    from customgen.inference.img2img import random_seed, stylize

    seed = random_seed() if args.seed is None else args.seed
    items = content_paths(args.content)
    label = "+".join(Path(s).name for s in args.style) if args.style else "base"
    stems = [f"{Path(str(p)).stem}_{_slug(label)}_s{seed}" for p in items]
    paths = output_paths(args.out, "stylize", stems, overwrite=args.overwrite)
    images = stylize(
        items, args.style, scales=args.style_scale, strength=args.strength, style_strength=args.style_strength,
        model=args.model, styles_dir=args.styles, prompt=args.prompt, negative_prompt=args.negative_prompt,
        guidance=args.guidance, steps=args.steps, scheduler=args.scheduler, seed=seed, size=args.size,
        mask=args.mask, feather=args.feather, style_image=args.style_image, style_image_mode=args.style_image_mode,
        style_image_scale=args.style_image_scale, structure=args.structure, structure_scale=args.structure_scale,
        device=args.device, dtype=args.dtype)
    for img, path in zip(images, paths):
        print(f"wrote {save_image(img, path, overwrite=args.overwrite)}")
    return 0


def cmd_generate(args) -> int:
    """Handler of `customgen generate`."""
    from customgen.inference.images import save_image
    from customgen.inference.img2img import random_seed
    from customgen.inference.txt2img import generate

    seed = random_seed() if args.seed is None else args.seed
    label = _slug(args.prompt or "+".join(Path(s).name for s in args.style or []))
    paths = output_paths(args.out, "generate", [f"{label}_s{seed}_{i}" for i in range(args.num_images)],
                         overwrite=args.overwrite)
    images = generate(
        args.prompt, args.style, scales=args.style_scale, model=args.model, styles_dir=args.styles,
        negative_prompt=args.negative_prompt, guidance=args.guidance, steps=args.steps, scheduler=args.scheduler,
        seed=seed, num_images=args.num_images, size=args.size, width=args.width, height=args.height,
        device=args.device, dtype=args.dtype)
    for img, path in zip(images if isinstance(images, list) else [images], paths):
        print(f"wrote {save_image(img, path, overwrite=args.overwrite)}")
    return 0
