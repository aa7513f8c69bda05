"""`customgen bench` on `tiny` (CPU): the JSON and markdown it writes, pixel equality where outputs must be equal,
FLOPs that see what fusing removes, the peer training step, and the timing helpers."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from customgen.bench import fixtures
from customgen.bench.timing import Side, alternate, count_flops, device_peak, flop_bounds
from customgen.bench.train import PeerStep, bench_config
from customgen.cli import main
from customgen.kinds import KINDS
from customgen.train.build import build_run
from tests.tolerance import gamma


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", "tiny", "--size", "64", "--steps", "4", "--train-resolution", "64", "--repeats", "2",
            "--overhead-images", "2", "--recipes", "lora_style,dreambooth_lora_subject", "--out", str(out),
            "--name", "tiny"]
    assert main(argv) == 0
    return json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text()


def test_report_names_command_device_versions_and_every_job(report):
    rep, md = report
    assert rep["command"].startswith("customgen bench --model tiny") and rep["model"] == "tiny"
    assert rep["device"]["device"] == "cpu" and rep["device"]["peak_tflops"] is None
    assert {"torch", "diffusers", "transformers", "peft", "customgen"} <= set(rep["versions"])
    for title in ("## Stylize", "## Per-image overhead", "## Training steps", "## Perceptual step", rep["command"]):
        assert title in md


def test_stylize_pairs_cover_every_kind_and_equal_where_they_must(report):
    rows = {r["pair"]: r for r in report[0]["stylize"]}
    expected = {"no style vs StableDiffusionImg2ImgPipeline"} | {
        f"{k.name} vs {v}" for k in KINDS.values() for v in k.stock_variants()}
    assert set(rows) == expected
    for r in rows.values():
        # ratios are stored rounded to 4 decimals (each ≤ 0.5e-4 off), the median comes from the unrounded ones
        rounding = 0.5e-4 + gamma(4, torch.float64) * max(r["ratios"])
        assert len(r["ratios"]) == 2
        assert r["median_ratio"] == pytest.approx(statistics.median(r["ratios"]), abs=rounding)
        assert not r["must_equal"] or r["equal"], r["pair"]  # no style, fused LoRA, TI, DreamBooth: pixel-equal
        assert r["ours"]["peak_bytes"] > 0 and r["ours"]["flops"] > 0
    # The stock unfused pipeline runs the LoRA branch's extra matmuls every step; customgen fuses the LoRA and
    # reuses the encoded prompt, so it also skips the text encoder the stock pipelines run on every call.
    fused, unfused = rows["lora vs load_lora_weights + fuse_lora"], rows["lora vs load_lora_weights"]
    assert fused["ours"]["flops"] < fused["stock"]["flops"] < unfused["stock"]["flops"]
    assert rows["no style vs StableDiffusionImg2ImgPipeline"]["ours"]["flops"] == fused["ours"]["flops"]


def test_overhead_breakdown_adds_up(report):
    over = report[0]["overhead"]
    assert [r["styles"] for r in over["customgen"]][0] == [] and len(over["customgen"]) == 1 + len(fixtures.style_recipes())
    for r in over["customgen"]:
        assert r["model_ms"] > 0 and r["unet_ms"] > 0 and r["vae_decoder_ms"] > 0
        # medians of 2 rows: (Σ total − Σ model)/2 vs Σ(total − model)/2, ≤ 2 float64 roundings a side
        rounding = gamma(4, torch.float64) * (r["total_ms"] + r["model_ms"])
        assert r["overhead_ms"] == pytest.approx(r["total_ms"] - r["model_ms"], abs=rounding)
    assert over["stock"]["overhead_ms"] > 0


def test_training_and_perceptual_rows(report):
    rep = report[0]
    assert [r["recipe"] for r in rep["training"]] == ["lora_style", "dreambooth_lora_subject"]
    assert [r["prior"] for r in rep["training"]] == [False, True]
    assert all(r["median_ratio"] > 0 and r["stock"]["flops"] > 0 for r in rep["training"])
    p = rep["perceptual"][0]
    assert p["ours"]["flops"] > p["stock"]["flops"]  # the decoder and VGG/LPIPS passes on top of the L2 step
    assert {"decoder forward", "decoder backward", "VGG forward + Gram", "LPIPS forward"} <= set(p["pieces"]["ms"])


def test_peer_step_encodes_every_step_and_trains_only_the_recipe_parameters(tmp_path):
    data = fixtures.write_data(tmp_path / "data", size=64)
    cfg = bench_config("textual_inversion", "tiny", data, resolution=64)
    with fixtures.quiet():
        run = build_run(cfg, tmp_path / "run")
    peer = PeerStep(run)
    calls = {"vae": 0, "te": 0}
    hooks = [peer.comps.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae", calls["vae"] + 1)),
             peer.comps.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("te", calls["te"] + 1))]
    emb = peer.comps.text_encoder.get_input_embeddings().weight  # its name differs between transformers 5.x releases
    before = emb.detach().clone()
    unet = {n: p.detach().clone() for n, p in peer.comps.unet.named_parameters()}
    for _ in range(2):
        assert torch.isfinite(torch.tensor(peer.step()))
    for h in hooks:
        h.remove()
    assert calls == {"vae": 2, "te": 2}  # the example scripts' way: no cached latents or embeddings
    changed = (emb != before).any(1).nonzero().flatten().tolist()
    assert changed == peer.method.token_ids  # only the new token's row learns
    assert all(torch.equal(p, unet[n]) for n, p in peer.comps.unet.named_parameters())


@pytest.mark.parametrize("name,label,tflops", [
    ("Tesla T4", "T4", 65.0), ("NVIDIA A100-SXM4-40GB", "A100", 312.0), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0), ("NVIDIA L4", "L4", 121.0), ("Tesla P100-PCIE-16GB", "P100", 18.7)])
def test_device_peaks_from_datasheets(name, label, tflops):
    assert device_peak(name) == (label, tflops)


def test_unknown_devices_and_bounds():
    assert device_peak("NVIDIA L40S") is None and device_peak("cpu") is None
    assert flop_bounds(65e12)["T4"] == 1.0 and flop_bounds(None)["A100"] is None  # 6.5e13/6.5e13, exact integers


def test_flop_count_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_alternate_runs_a_b_b_a_and_takes_the_median_ratio():
    order = []
    a = Side("a", lambda: order.append("a"))
    b = Side("b", lambda: order.append("b"))
    result = alternate(a, b, repeats=3, warmup=1, flops=False)
    assert "".join(order) == "ab" + "ab" + "ba" + "ab"  # warm-up, then neither side always first
    assert result["ratios"] == [round(x / y, 4) for x, y in zip(a.seconds, b.seconds)]
    assert result["median_ratio"] == statistics.median(x / y for x, y in zip(a.seconds, b.seconds))


def test_memory_job_records_predicted_and_measured_on_the_cpu_counter(tmp_path):
    """Without CUDA the job measures with the same byte counter on a real CPU run of the step (CUDA fields None) and
    writes both with their ratio; the markdown says what measured them."""
    argv = ["bench", "--model", "tiny", "--jobs", "memory", "--size", "64", "--recipes", "textual_inversion",
            "--out", str(tmp_path), "--name", "mem"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "mem.json").read_text())
    (row,) = rep["memory"]
    assert row["recipe"] == "textual_inversion" and row["status"] == "ok" and row["resolution"] == 64
    assert row["measured"]["cuda_max_allocated"] is None and row["measured"]["cuda_max_reserved"] is None
    assert row["measured"]["cpu_counter"] > 0 and row["measured_by"].startswith("cpu counter")
    assert row["ratio_allocated"] == pytest.approx(row["measured"]["cpu_counter"] / row["predicted"]["tensor_peak"])
    assert abs(row["ratio_allocated"] - 1) < 0.05
    md = (tmp_path / "mem.md").read_text()
    assert "## Peak memory: predicted vs measured (64 px)" in md and "cpu counter" in md


def test_fewstep_job_times_a_4_step_lcm_lora_against_25_step_stock(report):
    """The fewstep job: customgen with an LCM-named LoRA file, its scheduler and 4 steps, against the stock pipeline
    at the bench's steps; the 4-step side does fewer FLOPs (fewer UNet calls, no classifier-free guidance)."""
    rep, md = report
    (row,) = rep["fewstep"]
    assert row["status"] == "ok" and row["scheduler"] == "lcm" and row["steps"] == 4 and row["stock_steps"] == 4
    assert row["file"].endswith("lcm-lora-random.safetensors") and "## Few-step LoRA" in md
    assert row["ours"]["flops"] < row["stock"]["flops"] and row["median_ratio"] > 0
