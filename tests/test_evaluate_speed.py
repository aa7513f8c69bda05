"""The batched metric phase equals the per-image path, features are computed once per image, and an evaluation
spread over two processes (`accelerate launch --cpu --num_processes 2`) writes the same numbers as one process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from customgen import metrics as M
from customgen.cli import main
from customgen.config import load_config
from customgen.evaluate import grid_points, resolve_inputs
from customgen.evaluate.generate import generate
from customgen.evaluate.score import aggregate, image_rows
from tests.eval_fixtures import shared_eval_env
from tests.launch import launch_two_processes
from tests.tolerance import gamma, longest_reduction, ssim_rounding

TIMING = ["seconds_per_image", "seconds_per_image_std", "infer_peak_memory_bytes"]  # differ between runs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return shared_eval_env(tmp_path_factory)


def sets(env, out: Path) -> list[str]:
    values = {"eval.styles": env["styles"], "eval.content_root": env["coco"], "eval.style_root": env["wikiart"],
              "eval.output": out, "eval.steps": 2, "eval.size": 64, "eval.strength": 0.5, "eval.min_size": 32,
              "eval.smoke": "true"}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def scored(env, tmp_path_factory):
    """One evaluation's outputs, scored by the batched metric phase: (cfg, inputs, outputs, nets, rows)."""
    cfg = load_config(None, ["model.ref=tiny", *sets(env, tmp_path_factory.mktemp("eval") / "out")])
    inputs = resolve_inputs(cfg)
    outputs = generate(grid_points(inputs.styles, cfg.eval), inputs, cfg, Path(cfg.eval.output), progress=False)
    nets = M.MetricNetworks(smoke=True)
    return cfg, inputs, outputs, nets, image_rows(outputs, inputs, nets, lpips_net="alex", progress=False)


def old_ssim(output, reference) -> float:
    """The previous implementation: torchmetrics' 2-D float64 Gaussian convolution, border cropped."""
    a, b = M.to_array(output), M.to_array(reference)
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None] for x in (a, b))
    _, ssim_map = structural_similarity_index_measure(ta, tb, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                      data_range=1.0, return_full_image=True)
    return float(ssim_map[..., 5:-5, 5:-5].mean())


def test_batched_rows_equal_the_per_image_path(scored):
    cfg, inputs, outputs, nets, rows = scored
    fresh = M.MetricNetworks(smoke=True)  # same seeded networks, its own empty cache
    refs = {s: [M.load_image(p) for p in paths] for s, paths in inputs.references.items()}
    lpips_tol = gamma(longest_reduction(fresh.lpips("alex").model), torch.float32)
    clip_tol = gamma(longest_reduction(fresh.clip.model), torch.float32)
    for row in rows:
        out, content, res = M.load_image(row["output"]), M.load_image(row["content"]), row["_results"]
        lp = M.lpips(out, content, net=fresh.lpips("alex")).value
        clip = M.clip_content(out, content, embedder=fresh.clip, cache=fresh.feature_cache).value
        # fp32 networks in batches round differently from one image at a time: allowed γ_n of the network's longest
        # inner product (one layer's worst case, Higham 2002 §3.1; measured differences are ~1e-3 of it); relative
        # for LPIPS, absolute for 1 − cos (cos ≈ 1)
        assert res["lpips"].value == pytest.approx(lp, rel=lpips_tol, abs=0)
        assert res["clip_content"].value == pytest.approx(clip, rel=0, abs=clip_tol)
        if row["style"]:
            style = M.clip_style(out, refs[row["style"]], embedder=fresh.clip, cache=fresh.feature_cache).value
            assert res["clip_style"].value == pytest.approx(style, rel=0, abs=clip_tol)
        # SSIM is float64: the separable window differs from the old 2-D convolution only by rounding
        assert res["ssim"].value == pytest.approx(old_ssim(out, content), abs=ssim_rounding(M.to_array(out),
                                                                                            M.to_array(content)))
        assert res["ssim"].value == M.ssim(out, content).value  # and batching does not change it at all


def test_set_metrics_equal_the_image_level_functions(scored):
    cfg, inputs, outputs, nets, rows = scored
    table = aggregate(rows, inputs, nets, cfg).set_index(["model", "style"])
    fresh = M.MetricNetworks(smoke=True)
    for (model, style), g in table.groupby(level=[0, 1]):
        outs = [M.load_image(r["output"]) for r in rows if (r["model"], r["style"]) == (model, style)]
        refs = [M.load_image(p) for p in inputs.references[style]]
        kw = dict(extractor=fresh.inception, cache=fresh.feature_cache)
        assert g["fid"].iloc[0] == M.fid_images(outs, refs, **kw).value  # the same batches: identical
        assert g["kid"].iloc[0] == M.kid_images(outs, refs, subset_size=cfg.eval.kid_subset, seed=cfg.eval.seed,
                                                **kw).value


def test_each_image_is_encoded_once(scored):
    cfg, inputs, outputs, _, _ = scored
    nets = M.MetricNetworks(smoke=True)
    seen = []
    nets.clip.model.visual.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    rows = image_rows(outputs, inputs, nets, lpips_net="alex", progress=False)
    n_refs = sum(len(p) for p in inputs.references.values())
    assert sum(seen) == len(outputs) + len(inputs.contents) + n_refs  # outputs, contents, references: once each
    image_rows(outputs, inputs, nets, lpips_net="alex", progress=False)  # the cache answers everything now
    assert sum(seen) == len(outputs) + len(inputs.contents) + n_refs and len(rows) >= len(outputs)


def test_two_processes_write_the_numbers_of_one(env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["evaluate", "configs/eval.yaml", "--model", "tiny"]
    assert main(argv + [a for kv in sets(env, one) for a in ("--set", kv)]) == 0
    r = launch_two_processes(argv + [a for kv in sets(env, two) for a in ("--set", kv)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("result rows in") == 1  # only the main process reports
    a, b = (pd.read_csv(d / "metrics.csv").drop(columns=TIMING) for d in (one, two))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pa, pb = (pd.read_csv(d / "per_image.csv").drop(columns=["seconds", "peak_memory_bytes"]) for d in (one, two))
    pd.testing.assert_frame_equal(pa, pb, check_exact=True)
    assert not (two / ".ranks").exists()
    assert sorted(p.relative_to(two) for p in (two / "images").rglob("*.png")) == sorted(
        p.relative_to(one) for p in (one / "images").rglob("*.png"))
