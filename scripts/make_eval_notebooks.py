"""Write notebooks/04a, 04b (style evaluation), 04c (subject evaluation) and 05 (results analysis). Run after
editing; the notebooks are committed without outputs. All logic lives in customgen.evaluate (and its plots)."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell as code, new_markdown_cell as md, new_notebook

ROOT = Path(__file__).resolve().parents[1]
KAGGLE_MD = """**On Kaggle**: Settings → Accelerator **GPU T4**, and **Internet on**: SD v1.5 and the metric networks'
weights (CLIP ViT-B/32, AlexNet for LPIPS, the FID Inception) are downloaded once. Without them the metrics fall
back to random-weight *smoke* networks and every table and figure says so. Then run once:
```
!git clone https://github.com/<you>/customgen /kaggle/working/customgen
!cd /kaggle/working/customgen && pip install -q -r requirements.txt
import sys; sys.path.insert(0, "/kaggle/working/customgen/src")  # use it without restarting the kernel
```
Attach WikiArt and COCO 2017 and leave the roots `None`: they are found under `/kaggle/input`."""

def params(src):
    return code(src, metadata={"tags": ["parameters"]})

COMMON_PARAMS = '''import os

KAGGLE = os.path.isdir("/kaggle/input")
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder or .safetensors (tests: "tiny")
STYLES_DIR = "/kaggle/working/styles" if KAGGLE else "outputs/styles"  # artifacts of the training notebooks
CONTENT_ROOT = None  # COCO val2017 (or any photo folder); None → detected under /kaggle/input
STYLE_ROOT = None  # WikiArt root (one folder per style); None → detected under /kaggle/input
CONTENT_PATHS = None  # optional content_paths.json from 00_Data_EDA (used instead of CONTENT_ROOT)
STYLE_PATHS = None  # optional style_paths.json from 00_Data_EDA (used instead of STYLE_ROOT)
OUTPUT_DIR = "/kaggle/working/{out}" if KAGGLE else "outputs/{out}"
METHODS = {methods}  # manifest methods evaluated here (the baseline always runs)
# None below = customgen's default (EvalConfig in src/customgen/config.py); the next cell prints what runs.
MAX_CONTENTS = None  # content photos (seeded choice)
STRENGTH = None  # img2img strength for every method and the baseline
STYLE_SCALE = None  # LoRA adapter scale (DreamBooth/TI run at 1)
STEPS = None  # inference steps
SIZE = None  # working resolution (short side)
SEED = None  # the same seed for every method and the baseline
SWEEP = True  # strength × scale trade-off sweep
SWEEP_STRENGTHS = None  # img2img strengths of the sweep
SWEEP_SCALES = {scales}  # adapter scales of the sweep (kinds without a scale run at 1)
MIN_SIZE = None  # skip content/reference images with a shorter side below this
SMOKE = False  # True: random-weight metric networks (tests); results are marked smoke
'''

SETUP = '''%matplotlib inline
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from customgen.evaluate import plots
from customgen.config import load_config
from customgen.data import resolve_data_roots
from customgen.evaluate import describe_front, evaluate, load_results

need = [k for k, given in (("coco", CONTENT_PATHS), ("wikiart", STYLE_PATHS)) if not given]
roots = resolve_data_roots(wikiart=STYLE_ROOT, coco=CONTENT_ROOT, need=need)
chosen = dict(max_contents=MAX_CONTENTS, strength=STRENGTH, style_scale=STYLE_SCALE, steps=STEPS, size=SIZE,
              seed=SEED, sweep_strengths=SWEEP_STRENGTHS, sweep_scales=SWEEP_SCALES, min_size=MIN_SIZE)
cfg = load_config(None, model__ref=MODEL, eval__styles=str(STYLES_DIR), eval__methods=list(METHODS),
                  eval__content_root=str(roots["coco"] or ""), eval__content_paths=CONTENT_PATHS or "",
                  eval__style_root=str(roots["wikiart"] or ""), eval__style_paths=STYLE_PATHS or "",
                  eval__output=str(OUTPUT_DIR), eval__sweep=SWEEP, eval__smoke=SMOKE,
                  **{f"eval__{k}": v for k, v in chosen.items() if v is not None})  # None: the default
e = cfg.eval
print(f"model {MODEL}\\nstyles {STYLES_DIR}\\ncontent {CONTENT_PATHS or roots['coco']}\\n"
      f"references {STYLE_PATHS or roots['wikiart']}\\noutput {Path(OUTPUT_DIR).resolve()}\\n"
      f"strength {e.strength}, style scale {e.style_scale}, steps {e.steps}, size {e.size}, seed {e.seed}, "
      f"{e.max_contents} contents; sweep strengths {e.sweep_strengths} × scales {e.sweep_scales}")
'''

RUN = '''table = evaluate(cfg, command=f"notebooks/{name}.ipynb (MODEL={{MODEL}}, METHODS={{METHODS}})")
results = load_results(OUTPUT_DIR)
fig_kw = dict(smoke=results.smoke, provenance=results.provenance)
display(Markdown((Path(OUTPUT_DIR) / "summary.md").read_text()))
'''

PLOTS = '''display(plots.plot_metric_bars(results.metrics, **fig_kw))
display(plots.plot_baseline_comparison(results.metrics, **fig_kw))
'''

SWEEP = '''if results.sweep is not None:
    display(plots.plot_tradeoff(results.sweep, **fig_kw))
    print(describe_front(results.sweep))
'''

SAMPLES = '''for style in sorted(set(results.per_image["style"])):
    display(plots.plot_samples(results.per_image, style, **fig_kw))
'''

COST = '''cost = ["model", "method", "style", "seconds_per_image", "infer_peak_memory_bytes", "trainable_params",
        "artifact_bytes", "train_seconds", "peak_memory_bytes"]
display(results.metrics[cost])
print("figures:", *sorted(p.name for p in (Path(OUTPUT_DIR) / "plots").glob("*.png")))
'''

def eval_nb(name, title, intro, methods, scales, out, sweep_note):
    return new_notebook(cells=[
        md(f"# {title}\n\n{intro}\n\n"
           "Every style in `STYLES_DIR` whose method is in `METHODS` stylizes the same content photos with the same seed and "
           "strength as the **baseline** (plain SD v1.5 img2img, no style). The metrics are defined in "
           "`docs/evaluation_metrics.md`; all logic lives in `customgen.evaluate` and `customgen.evaluate.plots`.\n\n"
           "Re-running resumes: stylized images already in `OUTPUT_DIR/images` are reused.\n\n" + KAGGLE_MD),
        params(COMMON_PARAMS.format(out=out, methods=methods, scales=scales)),
        code(SETUP),
        md("## 1. Run the evaluation\n\nA progress bar shows the stylization, then the metrics. The table below is "
           "`summary.md`, written by the run (numbers come from `metrics.csv`). Smoke runs say so at the top."),
        code(RUN.format(name=name)),
        md("## 2. Metrics against the baseline\n\nBars are means ± standard deviation over content images; the second "
           "figure subtracts the baseline of the same style. Black/NaN outputs are flagged in `per_image.csv` and left "
           "out of every mean (`n_flagged`)."),
        code(PLOTS),
        md(f"## 3. Trade-off sweep\n\n{sweep_note} Each point is the mean (CLIP-content, CLIP-style) over the content "
           "set; lower is better on both axes, so the black Pareto front joins the settings no other setting beats on "
           "both. Labels give the img2img strength."),
        code(SWEEP),
        md("## 4. Samples\n\nContent | baseline | each evaluated style, for the first content photos."),
        code(SAMPLES),
        md("## 5. Cost\n\nGeneration time is the median per image on this device (the first image also loads "
           "weights); training cost comes from each artifact's `style.json`."),
        code(COST),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                 "language_info": {"name": "python"}})

nb_a = eval_nb("04a_Evaluation_Metrics_LoRA", "04a · Evaluation metrics: LoRA styles",
               "Evaluates the LoRA style artifacts: CLIP-content, CLIP-style, Style Strength, SSIM, LPIPS, FID/KID "
               "(with sample sizes), ArtFID and cost, plus the strength × LoRA-scale trade-off sweep.",
               '["lora_style"]', "None", "eval/lora",
               "For LoRA both the img2img strength and the adapter scale move the result: one curve per scale.")
nb_b = eval_nb("04b_Evaluation_Metrics_DreamBooth_TI", "04b · Evaluation metrics: DreamBooth and Textual Inversion",
               "Evaluates the DreamBooth and Textual Inversion style artifacts with the same metrics, contents, seed "
               "and baseline as 04a, so 05 can compare all three methods.",
               '["dreambooth_style", "textual_inversion"]', "[1.0]", "eval/dreambooth_ti",
               "DreamBooth and Textual Inversion have no adapter scale here: the sweep varies the strength only.")

SUBJECT_KAGGLE_MD = """**On Kaggle**: Settings → Accelerator **GPU T4**, and **Internet on**: SD v1.5 and the metric networks'
weights (DINO ViT-S/16, CLIP ViT-B/32, AlexNet for LPIPS) are downloaded once. Without them the metrics fall back to
random-weight *smoke* networks and every table and figure says so. Then run once:
```
!git clone https://github.com/<you>/customgen /kaggle/working/customgen
!cd /kaggle/working/customgen && pip install -q -r requirements.txt
import sys; sys.path.insert(0, "/kaggle/working/customgen/src")  # use it without restarting the kernel
```
The subject artifacts come from 01d (`/kaggle/working/styles`); their instance photos are found from each
artifact's `config.yaml` (`data.root`, e.g. under `/kaggle/input`), or set `INSTANCE_ROOT`."""

