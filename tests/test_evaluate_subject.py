"""`customgen evaluate` on subjects, end to end on `tiny` (a real 3-step subject with snapshots at steps 1 and 2):
one row per step plus the baseline with every metric finite, the files and plots, the best step printed, re-runs
that generate nothing, a library holding a style and a subject, the best-step rule, errors (2 processes == 1:
tests/test_evaluate_subject_speed.py)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import customgen.inference.txt2img as txt2img
from customgen import metrics as M
from customgen.cli import main
from customgen.evaluate.subjects import choose_step
from customgen.evaluate.subjects.report import COLUMNS
from customgen.metrics.dino_network import DinoEncoder
from customgen.metrics.networks import OpenClipEmbedder
from tests.artifact_fixtures import make_lora
from tests.eval_fixtures import ARTIFACTS, make_eval_data, train_tiny_styles
from tests.subject_fixtures import shared_subject_env

METRICS = ["dino", "clip_i", "clip_t", "div", "pres"]
PROMPTS = '["a {token} {noun} on the beach", "a {token} {noun} in the snow"]'
ONE_PROMPT = 'eval.prompts=["a {token} {noun} on the beach"]'  # later --set wins: faster runs where enough


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return shared_subject_env(tmp_path_factory)


def sets(library: Path, out: Path, *extra: str) -> list[str]:
    values = [f"eval.styles={library}", f"eval.output={out}", "eval.steps=2", "eval.size=64", "eval.smoke=true",
              "eval.samples_per_prompt=2", "eval.min_size=32", f"eval.prompts={PROMPTS}", *extra]
    return [a for kv in values for a in ("--set", kv)]


def argv(library: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "configs/eval_subject.yaml", "--model", "tiny", *sets(library, out, *extra)]


class Counter:
    """Counts calls into the real txt2img generate and the image encoders (images seen)."""

    def __init__(self, monkeypatch):
        self.generate, self.encoded = [], {"dino": 0, "clip": 0}
        real_gen, real_dino, real_clip = txt2img.generate, DinoEncoder.encode, OpenClipEmbedder.encode

        def gen(prompt=None, styles=None, request=None, **kw):
            self.generate.append((prompt, styles, request))
            return real_gen(prompt, styles, request, **kw)

        def dino(enc, images):
            self.encoded["dino"] += len(images)
            return real_dino(enc, images)

        def clip(enc, images):
            self.encoded["clip"] += len(images)
            return real_clip(enc, images)

        monkeypatch.setattr(txt2img, "generate", gen)
        monkeypatch.setattr(DinoEncoder, "encode", dino)
        monkeypatch.setattr(OpenClipEmbedder, "encode", clip)


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    """One evaluation: (out, counter, stdout)."""
    out = tmp_path_factory.mktemp("subject_eval") / "results"
    mp = pytest.MonkeyPatch()
    counter = Counter(mp)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert main(argv(env["library"], out)) == 0
    finally:
        mp.undo()
    return out, counter, buf.getvalue()


def test_one_row_per_step_plus_baseline_every_metric_finite(first_run, env):
    out, counter, _ = first_run
    m = pd.read_csv(out / "subject_metrics.csv")
    assert list(m.columns) == COLUMNS
    assert list(zip(m["model"], m["step"])) == [("baseline", 0), ("sks_dog", 1), ("sks_dog", 2), ("sks_dog", 3)]
    assert list(m["weights"].fillna("")) == ["", "snapshots/step-000001", "snapshots/step-000002", "."]
    for col in METRICS + [f"{c}_std" for c in METRICS] + ["seconds_per_image"]:
        assert np.isfinite(m[col]).all(), col
    assert m["smoke"].all() and (m["n_images"] == 6).all() and (m["n_flagged"] == 0).all()
    assert (m["n_prompts"] == 2).all() and (m["n_instances"] == 4).all() and m["best"].sum() == 1
    steps = m[m["model"] != "baseline"]
    assert (steps["artifact_bytes"] > 0).all() and (m.loc[m["model"] == "baseline", "artifact_bytes"] == 0).all()
    # 4 points (baseline, steps 1-3) × (2 prompts + the class prompt), one batch of 2 each, all from seed 0
    assert len(counter.generate) == 12 and {r.num_images for _, _, r in counter.generate} == {2}
    assert {r.seed for _, _, r in counter.generate} == {0}
    assert {p for p, _, _ in counter.generate} == {"a sks dog on the beach", "a sks dog in the snow", "a photo of dog"}


def test_features_are_computed_once_per_image(first_run, env):
    out, counter, _ = first_run
    per = pd.read_csv(out / "subject_per_image.csv")
    images = {M.image_digest(out / p) for p in per["output"]} | {M.image_digest(p) for p in env["photos"].iterdir()}
    assert counter.encoded == {"dino": len(images), "clip": len(images)}


def test_metrics_are_computed_from_the_per_image_rows(first_run, env):
    out, _, _ = first_run
    m = pd.read_csv(out / "subject_metrics.csv").set_index("step")
    per = pd.read_csv(out / "subject_per_image.csv")
    assert len(per) == 24 and per["smoke"].all() and per["flag"].isna().all()
    assert per[per["role"] == "class"]["clip_t"].isna().all() and per[per["role"] == "prompt"]["clip_t"].notna().all()
    nets = M.MetricNetworks(smoke=True, device="cpu")
    for step, g in per.groupby("step"):
        prompt, cls = g[g["role"] == "prompt"], g[g["role"] == "class"]
        for col in ("dino", "clip_i", "clip_t"):
            assert m.loc[step, col] == pytest.approx(prompt[col].mean(), rel=1e-9)
            assert m.loc[step, f"{col}_std"] == pytest.approx(prompt[col].std(ddof=1), rel=1e-6)
        assert m.loc[step, "pres"] == pytest.approx(cls["dino"].mean(), rel=1e-9)
        divs = [M.div([out / p for p in b["output"]], net=nets.lpips("alex")).value for _, b in prompt.groupby("prompt")]
        assert m.loc[step, "div"] == pytest.approx(np.mean(divs), rel=1e-6)
    outputs = [out / p for p in per["output"]]
    assert all(p.is_file() for p in outputs)


def test_files_plots_provenance_and_the_printed_best_step(first_run):
    out, _, stdout = first_run
    for name in ("subject_curves", "subject_tradeoff", "subject_samples_sks_dog"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
    doc = json.loads((out / "subject_metrics.json").read_text())
    run = doc["run"]
    assert run["command"].startswith("customgen evaluate configs/eval_subject.yaml --model tiny")
    assert run["model"] == "tiny" and run["device"]["device"] == "cpu" and run["smoke"]
    assert {"dino", "clip", "lpips_alex"} <= set(run["metric_networks"]) and run["images"]["generated"] == 24
    m = pd.read_csv(out / "subject_metrics.csv")
    (best,) = doc["best"]
    assert best["step"] == int(m.loc[m["best"], "step"].iloc[0]) and best["margin"] == 0.02
    assert f"subject sks_dog: best step {best['step']}: " in stdout and best["reason"] in stdout
    summary = (out / "summary.md").read_text()
    assert "smoke: random-weight metric networks" in summary and best["reason"] in summary
    assert "4 result rows in" in stdout and "subject_metrics.csv" in stdout


def test_a_second_run_generates_and_encodes_nothing(first_run, env, monkeypatch):
    """Run again, this time with eval.styles naming the artifact's own folder (a library of one artifact)."""
    out, _, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "subject_images").rglob("*.png")}
    old = pd.read_csv(out / "subject_metrics.csv")
    counter = Counter(monkeypatch)
    assert main(argv(env["subject"], out)) == 0
    assert counter.generate == [] and counter.encoded == {"dino": 0, "clip": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "subject_images").rglob("*.png")} == before
    pd.testing.assert_frame_equal(old, pd.read_csv(out / "subject_metrics.csv"))
    assert json.loads((out / "subject_metrics.json").read_text())["run"]["images"]["reused"] == 24


