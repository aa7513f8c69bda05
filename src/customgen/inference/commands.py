"""`customgen stylize` and `customgen generate`: the handlers (their arguments are defined in customgen.cli,
with defaults from `customgen.request.DEFAULTS`)."""
from __future__ import annotations

import re
from pathlib import Path

from customgen.data.io import is_image_name
from customgen.errors import UserError
from customgen.inference.images import check_writable, content_paths, save_image, writable_folder
from customgen.inference.img2img import stylize
from customgen.inference.txt2img import generate
from customgen.request import Request, random_seed

DEFAULT_OUT = {"stylize": Path("outputs/stylized"), "generate": Path("outputs/generated")}
COMMON = ("model", "prompt", "negative_prompt", "guidance", "steps", "scheduler", "seed", "size", "device", "dtype",
          "cap_gib")


def request_from_args(args, *extra: str) -> Request:
    """The Request of a stylize/generate command line, checked before any model loads (seed drawn here, so
    the output names can carry it)."""
    fields = {name: getattr(args, name) for name in COMMON + extra}
    req = Request(scales=args.style_scale, **fields).check()
    return req.replace(seed=random_seed() if req.seed is None else req.seed)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")[:limit] or "image"


def output_paths(out: Path | None, command: str, stems: list[str], *, overwrite: bool) -> list[Path]:
    """Where each output goes: --out FILE.png for one image, else files named by stem in a folder; all checked
    before any work starts, so an existing file stops the run at once."""
    if out is not None and is_image_name(out.name) and out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: outputs are written as .png (the settings are stored in its text chunks); "
                        "name a .png file or a folder")
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
    for folder in dict.fromkeys(p.parent for p in paths):
        writable_folder(folder)
    return [check_writable(p, overwrite=overwrite) for p in paths]


def cmd_stylize(args) -> int:
    """Handler of `customgen stylize`."""
    req = request_from_args(args, "stylization", "strength", "mask", "feather", "style_image", "style_image_mode",
                            "style_image_scale", "structure", "structure_scale", "batch", "controlnet", "ip_adapter",
                            "image_encoder")
    items = content_paths(args.content)
    label = "+".join(Path(s).name for s in args.style) if args.style else "base"
    stems = [f"{Path(str(p)).stem}_{_slug(label)}_s{req.seed}" for p in items]
    paths = output_paths(args.out, "stylize", stems, overwrite=args.overwrite)
    images = stylize(items, args.style, req, styles_dir=args.styles)
    for img, path in zip(images, paths):
        print(f"wrote {save_image(img, path, overwrite=args.overwrite)}")
    return 0


def cmd_generate(args) -> int:
    """Handler of `customgen generate`."""
    req = request_from_args(args, "num_images", "width", "height")
    label = _slug(args.prompt or "+".join(Path(s).name for s in args.style or []))
    paths = output_paths(args.out, "generate", [f"{label}_s{req.seed}_{i}" for i in range(req.num_images)],
                         overwrite=args.overwrite)
    images = generate(None, args.style, req, styles_dir=args.styles)
    for img, path in zip(images if isinstance(images, list) else [images], paths):
        print(f"wrote {save_image(img, path, overwrite=args.overwrite)}")
    return 0
