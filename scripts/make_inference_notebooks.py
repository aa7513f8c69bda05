"""Write testInfer/01-03 (inference grids) and notebooks/03_Demo_Application. Run after editing; the
notebooks are committed without outputs. All logic lives in customgen.inference and customgen.demo."""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]

SETUP_MD = """**On Kaggle**: Settings → Accelerator **GPU T4 x2**, and **Internet on** to download SD v1.5 (or attach
it as an input and set `MODEL` to its folder). Then run once:
```
!git clone https://github.com/<you>/customgen /kaggle/working/customgen
!cd /kaggle/working/customgen && pip install -q -r requirements.txt
import sys; sys.path.insert(0, "/kaggle/working/customgen/src")  # use it without restarting the kernel
```
`SMOKE = True` is for the test suite: it runs on the `tiny` model in seconds (a check that the notebook works,
not a result)."""

TEST_PARAMS = """import os

KAGGLE = os.path.isdir("/kaggle/input")
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, a folder under /kaggle/input, or "tiny"
ARTIFACT = "/kaggle/working/styles/{artifact}"  # the trained artifact folder (style.json inside)
CONTENT_DIR = "/kaggle/working/eda/content_paths.json" if KAGGLE else "outputs/eda/content_paths.json"  # or a folder
N_CONTENT = 4  # content images in each grid (the first N of the fixed content set)
OUTPUT_DIR = "/kaggle/working/infer/{short}" if KAGGLE else "outputs/infer/{short}"
STRENGTHS = [0.3, 0.45, 0.6, 0.75]  # img2img denoising strength grid (style scale 1.0)
SCALES = [0.0, 0.5, 0.8, 1.0]  # style scale grid, at strength FIXED_STRENGTH ({scale_meaning})
FIXED_STRENGTH = None  # None: customgen's default img2img strength (customgen.request.DEFAULTS)
STEPS = None  # DPM-Solver++ steps; None: customgen's default
SEED = 0  # same seed → same pixels
SIZE = None  # working resolution (short side, multiple of 8); None: the model's own (512 for SD v1.5)
OVERWRITE = True  # re-running replaces this notebook's own outputs
SMOKE = False  # True: the test suite's tiny run"""

LOAD = """from customgen.inference import get_session, load_contents, load_style

style = load_style(ARTIFACT)
session = get_session(MODEL)  # the base model loads once; every call below reuses it
contents = load_contents(CONTENT_DIR, limit=N_CONTENT)
m = style.manifest
print(f"{style.name}: method {m.method}, kind {m.kind}, trained on {m.base_model}, prompt {style.default_prompt!r}")
knobs = dict(seed=SEED, size=SIZE, **({} if STEPS is None else {"steps": STEPS}))  # left out: the default
print(f"{len(contents)} content images, working size {SIZE or session.native_size}, model {session.comps.ref}")"""

GRID = """from customgen.inference import plot_grid, save_grid, sweep

{name}_grid = sweep(contents, style, vary="{vary}", values={values}, model=session, **knobs{extra})
print("saved to", save_grid({name}_grid, OUTPUT_DIR, "{name}", overwrite=OVERWRITE))
plot_grid({name}_grid, cell=1.6 if SMOKE else 2.4)"""

TIMING = """import pandas as pd

from customgen.inference import timing_table

times = pd.concat([timing_table(strength_grid).assign(grid="strength"), timing_table(scale_grid).assign(grid="scale")])
print(f"seconds per image: mean {times.seconds.mean():.2f}, median {times.seconds.median():.2f}, max {times.seconds.max():.2f}")
times.groupby("grid").seconds.describe()"""

SPECS = {
    "01-LoRA-Inference-Test": dict(
        title="LoRA style: inference test", artifact="lora_style-Analytical_Cubism", short="lora",
        scale_meaning="LoRA adapter weight",
        intro="Loads a trained LoRA style artifact and stylizes the fixed content set (from `00_Data_EDA`) by "
              "img2img over a grid of denoising strengths and a grid of LoRA scales, timing every image. "
              "LoRA styles are prompt-free: the prompt is empty unless the manifest says otherwise."),
    "02-DreamBooth-Inference-Test": dict(
        title="DreamBooth style: inference test", artifact="dreambooth_style-Analytical_Cubism", short="dreambooth",
        scale_meaning="weights = base + scale·(trained − base)",
        intro="Loads a DreamBooth style artifact (the trained UNet layers) and stylizes the fixed content set. "
              "The trained weights are swapped into the base UNet for each call and the base weights restored "
              "exactly afterwards; the style scale interpolates between the two. The prompt is the manifest's "
              "(it contains the rare token)."),
    "03-Textual-Inversion-Inference-Test": dict(
        title="Textual Inversion style: inference test", artifact="textual_inversion-Analytical_Cubism",
        short="textual_inversion", scale_meaning="prompt-embedding interpolation with/without the token",
        intro="Loads a Textual Inversion artifact (one learned token) and stylizes the fixed content set with the "
              "manifest's prompt. The style scale interpolates the prompt embeddings between the prompt without "
              "the token (0) and with it (1)."),
}