def test_changed_settings_or_retrained_weights_refuse_to_reuse(first_run, env, tmp_path, capsys):
    out, _, _ = first_run
    assert main(argv(env["library"], out, "eval.seed=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=0" in err[0] and "--overwrite" in err[0]
    library = tmp_path / "library"
    shutil.copytree(env["library"], library)
    manifest = json.loads((library / "sks_dog" / "style.json").read_text())
    (library / "sks_dog" / "style.json").write_text(json.dumps(manifest | {"created": "retrained"}))
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert main(argv(library, copy)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights=" in err[0] and "--overwrite" in err[0]


def test_style_and_subject_in_one_library(env, tmp_path, capsys):
    data = make_eval_data(tmp_path / "data")
    library = train_tiny_styles(tmp_path / "library", data["wikiart"], artifacts=ARTIFACTS[:1])
    os.symlink(env["subject"], library / "sks_dog")
    out = tmp_path / "out"
    extra = [f"eval.content_root={data['coco']}", f"eval.style_root={data['wikiart']}", "eval.strength=0.5", ONE_PROMPT]
    assert main(argv(library, out, *extra)) == 0
    m = pd.read_csv(out / "metrics.csv")
    assert sorted(m["model"]) == ["baseline", "lora_impressionism"] and set(m["style"]) == {"Impressionism"}
    s = pd.read_csv(out / "subject_metrics.csv")
    assert list(s["step"]) == [0, 1, 2, 3] and set(s["subject"]) == {"sks_dog"}
    summary = (out / "summary.md").read_text()
    assert summary.index("# Evaluation summary") < summary.index("# Subject evaluation")
    assert (out / "plots" / "metric_bars.png").is_file() and (out / "plots" / "subject_curves.png").is_file()
    stdout = capsys.readouterr().out
    assert "2 result rows in" in stdout and "metrics.csv" in stdout and "best step" in stdout


def test_a_subject_without_config_needs_instance_root(env, tmp_path, capsys):
    library = tmp_path / "library"
    make_lora(library / "person", seed=15, method="dreambooth_lora_subject", token="sks",
              prompt="a photo of sks person", text_encoder=True)  # no config.yaml: no data.root
    assert main(argv(library, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: subject person") and "eval.instance_root" in err[0]
    assert not (tmp_path / "out" / "subject_images").exists()
    assert main(argv(library, tmp_path / "out", f"eval.instance_root={env['photos']}", ONE_PROMPT)) == 0
    m = pd.read_csv(tmp_path / "out" / "subject_metrics.csv")
    assert list(m["model"]) == ["baseline", "person"]  # no snapshots: the final artifact only
    per = pd.read_csv(tmp_path / "out" / "subject_per_image.csv")
    assert set(per["prompt"]) == {"a sks person on the beach", "a photo of a person"}


def table(rows, base_t=0.30):
    df = pd.DataFrame([{"subject": "s", "model": "s", "step": s, "dino": d, "clip_t": t} for s, d, t in rows])
    return pd.concat([pd.DataFrame([{"subject": "s", "model": "baseline", "step": 0, "dino": 0.1, "clip_t": base_t}]),
                      df], ignore_index=True)


STEPS = [(1000, 0.5, 0.30), (2000, 0.6, 0.29), (3000, 0.7, 0.28), (4000, 0.72, 0.25), (5000, 0.71, 0.24),
         (6000, math.nan, 0.31)]


@pytest.mark.parametrize("base_t, margin, step, front, says", [
    (0.30, 0.02, 3000, [1000, 2000, 3000, 4000], "stays within 0.02 of the baseline's 0.300 (≥ 0.280)"),
    (0.30, 0.0, 1000, [1000, 2000, 3000, 4000], "highest DINO (0.500)"),
    (0.30, 0.06, 4000, [1000, 2000, 3000, 4000], "highest DINO (0.720)"),
    (0.40, 0.01, 1000, [1000, 2000, 3000, 4000], "no step on the front keeps CLIP-T within 0.01"),
])
def test_best_step_rule(base_t, margin, step, front, says):
    choice, mask = choose_step(table(STEPS, base_t), margin)
    assert choice["step"] == step and choice["front"] == front and says in choice["reason"]
    assert list(mask) == [s in front for s, _, _ in STEPS]  # 5000 is dominated by 4000; NaN never on the front


def test_best_step_ties_go_to_the_earliest_step():
    choice, _ = choose_step(table([(500, 0.6, 0.3), (1000, 0.6, 0.3)]), 0.02)
    assert choice["step"] == 500
