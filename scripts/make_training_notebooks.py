"""Write notebooks/01a-01d (training). Run once after editing; the notebooks are committed with no outputs."""
from pathlib import Path

import nbformat as nbf

NB = Path(__file__).resolve().parents[1] / "notebooks"

SETUP_MD = """**On Kaggle**: Settings → Accelerator **GPU T4 x2** (the P100 no longer works with Kaggle's torch) and
**Internet on** (to download SD v1.5), or attach SD v1.5 as an input and set `MODEL` to its folder. Then run once:
```
!git clone https://github.com/<you>/customgen /kaggle/working/customgen
!cd /kaggle/working/customgen && pip install -q -r requirements.txt
import sys; sys.path.insert(0, "/kaggle/working/customgen/src")  # use it without restarting the kernel
```
`SMOKE = True` runs every cell in seconds on the `tiny` model (a check that the notebook works, not a result)."""


def params(data_lines: list[str], recipe: str, study: str) -> str:
    return "\n".join([
        "import os",
        'KAGGLE = os.path.isdir("/kaggle/input")',
        'MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, a folder under /kaggle/input, or "tiny"',
        f'CONFIG = "{recipe}"  # a recipe in configs/, a path to your own YAML, or the study preset "{study}"',
        *data_lines,
        'OUTPUT_DIR = "/kaggle/working/styles" if KAGGLE else "outputs/styles"',
        "MAX_STEPS = None  # None: the config's train.steps (or its train.epochs)",
        'EXTRA = []  # more overrides, e.g. ["lora.rank=8", "train.lr=5e-5"]',
        "SMOKE = False  # True: tiny settings so every cell runs in seconds (not a result)",
    ])


def notebook(title: str, intro: str, recipe: str, study: str, data_lines: list[str], data_code: str,
             show_code: str) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    p = nbf.v4.new_code_cell(params(data_lines, recipe, study), metadata={"tags": ["parameters"]})
    nb.cells = [
        nbf.v4.new_markdown_cell(f"# {title}\n\n{intro}\n\n{SETUP_MD}"),
        p,
        nbf.v4.new_markdown_cell("## Configuration\nThe recipe's YAML holds only overrides of the typed defaults "
                                 "(`customgen/config.py`); the resolved config is saved beside the artifact. "
                                 f"`CONFIG = \"{study}\"` runs the study's own settings instead "
                                 "(`configs/studies/`; how the recipe differs and why: docs/training_guide.md)."),
        nbf.v4.new_code_cell(
            "from pathlib import Path\n\nfrom customgen.config import SMOKE_OVERRIDES, find_config, load_config, to_dict\n"
            f"{data_code}\n"
            "overrides = [f\"model.ref={MODEL}\", *DATA, *(SMOKE_OVERRIDES if SMOKE else ()), *EXTRA]\n"
            "cfg = load_config(find_config(CONFIG), overrides)\n"
            "if MAX_STEPS is not None:\n    cfg.train.steps, cfg.train.epochs = MAX_STEPS, 0\n"
            "artifact_dir = Path(OUTPUT_DIR) / (cfg.name or f\"{cfg.method}-{cfg.data.style or Path(cfg.data.root).name}\")\n"
            "{k: v for k, v in to_dict(cfg).items() if k in ('method', 'data', 'train', 'lora', 'prompt')}"),
        nbf.v4.new_markdown_cell("## Buckets and captions\nWith `data.buckets` (on for the style recipes) each "
                                 "image trains whole at the aspect-ratio bucket closest to its own, as kohya's "
                                 "sd-scripts do; the table gives each bucket's images and the pixels kept against a "
                                 "square crop. Captions: kohya's `data.caption_dropout`, `data.shuffle_caption`, "
                                 "`data.keep_tokens`; the first steps' captions go to `captions.jsonl` "
                                 "(docs/training_guide.md)."),
        nbf.v4.new_code_cell("from customgen.train.data import describe_data\n\nprint(describe_data(cfg))"),
        nbf.v4.new_markdown_cell("## Train\nOne loop for every method; checkpoints every `train.checkpoint_every` steps "
                                 "and every `train.checkpoint_minutes`, so re-running this cell after a session ends "
                                 "resumes (`resume='auto'`)."),
        nbf.v4.new_code_cell("from customgen.train import train\n\n"
                             "artifact = train(cfg, output=artifact_dir, resume=\"auto\", overwrite=SMOKE)\nartifact"),
        nbf.v4.new_markdown_cell("## What was learned\nThe manifest (`style.json`), the loss curve and the validation images."),
        nbf.v4.new_code_cell("import json\n\nfrom customgen.train.plots import plot_loss_curve\n\n"
                             "print(json.dumps(json.loads((artifact / 'style.json').read_text()), indent=1)[:1500])\n"
                             "plot_loss_curve(artifact / 'logs' / 'loss.csv')"),
        nbf.v4.new_code_cell(show_code),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


WIKIART = ["WIKIART_ROOT = None  # None: found under /kaggle/input", 'STYLE = "Analytical_Cubism"']
WIKIART_CODE = ("from customgen.data import find_kaggle_roots\n\n"
                "root = WIKIART_ROOT or find_kaggle_roots()[\"wikiart\"]\n"
                "assert root, 'attach the WikiArt dataset or set WIKIART_ROOT'\n"
                "DATA = [f\"data.root={root}\", f\"data.style={STYLE}\"]")
PHOTOS = ['PHOTOS_DIR = "/kaggle/input/my-subject"  # 5-20 photos of one person or object']
PHOTOS_CODE = "DATA = [f\"data.root={PHOTOS_DIR}\"]"
SHOW_STYLE = ("from PIL import Image\n\nsamples = sorted((artifact / 'samples').glob('step-*.png'))\n"
              "print([s.name for s in samples])\nImage.open(samples[-1])")
SHOW_SUBJECT = ("from customgen.inference import generate\n\n"
                "generate(prompt='a photo of sks person wearing a suit', styles=[artifact], model=MODEL,\n"
                "         steps=2 if SMOKE else 30, size=cfg.data.resolution, seed=0)")

SPECS = {
    "01a_LoRA_Training": ("Style LoRA training", "LoRA rank 4 on the UNet attention projections, learned from one "
                          "WikiArt style (50-100 paintings) with L2 + LPIPS + Gram losses.", "lora_style",
                          "style_lora_plan", WIKIART, WIKIART_CODE, SHOW_STYLE),
    "01b_DreamBooth_Training": ("DreamBooth style training", "DreamBooth on the UNet attention layers with a rare "
                                "token and prior preservation (class images generated by the base model).",
                                "dreambooth_style", "style_dreambooth_plan", WIKIART, WIKIART_CODE, SHOW_STYLE),
    "01c_Textual_Inversion_Training": ("Textual Inversion training", "Learn the embedding of a new token for one "
                                       "WikiArt style; everything else stays frozen.", "textual_inversion",
                                       "style_textual_inversion_plan", WIKIART, WIKIART_CODE, SHOW_STYLE),
    "01d_Subject_DreamBooth_LoRA": ("Subject DreamBooth-LoRA", "A person or object from 5-20 photos: LoRA rank 8 on "
                                    "the UNet and text encoder with prior preservation.", "dreambooth_lora_subject",
                                    "subject_report", PHOTOS, PHOTOS_CODE, SHOW_SUBJECT),
}

if __name__ == "__main__":
    for name, spec in SPECS.items():
        nbf.write(notebook(*spec), NB / f"{name}.ipynb")
        print("wrote", NB / f"{name}.ipynb")