def inference_notebook(spec: dict) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [
        nbf.v4.new_markdown_cell(f"# {spec['title']}\n\n{spec['intro']}\n\n{SETUP_MD}"),
        nbf.v4.new_code_cell(TEST_PARAMS.format(**spec), metadata={"tags": ["parameters"]}),
        nbf.v4.new_markdown_cell("## Artifact, model and content\nThe method comes from the artifact's `style.json`."),
        nbf.v4.new_code_cell(LOAD),
        nbf.v4.new_markdown_cell("## Strength grid\nDenoising strength as diffusers means it: the fraction of the "
                                 "schedule re-run from the noised content (0 keeps the photo, 1 ignores it)."),
        nbf.v4.new_code_cell(GRID.format(name="strength", vary="strength", values="STRENGTHS", extra="")),
        nbf.v4.new_markdown_cell(f"## Scale grid\nStyle scale at strength `FIXED_STRENGTH` ({spec['scale_meaning']}); "
                                 "scale 0 is the base model."),
        nbf.v4.new_code_cell(GRID.format(name="scale", vary="scale", values="SCALES",
                                         extra=", strength=FIXED_STRENGTH")),
        nbf.v4.new_markdown_cell("## Time per image\nGeneration only (weights were loaded before the clock started); "
                                 "CUDA is synchronised around each image."),
        nbf.v4.new_code_cell(TIMING),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


DEMO_PARAMS = """import os

KAGGLE = os.path.isdir("/kaggle/input")
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, a folder under /kaggle/input, or "tiny"
STYLES_DIR = "/kaggle/working/styles" if KAGGLE else "outputs/styles"  # one artifact folder per style
HOST = "127.0.0.1"  # this machine only
PORT = None  # None: the first free port from 7860
SHARE = False  # True: a public gradio.live link for 72 h (on Kaggle the way to open the app); anyone with it can use it
SMOKE = False  # True: start and stop the server without blocking (the test suite)"""

DEMO_MD = """# Demo application

A Gradio app over `customgen.inference`: upload a photo, choose a style from the library (or upload a style
image), set the stylization, optionally paint a mask or turn on structure guidance, and click **Stylize**;
the result appears beside the photo and downloads as a PNG that carries every setting. A second tab generates
images from text with a style or a subject. The same app runs from a terminal: `customgen demo --styles DIR`.

The server binds to `127.0.0.1`. On Kaggle the browser cannot reach that address: set `SHARE = True` to get a
public link (anyone who has it can use your GPU session while it runs).

""" + SETUP_MD

DEMO_BUILD = """from customgen.demo import create_app

app = create_app(model=MODEL, styles_dir=STYLES_DIR)  # loads the model once, reads the style library
state = app.customgen_state
print(f"model {state.session.comps.ref}; {len(state.styles)} styles in {state.library.root}: {', '.join(state.styles)}")"""

DEMO_LAUNCH = """from customgen.demo import launch

if SMOKE:
    launch(app, host=HOST, port=PORT, prevent_thread_lock=True)
    print("served at", app.local_url)
    app.close()
else:
    launch(app, host=HOST, port=PORT, share=SHARE)"""


def demo_notebook() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [
        nbf.v4.new_markdown_cell(DEMO_MD),
        nbf.v4.new_code_cell(DEMO_PARAMS, metadata={"tags": ["parameters"]}),
        nbf.v4.new_markdown_cell("## Build the app"),
        nbf.v4.new_code_cell(DEMO_BUILD),
        nbf.v4.new_markdown_cell("## Launch\nUpload limits: 20 MB per file and 16.8 megapixels; bad inputs show a "
                                 "message in the app. Stop with the ■ button (or `app.close()`)."),
        nbf.v4.new_code_cell(DEMO_LAUNCH),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    for name, spec in SPECS.items():
        nbf.write(inference_notebook(spec), ROOT / "testInfer" / f"{name}.ipynb")
    nbf.write(demo_notebook(), ROOT / "notebooks" / "03_Demo_Application.ipynb")


if __name__ == "__main__":
    main()