SUBJECT_PARAMS = '''import os

KAGGLE = os.path.isdir("/kaggle/input")
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder or .safetensors (tests: "tiny")
STYLES_DIR = "/kaggle/working/styles" if KAGGLE else "outputs/styles"  # subject artifacts of 01d, with snapshots
INSTANCE_ROOT = None  # the subject's photos; None → data.root in each artifact's config.yaml
OUTPUT_DIR = "/kaggle/working/eval/subject" if KAGGLE else "outputs/eval/subject"
METHODS = ["dreambooth_lora_subject"]  # manifest methods evaluated here (the base model always runs)
# None below = customgen's default (EvalConfig in src/customgen/config.py); the next cell prints what runs.
PROMPT_SET = None  # "project" (5 prompts) or "dreambooth" (the paper's 25, object or live by the class noun)
PROMPTS = None  # your own templates instead, with {token} and {noun}: ["a {token} {noun} on the beach"]
CLASS_NOUN = None  # the subject's class; None → from the artifact's class prompt / instance prompt
SAMPLES_PER_PROMPT = None  # seeds per prompt and step (one batch; DIV needs at least 2)
STEPS = None  # inference steps
SIZE = None  # image side in px
SEED = None  # the same seed for every step and the baseline
FIDELITY_MARGIN = None  # best step: CLIP-T at most this far below the base model's
MIN_SIZE = None  # skip instance photos with a shorter side below this
SMOKE = False  # True: random-weight metric networks (tests); results are marked smoke
'''

