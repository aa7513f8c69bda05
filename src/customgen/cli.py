"""`customgen` command line: thin wiring over the package.

Exit codes: 0 success; 2 bad input or usage (one line `error: ...` on stderr, no traceback);
1 unexpected failure. `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback
import warnings
from pathlib import Path

from customgen.errors import Notice, UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _cmd_inspect(args) -> int:
    from customgen.models import load_components
    from customgen.models.inspect import format_report, inspect_components

    comps = load_components(args.ref, meta=True)  # architecture only: counts need no weights
    report = inspect_components(comps, rank=args.rank)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_data_scan(args) -> int:
    from customgen.data import format_summary, scan_report

    report = scan_report(
        args.root, layout=args.layout, out=args.out, seed=args.seed, overwrite=args.overwrite,
        min_size=args.min_size,
    )
    print(format_summary(report))
    return 0


def _cmd_data_samples(args) -> int:
    from customgen.data.samples import write_samples

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UserError(f"{args.out} is not empty; pass --overwrite or choose another folder")
    roots = write_samples(args.out, seed=args.seed)
    print(f"synthetic WikiArt-like styles: {roots['wikiart']}\nsynthetic COCO-like contents: {roots['coco']}")
    return 0


def load_cli_config(args):
    """CONFIG + --set overrides + --model, as the train/evaluate commands take them."""
    from customgen.config import load_config

    from customgen.config import SMOKE_OVERRIDES

    overrides = (list(SMOKE_OVERRIDES) if getattr(args, "smoke", False) else []) + list(args.set or [])
    if args.model:
        overrides.append(f"model.ref={args.model}")
    return load_config(args.config, overrides)


def _cmd_train(args) -> int:
    from customgen.train import train

    cfg = load_cli_config(args)
    if args.max_steps is not None:
        cfg.train.steps = args.max_steps
    out = train(cfg, output=args.output, resume=args.resume, overwrite=args.overwrite)
    print(f"artifact: {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from customgen.evaluate import evaluate

    cfg = load_cli_config(args)
    parts = ["customgen evaluate", args.config] + (["--model", args.model] if args.model else [])
    parts += [f"--set {shlex.quote(kv)}" for kv in args.set or []] + (["--overwrite"] if args.overwrite else [])
    command = " ".join(parts)  # recorded in run.json and every figure's footer
    table = evaluate(cfg, overwrite=args.overwrite, command=command)
    print(f"{len(table)} result rows in {cfg.eval.output}: metrics.csv, per_image.csv, summary.md, run.json, plots/")
    return 0


def _add_config_args(s) -> None:
    s.add_argument("config", help="a YAML file of overrides (configs/*.yaml)")
    s.add_argument("--model", default=None, help="model reference (overrides model.ref)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. data.root=/data")
    s.add_argument("--smoke", action="store_true", help="tiny settings (64 px, 2 steps): a plumbing check, not a result")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI surface (documented in the README)."""
    p = _Parser(prog="customgen", description="Customized image generation with Stable Diffusion v1.5.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("inspect", help="components, classes and parameter counts of a model reference")
    s.add_argument("ref", help="Hub id, local folder, .safetensors file, tiny or sd15-random")
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
    s.set_defaults(func=_cmd_data_scan)

    s = sub.add_parser("train", help="train a style or subject (LoRA, DreamBooth, Textual Inversion)")
    _add_config_args(s)
    s.add_argument("--output", default=None, help="artifact folder (default: train.output/NAME)")
    s.add_argument("--resume", default="auto", help="auto (latest checkpoint, if any) | never | PATH")
    s.add_argument("--max-steps", type=int, default=None, help="override train.steps")
    s.add_argument("--overwrite", action="store_true", help="retrain into a folder that holds an artifact")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", help="stylize the content set with every style and the baseline; write metrics")
    _add_config_args(s)
    s.add_argument("--overwrite", action="store_true", help="regenerate stylized images already in eval.output")
    s.set_defaults(func=_cmd_evaluate)

    s = d.add_parser("samples", help="write a small synthetic dataset (3 procedural styles + contents) for smoke runs")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_data_samples)

    for register in EXTRA_COMMANDS:
        register(sub)
    return p


EXTRA_COMMANDS: list = []  # (subparsers) -> None; train/stylize/evaluate/demo add themselves here

from customgen.demo import register as _register_demo  # noqa: E402 - light imports; gradio loads on use
from customgen.inference.commands import register as _register_inference  # noqa: E402

EXTRA_COMMANDS += [_register_inference, _register_demo]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
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
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected failure: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
