"""notebooks/04a, 04b and 05 run top to bottom in smoke mode on `tiny` with trained fixture artifacts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.eval_fixtures import shared_eval_env
from tests.notebook_harness import cell_outputs_text, run_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMOKE = {"MODEL": "tiny", "STEPS": 2, "SIZE": 64, "STRENGTH": 0.5, "MIN_SIZE": 32, "SMOKE": True,
         "SWEEP_STRENGTHS": [0.5, 1.0]}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """04a and 04b executed into two output folders (05 reads both)."""
    env = shared_eval_env(tmp_path_factory)
    root = tmp_path_factory.mktemp("nb_eval")
    common = SMOKE | {"STYLES_DIR": str(env["styles"]), "CONTENT_ROOT": str(env["coco"]),
                      "STYLE_ROOT": str(env["wikiart"])}
    runs = {}
    for notebook, extra in [("04a_Evaluation_Metrics_LoRA.ipynb", {"SWEEP_SCALES": [0.5, 1.0]}),
                            ("04b_Evaluation_Metrics_DreamBooth_TI.ipynb", {})]:
        name = notebook.removesuffix(".ipynb")
        out = root / name
        nb = run_notebook(NOTEBOOKS / notebook, common | extra | {"OUTPUT_DIR": str(out)}, timeout=300)
        runs[name] = (out, cell_outputs_text(nb))
    return runs


def test_04a_lora_notebook(evaluated):
    out, text = evaluated["04a_Evaluation_Metrics_LoRA"]
    m = pd.read_csv(out / "metrics.csv")
    assert set(m["method"]) == {"baseline", "lora_style"} and m["smoke"].all()
    sweep = pd.read_csv(out / "sweep.csv")
    assert set(sweep[sweep["method"] == "lora_style"]["style_scale"]) == {0.5, 1.0}
    assert (out / "plots" / "tradeoff.png").is_file()
    assert "on the front" in text and "04a_Evaluation_Metrics_LoRA.ipynb" in (out / "run.json").read_text()


def test_04b_dreambooth_ti_notebook(evaluated):
    out, _ = evaluated["04b_Evaluation_Metrics_DreamBooth_TI"]
    m = pd.read_csv(out / "metrics.csv")
    assert set(m["method"]) == {"baseline", "dreambooth_style", "textual_inversion"}
    assert (pd.read_csv(out / "sweep.csv")["style_scale"].dropna() == 1.0).all()  # strength-only sweep


def test_05_results_analysis_notebook(evaluated, tmp_path):
    dirs = [str(out) for out, _ in evaluated.values()]
    nb = run_notebook(NOTEBOOKS / "05_Results_Analysis.ipynb",
                      {"RESULTS_DIRS": dirs, "OUTPUT_DIR": str(tmp_path / "analysis"), "N_SAMPLES": 2}, timeout=300)
    text = cell_outputs_text(nb)
    assert "SMOKE: random-weight metric networks" in text and "on the front" in text
    figures = {p.stem for p in (tmp_path / "analysis").glob("*.png")}
    assert {"metric_bars", "baseline_comparison", "tradeoff", "samples_Impressionism", "samples_Cubism"} <= figures