SUBJECT_SETUP = '''%matplotlib inline
from pathlib import Path

from IPython.display import Markdown, display

from customgen.config import load_config
from customgen.evaluate import evaluate
from customgen.evaluate.subjects import (best_line, load_subject_results, plot_identity_fidelity,
                                         plot_subject_curves, plot_subject_samples)

chosen = dict(instance_root=INSTANCE_ROOT, subject_prompts=PROMPT_SET, prompts=PROMPTS, class_noun=CLASS_NOUN,
              samples_per_prompt=SAMPLES_PER_PROMPT, steps=STEPS, size=SIZE, seed=SEED,
              fidelity_margin=FIDELITY_MARGIN, min_size=MIN_SIZE)
cfg = load_config(None, model__ref=MODEL, eval__styles=str(STYLES_DIR), eval__methods=list(METHODS),
                  eval__output=str(OUTPUT_DIR), eval__smoke=SMOKE,
                  **{f"eval__{k}": v for k, v in chosen.items() if v is not None})  # None: the default
e = cfg.eval
print(f"model {MODEL}\\nsubjects {STYLES_DIR}\\noutput {Path(OUTPUT_DIR).resolve()}\\n"
      f"prompts {e.prompts or e.subject_prompts}, {e.samples_per_prompt} seeds from {e.seed}, {e.steps} steps, "
      f"{e.size} px; best step: CLIP-T within {e.fidelity_margin} of the base model's")
'''

SUBJECT_RUN = '''table = evaluate(cfg, command=f"notebooks/04c_Evaluation_Metrics_Subject.ipynb (MODEL={MODEL}, METHODS={METHODS})")
results = load_subject_results(OUTPUT_DIR)
fig_kw = dict(smoke=results.smoke, provenance=results.provenance)
display(Markdown((Path(OUTPUT_DIR) / "summary.md").read_text()))
'''

SUBJECT_PLOTS = '''display(plot_subject_curves(results.metrics, **fig_kw))
display(plot_identity_fidelity(results.metrics, margin=results.margin, **fig_kw))
for choice in results.best:
    print(best_line(choice))
'''

SUBJECT_SAMPLES = '''for subject in dict.fromkeys(results.per_image["subject"]):
    display(plot_subject_samples(results.per_image, subject, **fig_kw))
'''

SUBJECT_COST = '''cost = ["subject", "model", "step", "seconds_per_image", "infer_peak_memory_bytes", "trainable_params",
        "artifact_bytes", "train_seconds"]
display(results.metrics[cost])
print("figures:", *sorted(p.name for p in (Path(OUTPUT_DIR) / "plots").glob("subject_*.png")))
'''

