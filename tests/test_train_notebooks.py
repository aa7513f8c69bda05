"""The training notebooks run top to bottom in smoke mode on `tiny` (Kaggle defaults overridden)."""
from pathlib import Path

import pytest

from customgen import kinds
from customgen.kinds import dreambooth, lora, textual_inversion
from tests.image_fixtures import make_instance_folder, make_wikiart_tree
from tests.notebook_harness import cell_outputs_text, run_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("01a_LoRA_Training.ipynb", "lora_style"),
                                         ("01b_DreamBooth_Training.ipynb", "dreambooth_style"),
                                         ("01c_Textual_Inversion_Training.ipynb", "textual_inversion"),
                                         ("01d_Subject_DreamBooth_LoRA.ipynb", "dreambooth_lora_subject")])
def test_training_notebook_smoke(name, method, tmp_path):
    params = {"MODEL": "tiny", "OUTPUT_DIR": str(tmp_path / "styles"), "SMOKE": True}
    if method == "dreambooth_lora_subject":
        params["PHOTOS_DIR"] = str(make_instance_folder(tmp_path / "photos", n=3, size=(72, 72)))
    else:
        params |= {"WIKIART_ROOT": str(make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 3}, size=(80, 72))),
                   "STYLE": "Cubism"}
    nb = run_notebook(NOTEBOOKS / name, params, cwd=tmp_path)
    (folder,) = (tmp_path / "styles").iterdir()
    manifest = kinds.read_manifest(folder)
    assert manifest.method == method and manifest.base_model == "tiny" and manifest.steps == 2
    text = cell_outputs_text(nb)  # the bucket settings: on for the styles (SMOKE: 64 px, data.min_bucket 64)
    if method == "dreambooth_lora_subject":
        assert "buckets: off (64×64 center crops" in text and "buckets" not in manifest.training
    else:
        assert "buckets: on (64–1024 px sides, step 64, at most 64² pixels; center crops)" in text
        assert manifest.training["buckets"] == [{"bucket": [64, 64], "count": 3}]
