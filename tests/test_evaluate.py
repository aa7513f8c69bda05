"""`customgen evaluate` end to end on `tiny` (real 2-step artifacts): results, resume, black outputs, Pareto, errors."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import customgen.inference.img2img as img2img
from customgen.cli import main
from customgen.evaluate import BASELINE, pareto_front
from customgen.evaluate.inputs import match_reference
from customgen.evaluate.report import COLUMNS
from tests.eval_fixtures import shared_eval_env
from tests.tolerance import gamma

DOCUMENTED = ["clip_content", "clip_style", "style_strength", "ssim", "lpips", "fid", "kid", "art_fid",
              "seconds_per_image"]
PER_IMAGE = ["clip_content", "clip_style", "style_strength", "ssim", "lpips"]
# pandas < 3 parses floats approximately by default (up to ~7600 ulp seen on 2.2.2, Kaggle's); "round_trip" is exact
EXACT_CSV = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return shared_eval_env(tmp_path_factory)


def argv(env, out: Path, *extra: str) -> list[str]:
    sets = {"eval.styles": env["styles"], "eval.content_root": env["coco"], "eval.style_root": env["wikiart"],
            "eval.output": out, "eval.steps": 2, "eval.size": 64, "eval.strength": 0.5, "eval.min_size": 32}
    args = ["evaluate", "configs/eval.yaml", "--model", "tiny"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for kv in extra:
        args += ["--set", kv]
    return args


@pytest.fixture
def count_stylize(monkeypatch):
    """Counts calls into the real customgen.inference.stylize (optionally replacing some outputs)."""
    real, calls = img2img.stylize, []

    def counting(content, styles=None, **kw):
        calls.append((content, styles, kw))
        return real(content, styles, **kw)

    monkeypatch.setattr(img2img, "stylize", counting)
    return calls


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    """One evaluation with the sweep; returns (out, files read back, number of stylize calls)."""
    out = tmp_path_factory.mktemp("eval") / "results"
    real, calls = img2img.stylize, []
    img2img.stylize = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert main(argv(env, out, "eval.sweep=true", "eval.sweep_strengths=[0.5,1.0]",
                         "eval.sweep_scales=[0.5,1.0]")) == 0
    finally:
        img2img.stylize = real
    return out, len(calls)


def test_evaluate_writes_documented_results(first_run, env):
    out, n_calls = first_run
    # points: baseline, DreamBooth, TI at 2 strengths; LoRA at 2 strengths × 2 scales → 10 points × 3 contents
    assert n_calls == 30
    for name in ("metrics.csv", "metrics.json", "per_image.csv", "summary.md", "run.json", "sweep.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("metric_bars", "baseline_comparison", "tradeoff", "samples_Cubism", "samples_Impressionism"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
    m = pd.read_csv(out / "metrics.csv", **EXACT_CSV)
    assert list(m.columns) == COLUMNS
    for col in DOCUMENTED + [f"{c}_std" for c in DOCUMENTED] + ["n_images", "n_flagged", "trainable_params",
                                                                 "artifact_bytes", "train_seconds", "peak_memory_bytes",
                                                                 "method", "style", "model", "strength", "style_scale",
                                                                 "steps", "seed", "smoke"]:
        assert col in m.columns, col
    assert m["smoke"].all()
    assert sorted(zip(m["model"], m["style"])) == [
        (BASELINE, "Cubism"), (BASELINE, "Impressionism"), ("dreambooth_cubism", "Cubism"),
        ("lora_impressionism", "Impressionism"), ("ti_impressionism", "Impressionism")]
    base = m[m["model"] == BASELINE]
    assert (base["style_strength"] == 1.0).all() and (base["trainable_params"] == 0).all()
    lora = m[m["model"] == "lora_impressionism"].iloc[0]
    manifest = json.loads((env["styles"] / "lora_impressionism" / "style.json").read_text())
    assert lora["trainable_params"] == manifest["trainable_params"] == 9984
    assert lora["artifact_bytes"] == manifest["file_bytes"]
    assert (m["n_images"] == 3).all() and (m["n_flagged"] == 0).all()
    assert (m["fid_n"] == 3).all() and (m["fid_n_ref"] == 4).all() and (m["kid_subset_size"] == 3).all()
    # (1 + LPIPS)(1 + FID): 3 roundings; the 3 numbers are read back exactly (repr written, EXACT_CSV read)
    assert np.allclose(m["art_fid"], (1 + m["lpips"]) * (1 + m["fid"]), rtol=gamma(6, torch.float64), atol=0)


def _mean_std_rounding(x: np.ndarray) -> tuple[float, float]:
    """How far two float64 means / sample stds of x (numpy vs pandas, the CSVs read exactly) can differ: a sum of
    n terms errs by γ_{n+2}·Σ|x|, each deviation x_i − mean by γ_{n+3}·2·max|x|, so the std by
    γ_{n+4}·(2·max|x|·√(n/(n−1)) + std); twice, for two implementations (Higham 2002, §3.1 and §4.2)."""
    n, big = len(x), float(np.abs(x).max())
    g = gamma(n + 4, torch.float64)
    return 2 * g * float(np.abs(x).mean()), 2 * g * (2 * big * math.sqrt(n / max(n - 1, 1)) + float(x.std(ddof=1)))


def test_results_are_computed_from_per_image_rows(first_run):
    out, _ = first_run
    m = pd.read_csv(out / "metrics.csv", **EXACT_CSV).set_index(["model", "style"])
    per = pd.read_csv(out / "per_image.csv", **EXACT_CSV)
    assert len(per) == 3 * 5 and per["smoke"].all() and per["flag"].isna().all()
    for (model, style), g in per.groupby(["model", "style"]):
        for col in PER_IMAGE:
            mean_tol, std_tol = _mean_std_rounding(g[col].to_numpy())
            assert m.loc[(model, style), col] == pytest.approx(g[col].mean(), rel=0, abs=mean_tol)
            assert m.loc[(model, style), f"{col}_std"] == pytest.approx(g[col].std(ddof=1), rel=0, abs=std_tol)
    assert all((out / p).is_file() for p in per["output"])  # relative to eval.output
    doc = json.loads((out / "metrics.json").read_text())
    assert len(doc["rows"]) == len(m) and doc["run"]["model"] == "tiny"


def test_run_json_records_command_device_model_networks(first_run):
    out, _ = first_run
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("customgen evaluate configs/eval.yaml --model tiny")
    assert run["model"] == "tiny" and run["config"]["eval"]["steps"] == 2
    assert run["device"]["device"] == "cpu" and "torch" in run["device"]["versions"]
    assert set(run["metric_networks"]) >= {"clip", "inception", "lpips_alex"}
    assert run["smoke"] and all(n["smoke"] for n in run["metric_networks"].values())
    assert run["images"]["generated"] == 30 and run["images"]["reused"] == 0
    summary = (out / "summary.md").read_text()
    assert "smoke: random-weight metric networks" in summary and "customgen evaluate" in summary


def test_sweep_csv_has_points_and_pareto_front(first_run):
    out, _ = first_run
    s = pd.read_csv(out / "sweep.csv")
    lora = s[s["model"] == "lora_impressionism"]
    assert sorted(zip(lora["strength"], lora["style_scale"])) == [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)]
    assert (s[s["method"].isin(["dreambooth_style", "textual_inversion"])]["style_scale"] == 1.0).all()
    assert len(s[s["model"] == BASELINE]) == 4  # 2 strengths × 2 reference styles
    for _, g in s.groupby("style"):
        assert list(g["pareto"]) == list(pareto_front(g[["clip_content", "clip_style"]].to_numpy()))
        assert g["pareto"].any()


def test_second_run_reuses_outputs(first_run, env, count_stylize):
    out, _ = first_run
    images = sorted((out / "images").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}
    old = pd.read_csv(out / "metrics.csv")
    assert main(argv(env, out, "eval.sweep=true", "eval.sweep_strengths=[0.5,1.0]",
                     "eval.sweep_scales=[0.5,1.0]")) == 0
    assert count_stylize == []  # nothing regenerated
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))} == before
    new = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(old, new, check_exact=True)  # same images, same seeded networks → same numbers
    assert json.loads((out / "run.json").read_text())["images"]["reused"] == 30


def test_changed_settings_refuse_to_reuse(first_run, env, capsys):
    out, _ = first_run
    assert main(argv(env, out, "eval.seed=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=0" in err[0] and "--overwrite" in err[0]


def test_black_output_is_flagged_and_left_out(env, tmp_path, monkeypatch):
    real = img2img.stylize
    target = sorted(env["coco"].iterdir())[1]

    def blacken(content, styles=None, *args, **kw):
        img = real(content, styles, *args, **kw)
        if styles and Path(content) == target:
            black = Image.new("RGB", img.size)
            black.info.update(img.info)  # keeps the settings, as a safety-checker replacement would
            return black
        return img

    monkeypatch.setattr(img2img, "stylize", blacken)
    out = tmp_path / "res"
    assert main(argv(env, out, "eval.methods=[lora_style]")) == 0
    per = pd.read_csv(out / "per_image.csv", **EXACT_CSV)
    flagged = per[per["flag"].notna()]
    assert list(flagged["flag"]) == ["black"] and flagged["model"].iloc[0] == "lora_impressionism"
    m = pd.read_csv(out / "metrics.csv", **EXACT_CSV).set_index("model")
    row = m.loc["lora_impressionism"]
    assert row["n_images"] == 3 and row["n_flagged"] == 1 and row["fid_n"] == 2
    kept = per[(per["model"] == "lora_impressionism") & per["flag"].isna()]
    for col in PER_IMAGE:
        assert row[col] == pytest.approx(kept[col].mean(), rel=0, abs=_mean_std_rounding(kept[col].to_numpy())[0])
    assert m.loc[BASELINE, "n_flagged"] == 0 and m.loc[BASELINE, "style"] == "Impressionism"


@pytest.mark.parametrize("points, front", [
    ([[0, 1], [1, 0], [1, 1], [0.5, 0.5]], [True, True, False, True]),
    ([[1, 1], [1, 1]], [True, True]),  # duplicates do not dominate each other
    ([[0, 0], [0, 1], [1, 0]], [True, False, False]),  # equal in one coordinate, worse in the other
    ([[np.nan, 0], [1, 1], [2, 2]], [False, True, False]),  # NaN rows are never on the front
    ([[3, 4]], [True]),
])
def test_pareto_front(points, front):
    assert pareto_front(np.array(points, dtype=float)).tolist() == front


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    p = rng.random((40, 2))
    brute = [not any((q <= x).all() and (q < x).any() for q in p) for x in p]
    assert pareto_front(p).tolist() == brute


class _Manifest:
    def __init__(self, name):
        self.name = name


class _Style:
    def __init__(self, folder, name, source=None):
        self.folder, self.name, self.manifest, self.source = folder, name, _Manifest(name), source


def test_reference_rule(tmp_path):
    available = ["Cubism", "Analytical_Cubism", "Impressionism"]
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.yaml").write_text("data:\n  style: Analytical_Cubism\n")
    assert match_reference(_Style(a, "anything"), available) == "Analytical_Cubism"  # config.yaml wins
    b = tmp_path / "b"
    b.mkdir()
    assert match_reference(_Style(b, "lora_analytical_cubism_r4"), available) == "Analytical_Cubism"  # longest
    assert match_reference(_Style(b, "impressionism"), available) == "Impressionism"
    assert match_reference(_Style(b, "subject_sks_dog"), available) is None
    (a / "config.yaml").write_text("data:\n  style: Baroque\n")
    with pytest.raises(Exception, match="Baroque"):
        match_reference(_Style(a, "x"), available)
    (a / "impressionism_v2.safetensors").write_bytes(b"")  # a file reads no config.yaml beside it; eval.references wins
    assert match_reference(_Style(a, "impressionism_v2", source=a / "impressionism_v2.safetensors"), available) == \
        "Impressionism"
    assert match_reference(_Style(a, "impressionist", source=a / "impressionist.safetensors"), available,
                           "cubism") == "Cubism"


@pytest.mark.parametrize("case, message", [
    ("missing_styles", "eval.styles folder"),
    ("empty_contents", "no image files"),
    ("no_references", "eval.style_root"),
    ("style_not_in_references", "not among the style references"),
    ("bad_method", "eval.methods"),
])
def test_bad_config_is_one_line_exit_2(env, tmp_path, capsys, case, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    only_cubism = tmp_path / "wikiart"
    (only_cubism / "Cubism").mkdir(parents=True)
    for p in (env["wikiart"] / "Cubism").iterdir():
        (only_cubism / "Cubism" / p.name).write_bytes(p.read_bytes())
    (only_cubism / "Other").mkdir()
    (only_cubism / "Other" / "x.jpg").write_bytes((env["wikiart"] / "Cubism" / p.name).read_bytes())
    extra = {"missing_styles": [f"eval.styles={tmp_path / 'nope'}"],
             "empty_contents": [f"eval.content_root={empty}"],
             "no_references": ["eval.style_root="],
             "style_not_in_references": [f"eval.style_root={only_cubism}"],
             "bad_method": ["eval.methods=[lora_anime_kohya]"]}[case]
    assert main(argv(env, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out" / "images").exists()  # nothing generated


def test_files_from_elsewhere_score_beside_a_trained_style(env, tmp_path):
    """A styles folder holding a trained artifact and two loose files: the LoCon file is scored against the
    reference style eval.references names; the embedding without references gets content metrics only and
    summary.md says so; every row names its weights file and that file's sha256."""
    from tests import community_files as cf
    from customgen.models import load_components

    styles = tmp_path / "styles"
    shutil.copytree(env["styles"] / "lora_impressionism", styles / "lora_impressionism")
    tiny = load_components("tiny", device="cpu")
    locon = cf.write(styles / "paper_cut.safetensors", cf.kohya_state(tiny, "locon", seed=3, alpha=1.0, std=0.05))
    emb = cf.write_embedding(styles / "ink.pt", cf.embedding(32, 2, seed=2), "a1111-pt")
    out = tmp_path / "results"
    args = argv(env, out, "eval.references={paper_cut: Cubism}")
    args[args.index(f"eval.styles={env['styles']}")] = f"eval.styles={styles}"
    assert main(args) == 0
    metrics = pd.read_csv(out / "metrics.csv", **EXACT_CSV).set_index("model")
    files = {"paper_cut": locon, "ink": emb,
             "lora_impressionism": styles / "lora_impressionism" / "pytorch_lora_weights.safetensors"}
    for model, path in files.items():
        assert metrics.loc[model, "source"] == str(path.resolve() if model != "lora_impressionism" else path)
        assert metrics.loc[model, "sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metrics.loc["paper_cut", "style"] == "Cubism" and np.isfinite(metrics.loc["paper_cut", "clip_style"])
    assert metrics.loc["paper_cut", "method"] == "file" and metrics.loc["ink", "n_references"] == 0
    assert np.isnan(metrics.loc["ink", "clip_style"]) and np.isfinite(metrics.loc["ink", "clip_content"])
    assert "No reference images for ink: content metrics only" in (out / "summary.md").read_text()