nb_s = new_notebook(cells=[
    md("# 04c · Evaluation metrics: subjects — which step learned my subject?\n\n"
       "Every subject artifact in `STYLES_DIR` whose method is in `METHODS`, each of its snapshots "
       "(`snapshots/step-NNNNNN`, written during training with `train.snapshot_every`) and the **baseline** (the "
       "base model, no adapter) generate the same prompts with the same seeds. DreamBooth's metrics (Ruiz et al. "
       "2023) score every step: **DINO** and **CLIP-I** (identity: similarity to the real photos), **CLIP-T** "
       "(prompt fidelity, the rare token removed from the prompt), **DIV** (diversity between seeds) and **PRES** "
       "(class drift: class-prompt images that look like the subject). Definitions: `docs/evaluation_metrics.md`; all "
       "logic lives in `customgen.evaluate`.\n\nRe-running resumes: images already in "
       "`OUTPUT_DIR/subject_images` are reused.\n\n" + SUBJECT_KAGGLE_MD),
    params(SUBJECT_PARAMS),
    code(SUBJECT_SETUP),
    md("## 1. Run the evaluation\n\nA progress bar shows the generation (one batch per step and prompt), then the "
       "metrics. The table below is `summary.md`, written by the run (numbers come from `subject_metrics.csv`). "
       "Smoke runs say so at the top."),
    code(SUBJECT_RUN),
    md("## 2. Metrics over training, and the best step\n\nIdentity usually rises with training while CLIP-T and DIV "
       "fall once the model starts copying the photos (same pose, same background); PRES rises when the class "
       "itself drifts towards the subject. The second figure puts identity against fidelity: the black line joins the "
       "steps no other step beats on both. **Best step**: the highest DINO on that front among the steps whose "
       "CLIP-T stays within `FIDELITY_MARGIN` of the base model's; the sentence below says why it won."),
    code(SUBJECT_PLOTS),
    md("## 3. Samples\n\nThe first seed of each prompt, per step (last column: the class prompt). Look for copied "
       "poses and backgrounds at late steps before trusting a number."),
    code(SUBJECT_SAMPLES),
    md("## 4. Cost\n\nGeneration time is the median per image on this device; the artifact size is each step's "
       "weights file."),
    code(SUBJECT_COST),
], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
             "language_info": {"name": "python"}})

RESULTS_PARAMS = '''import os

KAGGLE = os.path.isdir("/kaggle/input")
BASE = "/kaggle/working" if KAGGLE else "outputs"
RESULTS_DIRS = [f"{BASE}/eval/lora", f"{BASE}/eval/dreambooth_ti"]  # eval.output folders of 04a and 04b
SUBJECT_DIRS = [f"{BASE}/eval/subject"]  # eval.output folders of 04c (shown when they hold subject results)
OUTPUT_DIR = f"{BASE}/eval/analysis"  # combined figures go here
N_SAMPLES = 3  # content rows in the sample grids
'''

RESULTS_SETUP = '''%matplotlib inline
from pathlib import Path

from IPython.display import display

from customgen.evaluate import plots
from customgen.evaluate import best_per_style, describe_front, has_subject_results, load_results, load_subject_results
from customgen.evaluate.subjects import best_line, plot_identity_fidelity, plot_subject_curves

style_dirs = [d for d in RESULTS_DIRS if (Path(d) / "metrics.csv").is_file()]
subject_dirs = [d for d in SUBJECT_DIRS if has_subject_results(d)]
results = load_results(*style_dirs) if style_dirs else None
subjects = load_subject_results(*subject_dirs) if subject_dirs else None
fig_kw = dict(smoke=results.smoke, provenance=results.provenance) if results else {}
out = Path(OUTPUT_DIR)
out.mkdir(parents=True, exist_ok=True)
for run in (results.runs if results else []) + (subjects.runs if subjects else []):
    print(f"{run['command']}\\n  device {run['device']['name']}, model {run['model']}, finished {run['finished']}")
if (results and results.smoke) or (subjects and subjects.smoke):
    print("SMOKE: random-weight metric networks — these numbers check plumbing, not quality")
print(f"style results: {style_dirs or 'none'}; subject results: {subject_dirs or 'none'}")
'''

