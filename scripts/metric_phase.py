"""Seconds per image of the evaluation's metric phase (per-image metrics + FID/KID/ArtFID) on `tiny`, CPU.

    PYTHONPATH=src python scripts/metric_phase.py --work /tmp/metric_phase [--tree .] [--contents 8] \
        [--content-size 384 288] [--size 256] [--repeats 3] [--out results/benchmarks/metric_phase_tiny_cpu.json]

Builds a small evaluation (synthetic WikiArt/COCO-like images, three tiny styles trained for 2 steps), generates
its outputs once, then times `image_rows` + `aggregate` with fresh metric networks and empty feature caches:
`cold` includes building the networks, `built` reuses them (the cost that grows with the number of images).
It uses only functions that exist before and after the batched metric phase, so `--tree` can point at an older
checkout (its src/ on PYTHONPATH) to measure the old per-image path the same way. Smoke (random) metric
networks: timing only.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path


def build(work: Path, args):
    """Data, styles, config and the generated outputs (reused when already there)."""
    from tests.eval_fixtures import make_wikiart_tree, train_tiny_styles  # the tree's own test fixtures
    from tests.image_fixtures import make_coco_folder

    from customgen.config import load_config
    from customgen.evaluate import evaluate

    wikiart = make_wikiart_tree(work / "wikiart", styles={"Impressionism": 4, "Cubism": 4}, size=(160, 160),
                                with_csv=False)
    coco = make_coco_folder(work / "coco", n=args.contents, size=tuple(args.content_size))
    styles = work / "styles"
    if not styles.is_dir():  # a re-run into the same --work reuses the styles and the generated outputs
        train_tiny_styles(styles, wikiart)
    cfg = load_config(None, [
        "model.ref=tiny", f"eval.styles={styles}", f"eval.content_root={coco}", f"eval.style_root={wikiart}",
        f"eval.output={work / 'out'}", "eval.steps=2", f"eval.size={args.size}", "eval.strength=0.5",
        "eval.min_size=32", "eval.smoke=true", f"eval.max_contents={args.contents}"])
    evaluate(cfg, progress=False, plots=False)
    return cfg


def phase(cfg, nets_factory, nets=None) -> tuple[float, int, object]:
    """Seconds of image_rows + aggregate (all outputs reused from disk), number of images, the networks used."""
    from customgen.evaluate import grid_points, resolve_inputs
    from customgen.evaluate.generate import generate
    from customgen.evaluate.score import aggregate, image_rows

    inputs = resolve_inputs(cfg)
    points = grid_points(inputs.styles, cfg.eval)
    outputs = generate(points, inputs, cfg, Path(cfg.eval.output), progress=False)
    start = time.perf_counter()
    nets = nets or nets_factory()
    rows = image_rows(outputs, inputs, nets, lpips_net=cfg.eval.lpips_net, progress=False)
    aggregate(rows, inputs, nets, cfg)
    return time.perf_counter() - start, len(outputs), nets


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tree", type=Path, default=Path("."), help="checkout whose tests/ fixtures build the data")
    p.add_argument("--contents", type=int, default=8)
    p.add_argument("--content-size", type=int, nargs=2, default=[384, 288])
    p.add_argument("--size", type=int, default=256, help="eval.size (outputs come back at the content size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    import torch

    from customgen.metrics import FeatureCache, MetricNetworks

    torch.set_num_threads(1)
    cfg = build(args.work, args)
    fresh = lambda: MetricNetworks(smoke=True)  # noqa: E731 - in-memory feature cache only: cold every time
    phase(cfg, fresh)  # warm-up: imports (open_clip, lpips) are paid once per process, before and after alike
    cold, built = [], []
    for _ in range(args.repeats):
        seconds, n, nets = phase(cfg, fresh)
        cold.append(seconds / n)
        nets.feature_cache = FeatureCache(None)  # same networks, empty cache
        built.append(phase(cfg, fresh, nets)[0] / n)
    shutil.rmtree(args.work / "out" / "features", ignore_errors=True)
    report = {"command": "python scripts/metric_phase.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tree": str(args.tree.resolve()), "model": "tiny", "device": "cpu (1 thread)", "host": platform.node(),
              "torch": torch.__version__, "images": n, "content_size": args.content_size, "eval_size": args.size,
              "seconds_per_image_cold": cold, "seconds_per_image_built": built,
              "note": "smoke metric networks (random weights): timing only"}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
