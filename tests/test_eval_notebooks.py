"""notebooks/04a, 04b, 04c and 05 run top to bottom in smoke mode on `tiny` with trained fixture artifacts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.eval_fixtures import shared_eval_env
from tests.notebook_harness import cell_outputs_text, run_notebook
from tests.subject_fixtures import shared_subject_env

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


@pytest.fixture(scope="module")
def subject_evaluated(tmp_path_factory):
    """04c executed on the fixture subject (final step 3, snapshots at 1 and 2) with two prompts."""
    env = shared_subject_env(tmp_path_factory)
    out = tmp_path_factory.mktemp("nb_subject") / "04c"
    params = {"MODEL": "tiny", "STEPS": 2, "SIZE": 64, "MIN_SIZE": 32, "SMOKE": True, "SAMPLES_PER_PROMPT": 2,
              "STYLES_DIR": str(env["library"]), "OUTPUT_DIR": str(out),
              "PROMPTS": ["a {token} {noun} on the beach", "a {token} {noun} in the snow"]}
    nb = run_notebook(NOTEBOOKS / "04c_Evaluation_Metrics_Subject.ipynb", params, timeout=300)
    return out, cell_outputs_text(nb)


def test_04c_subject_notebook(subject_evaluated):
    out, text = subject_evaluated
    m = pd.read_csv(out / "subject_metrics.csv")
    assert list(m["step"]) == [0, 1, 2, 3] and m["smoke"].all() and m["best"].sum() == 1
    assert "subject sks_dog: best step" in text and "04c_Evaluation_Metrics_Subject.ipynb" in (
        out / "subject_metrics.json").read_text()
    assert {"subject_curves.png", "subject_tradeoff.png", "subject_samples_sks_dog.png"} <= {
        p.name for p in (out / "plots").iterdir()}


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


def test_05_results_analysis_notebook(evaluated, subject_evaluated, tmp_path):
    dirs = [str(out) for out, _ in evaluated.values()]
    nb = run_notebook(NOTEBOOKS / "05_Results_Analysis.ipynb",
                      {"RESULTS_DIRS": dirs, "SUBJECT_DIRS": [str(subject_evaluated[0]), str(tmp_path / "not-run")],
                       "OUTPUT_DIR": str(tmp_path / "analysis"), "N_SAMPLES": 2}, timeout=300)
    text = cell_outputs_text(nb)
    assert "SMOKE: random-weight metric networks" in text and "on the front" in text
    assert "subject sks_dog: best step" in text and "not-run" not in text.split("subject results:")[1].split("\n")[0]
    figures = {p.stem for p in (tmp_path / "analysis").glob("*.png")}
    assert {"metric_bars", "baseline_comparison", "tradeoff", "samples_Impressionism", "samples_Cubism",
            "subject_curves", "subject_tradeoff"} <= figures