nb_c = new_notebook(cells=[
    md("# 05 · Results analysis\n\nReads the results of 04a (LoRA) and 04b (DreamBooth, Textual Inversion) — "
       "`metrics.csv`, `per_image.csv`, `sweep.csv`, `run.json` — and compares the methods; then, when 04c has run, "
       "the subject results (`subject_metrics.csv`). Every number shown is read from those files; the figures name "
       "the command, device and model that produced them."),
    params(RESULTS_PARAMS),
    code(RESULTS_SETUP),
    md("## 1. All methods side by side\n\nOne row per model and reference style (baselines shared by both runs are "
       "kept once)."),
    code('''cols = ["model", "method", "style", "clip_content", "clip_style", "style_strength", "ssim", "lpips", "fid",
        "fid_n", "fid_n_ref", "kid", "kid_std", "art_fid", "n_images", "n_flagged", "smoke"]
if results is not None:
    display(results.metrics[cols].round(4))
    display(best_per_style(results.metrics))
'''),
    md("## 2. Figures\n\nMetric bars (mean ± std over content images) and the difference to plain SD img2img. "
       "Style Strength is CLIP-content relative to the baseline: above 1 the method moves further from the photo."),
    code('''figs = {}
if results is not None:
    figs = {"metric_bars": plots.plot_metric_bars(results.metrics, **fig_kw),
            "baseline_comparison": plots.plot_baseline_comparison(results.metrics, **fig_kw)}
    if results.sweep is not None:
        figs["tradeoff"] = plots.plot_tradeoff(results.sweep, **fig_kw)
    for style in sorted(set(results.per_image["style"])):
        figs[f"samples_{style}"] = plots.plot_samples(results.per_image, style, n_contents=N_SAMPLES, **fig_kw)
for name, fig in figs.items():
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    display(fig)
'''),
    md("## 3. The content–style trade-off\n\n"
       "Stronger img2img (and, for LoRA, a larger adapter scale) moves the output away from the photo (CLIP-content ↑) "
       "and, if the method learned the style, towards the style references (CLIP-style ↓). A method is worth its cost "
       "where its curve lies below and left of the baseline's: the same content change buys more style. The Pareto "
       "front (all methods pooled, per style) lists the settings no other setting beats on both axes; the lines "
       "below are generated from `sweep.csv`.\n\n"
       "Caveats: CLIP mixes content and style, FID on a few dozen images is biased upward (read KID and the sample "
       "sizes beside it), and smoke runs carry no quality information at all."),
    code('''if results is not None and results.sweep is not None:
    print(describe_front(results.sweep))
    front = results.sweep[results.sweep["pareto"]]
    display(front.groupby(["style", "method"]).size().rename("points on the front").reset_index())
'''),
    md("## 4. Cost\n\nTraining cost from each artifact's manifest, generation cost measured during evaluation."),
    code('''cost = ["model", "method", "style", "trainable_params", "artifact_bytes", "train_seconds", "peak_memory_bytes",
        "seconds_per_image", "infer_peak_memory_bytes"]
if results is not None:
    display(results.metrics[results.metrics["model"] != "baseline"][cost])
'''),
    md("## 5. Subjects: which step learned the subject?\n\n"
       "From 04c: one row per subject and training step, the base model first. DINO and CLIP-I measure identity, "
       "CLIP-T prompt fidelity, DIV the variety between seeds, PRES how far the class drifted onto the subject. The "
       "best step is the highest DINO on the identity–fidelity front whose CLIP-T stays within `eval.fidelity_margin` "
       "of the base model's (the rule is in `docs/evaluation_metrics.md`); the lines below give each choice's reason."),
    code('''if subjects is None:
    print("no subject results in SUBJECT_DIRS: run 04c first")
else:
    kw = dict(smoke=subjects.smoke, provenance=subjects.provenance)
    cols = ["subject", "model", "step", "dino", "clip_i", "clip_t", "div", "pres", "seconds_per_image",
            "artifact_bytes", "n_images", "n_flagged", "pareto", "best", "smoke"]
    display(subjects.metrics[cols].round(4))
    for choice in subjects.best:
        print(best_line(choice))
    subject_figs = {"subject_curves": plot_subject_curves(subjects.metrics, **kw),
                    "subject_tradeoff": plot_identity_fidelity(subjects.metrics, margin=subjects.margin, **kw)}
    for name, fig in subject_figs.items():
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        display(fig)
'''),
], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
             "language_info": {"name": "python"}})

for name, nb in [("04a_Evaluation_Metrics_LoRA", nb_a), ("04b_Evaluation_Metrics_DreamBooth_TI", nb_b),
                 ("04c_Evaluation_Metrics_Subject", nb_s), ("05_Results_Analysis", nb_c)]:
    nbformat.validate(nb)
    nbformat.write(nb, ROOT / "notebooks" / f"{name}.ipynb")
    print("wrote", ROOT / "notebooks" / f"{name}.ipynb")
