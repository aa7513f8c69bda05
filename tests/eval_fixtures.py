"""Evaluation fixtures: real tiny artifacts trained with customgen.train (2 steps each) and small data trees.

Artifacts come from the same `train(cfg)` users run, so the evaluation reads exactly what training writes
(style.json, config.yaml with data.style, stock-format weights).
"""
from __future__ import annotations

from pathlib import Path

from tests.image_fixtures import make_coco_folder, make_wikiart_tree

STYLES = {"Impressionism": 4, "Cubism": 4}
# (library folder, method, WikiArt style it is trained on, extra overrides)
ARTIFACTS = [
    ("lora_impressionism", "lora_style", "Impressionism", []),
    ("dreambooth_cubism", "dreambooth_style", "Cubism", ["prompt.instance=a painting in sks style"]),
    ("ti_impressionism", "textual_inversion", "Impressionism", ["textual_inversion.init_word=a"]),  # tiny vocab
]


def make_eval_data(root: Path) -> dict[str, Path]:
    """WikiArt-like references (2 styles × 4) and 3 COCO-like content photos, small (96 px: CPU metrics are
    the slow part), so evaluations on them need eval.min_size <= 64."""
    wikiart = make_wikiart_tree(root / "wikiart", styles=STYLES, size=(96, 96), with_csv=False)
    coco = make_coco_folder(root / "coco", n=3, size=(112, 96))
    return {"wikiart": wikiart, "coco": coco}


def train_tiny_styles(styles_dir: Path, wikiart: Path, artifacts=ARTIFACTS) -> Path:
    """Train each (name, method, style) on `tiny` for 2 steps at 64 px into styles_dir/name."""
    from customgen.config import load_config
    from customgen.train import train

    for name, method, style, extra in artifacts:
        cfg = load_config(None, [
            f"method={method}", "model.ref=tiny", f"data.root={wikiart}", f"data.style={style}",
            "data.resolution=64", "data.min_size=32", "train.steps=2", "train.validate_every=0",
            "train.checkpoint_every=0", "validation.steps=2", "validation.num_images=1", *extra])
        train(cfg, output=styles_dir / name, progress=False)
    return styles_dir


_BUILT: dict[str, dict[str, Path]] = {}


def shared_eval_env(tmp_path_factory) -> dict[str, Path]:
    """Data + trained styles, built once per test session (shared by test modules through this memo)."""
    if "env" not in _BUILT:
        root = tmp_path_factory.mktemp("eval_env")
        data = make_eval_data(root / "data")
        _BUILT["env"] = {**data, "styles": train_tiny_styles(root / "styles", data["wikiart"])}
    return _BUILT["env"]
