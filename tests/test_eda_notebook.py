"""notebooks/00_Data_EDA.ipynb runs top to bottom on fixture data and writes the shared test set."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.image_fixtures import make_eda_fixture
from tests.notebook_harness import cell_outputs_text, run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_Data_EDA.ipynb"


@pytest.mark.slow
def test_eda_notebook_smoke(tmp_path):
    roots = make_eda_fixture(tmp_path / "data")
    out = tmp_path / "eda"
    nb = run_notebook(NOTEBOOK, {"WIKIART_ROOT": str(roots["wikiart"]), "COCO_ROOT": str(roots["coco"].parent),
                                 "OUTPUT_DIR": str(out), "SEED": 1, "SMOKE": True}, timeout=300)
    styles = json.loads((out / "style_paths.json").read_text())
    content = json.loads((out / "content_paths.json").read_text())
    assert (styles["seed"], content["seed"]) == (1, 1)
    assert {k: len(v) for k, v in styles["styles"].items()} == {"Impressionism": 3, "Cubism": 3}  # SMOKE: 2 × 3
    assert len(content["paths"]) == 4 and content["n_available"] == 8
    chosen = [p for v in styles["styles"].values() for p in v]
    assert "impressionism_000_copy.jpg" not in {Path(p).name for p in chosen}  # near-duplicate left out
    report = json.loads((out / "scan_report_wikiart.json").read_text())
    assert report["skipped_by_reason"] == {"empty": 1, "not_an_image": 1, "truncated": 2} and report["n_small"] == 1
    assert all((out / f).stat().st_size > 0 for f in ("style_distribution.png", "sizes_coco.png", "style_samples.png",
                                                      "aspect_ratios.png"))
    text = cell_outputs_text(nb)
    assert "1 near-duplicate group(s)" in text and "skipped 4" in text
    # the chosen style's bucket table: its 6 paintings of 320×288 (ratio 1.11) go to 512² (error .11; 576×448: .17),
    # resized to 569×512: 512² / (569·512) = 90.0% of their pixels kept, as a square crop keeps (288/320)
    assert "buckets at 512 px" in text and re.search(r"512×512\s+6\s+90\.0%\s+90\.0%", text)
