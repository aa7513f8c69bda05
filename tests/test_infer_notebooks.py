"""testInfer/01-03 and notebooks/03_Demo_Application run top to bottom in smoke mode on `tiny` with fixture
artifacts, and their outputs are what the package produces for the same settings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from customgen.inference import read_settings, stylize
from tests.artifact_fixtures import make_contents, make_library
from tests.notebook_harness import cell_outputs_text, run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"lora_a": "01-LoRA-Inference-Test.ipynb", "dreambooth": "02-DreamBooth-Inference-Test.ipynb",
             "ti": "03-Textual-Inversion-Inference-Test.ipynb"}
SMOKE = dict(MODEL="tiny", N_CONTENT=2, STRENGTHS=[0.3, 0.6], SCALES=[0.0, 1.0], FIXED_STRENGTH=0.6, STEPS=5,
             SEED=3, SMOKE=True)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_nb")
    return make_library(root / "styles"), make_contents(root / "contents", n=3)


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
@pytest.mark.parametrize("style", list(NOTEBOOKS))
def test_inference_notebook_smoke(style, fixtures, tmp_path):
    styles, contents = fixtures
    out = tmp_path / "out"
    nb = run_notebook(ROOT / "testInfer" / NOTEBOOKS[style],
                      {**SMOKE, "ARTIFACT": str(styles[style]), "CONTENT_DIR": str(contents), "OUTPUT_DIR": str(out)},
                      timeout=300)
    for grid, values in (("strength", [0.3, 0.6]), ("scale", [0.0, 1.0])):
        times = pd.read_csv(out / grid / "timings.csv")
        assert len(times) == 2 * len(values) and (times.seconds > 0).all()
        assert (out / grid / "grid.png").stat().st_size > 0
    first = out / "scale" / "content_0_scale1.png"
    settings = read_settings(first)
    assert settings["styles"][0]["name"] == style and settings["strength"] == 0.6 and settings["seed"] == 3
    same = stylize(contents / "content_0.png", styles[style], scales=1.0, strength=0.6, model="tiny", steps=5, seed=3)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(same))  # the notebook is the package, wired
    text = cell_outputs_text(nb)
    assert "seconds per image" in text and f"{style}: method" in text


@pytest.mark.slow
def test_demo_notebook_smoke(fixtures):
    styles, _ = fixtures
    nb = run_notebook(ROOT / "notebooks" / "03_Demo_Application.ipynb",
                      {"MODEL": "tiny", "STYLES_DIR": str(styles["lora_a"].parent), "SMOKE": True}, timeout=300)
    text = cell_outputs_text(nb)
    assert "served at http://127.0.0.1:" in text
    assert "5 styles" in text and "lora_a" in text
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "SHARE = False" in source
