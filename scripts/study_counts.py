"""What every recipe and study preset trains on SD v1.5's shapes, and the optimizer state that costs.

Builds `sd15-random` on the meta device (SD v1.5's shapes, no weights, no memory: seconds on a CPU), sets each
config's method up exactly as training does (`Method.setup`: freeze, add LoRA layers, unfreeze the scope, add the
token) and counts the values of the tensors it hands the optimizer (Textual Inversion: the whole embedding table,
of which only the new rows are kept). Optimizer state: AdamW keeps two fp32 tensors per value (8 B), bitsandbytes'
8-bit AdamW two uint8 tensors (2 B; its per-block statistics are left out). Figures for docs/training_guide.md
("Recipes and their studies"). Run: python scripts/study_counts.py
"""
import contextlib
import io

from customgen.config import REPO_CONFIGS, STUDIES, load_config
from customgen.kinds import make_method
from customgen.models.builders import build_reserved


def optimizer_values(cfg) -> tuple[int, int]:
    """(values the optimizer holds, values the method learns) for `cfg` on SD v1.5's shapes."""
    comps = build_reserved("sd15-random", meta=True)
    resize = comps.text_encoder.resize_token_embeddings  # new rows start as the mean of others: no mean on meta
    comps.text_encoder.resize_token_embeddings = lambda n: resize(n, mean_resizing=False)
    method = make_method(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        groups = method.setup(comps)
    return sum(p.numel() for g in groups for p in g["params"]), method.trainable_count(comps)


def main() -> None:
    print("| config | method | values the optimizer holds | learned | AdamW state | 8-bit AdamW state |")
    print("|---|---|---:|---:|---:|---:|")
    for path in [*sorted(REPO_CONFIGS.glob("*.yaml")), *sorted((REPO_CONFIGS / STUDIES).glob("*.yaml"))]:
        cfg = load_config(path)
        if not cfg.method:
            continue  # evaluation configs
        held, learned = optimizer_values(cfg)
        print(f"| `{path.relative_to(REPO_CONFIGS)}` | {cfg.method} | {held:,} | {learned:,} | "
              f"{8 * held / 2**20:,.1f} MiB | {2 * held / 2**20:,.1f} MiB |")


if __name__ == "__main__":
    main()
