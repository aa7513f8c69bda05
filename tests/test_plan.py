"""Fit before you run, on `tiny` (CPU): the fake-CUDA prediction of a training step against the same byte counter
in a real CPU run of that step, what checkpointing and prior preservation do to the peak, memory auto's ladder and
refusal (before any weight loads), the out-of-memory line, `customgen plan`, and inference's batch / VAE choice."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from customgen.budget import FIXED, GIB, Gpu, fixed_costs, total_bytes
from customgen.cli import main
from customgen.config import config_hash, load_config
from customgen.errors import UserError
from customgen.memory import DeviceInfo, MemoryPlan
from customgen.peak import BLOCK, LiveBytes, blocks, fake_cuda
from customgen.train.estimate import estimate_training
from customgen.train.fit import fit, fit_memory, ladder
from tests.image_fixtures import make_wikiart_tree

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("lora_style", "dreambooth_style", "textual_inversion", "dreambooth_lora_subject", "lora_anime_kohya")
TINY = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "train.batch_size=2",
        "loss.perceptual_max_timestep=1000", "loss.gram=0", "loss.lpips_net=alex"]  # perceptual terms on every sample: the same step on both sides


def tiny_cfg(recipe: str, *extra: str):
    return load_config(ROOT / "configs" / f"{recipe}.yaml", TINY + list(extra))


_ESTIMATES: dict = {}


def trainables(cfg) -> list[torch.nn.Parameter]:
    """The parameters `cfg`'s method trains on tiny, set up as a run does (seeded)."""
    from customgen.kinds import make_method
    from customgen.models import load_components

    torch.manual_seed(cfg.train.seed)
    comps = load_components("tiny", device="cpu", dtype=torch.float32)
    return [p for g in make_method(cfg).setup(comps) for p in g["params"]]


def cached_estimate(cfg, plan):
    """estimate_training, memoised per (config, plan settings): the ladder tests ask for the same estimates again."""
    key = (config_hash(cfg), replace(plan, how="", predicted_bytes=None))
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate_training(cfg, plan)
    return _ESTIMATES[key]


# --- the counter itself ---------------------------------------------------------------------------------------------
def test_live_bytes_counts_each_storage_once_in_blocks_and_frees_it():
    with LiveBytes("cpu") as live:
        a = torch.zeros(1000)  # 4000 B -> 4096 B in 512-byte blocks
        view = a[10:]  # same storage: not counted again
        assert live.live == blocks(4000) == 4096
        b = torch.ones(10)
        assert live.live == 4096 + 512
        del a, view
        assert live.live == 512 and live.peak == 4096 + 512
    del b


def test_fake_cuda_runs_backward_and_checkpointing_without_a_gpu():
    with fake_cuda(), LiveBytes("cuda") as live:
        lin = torch.nn.Linear(64, 64).to("cuda", torch.float16)
        x = torch.randn(8, 64, device="cuda", dtype=torch.float16, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.float16):
            y = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False)
        y.float().sum().backward()
        assert x.grad.shape == x.shape and x.grad.device.type == "cuda"
        assert lin.weight.grad is not None and live.peak > 0


def test_fake_tensors_known_to_hold_zeros_read_as_zeros_and_nothing_else_does():
    """Values on fake CUDA: a weight zeroed on the CPU (small: real, large: fake) stays known-zero through moves and
    casts, so `any()` reads False as on a GPU; a write forgets it; zeroing part of a storage does not make it zero;
    any other read keeps its worst case (True, 1)."""
    with fake_cuda():
        small, big = torch.nn.Linear(4, 300), torch.nn.Linear(512, 512)  # 1,200 and 262,144 weights
        for layer in (small, big):
            torch.nn.init.zeros_(layer.weight)
            layer.to("cuda", torch.float16)
        assert not small.weight.float().any() and not big.weight.any() and big.bias.any()
        assert big.weight.flatten()[::2].abs().any().item() is False
        big.weight.data.add_(1.0)
        assert big.weight.any()
        ones = torch.ones(1000, 300, device="cuda")
        ones[0].zero_()
        zeros = torch.zeros(1000, 300, device="cuda")
        zeros[0].zero_()
        assert ones.any() and not zeros.any() and zeros.sum().item() == 1.0


def test_fake_cuda_frees_a_graph_that_never_runs_backward():
    """A graph built with grad and dropped without backward (peft's DoRA init computes its weight norms so) frees its
    saved tensors on fake CUDA as on a real device: a saved output must not keep its own node alive."""
    with fake_cuda(), LiveBytes("cuda") as live:
        w = torch.randn(256, 256, device="cuda", requires_grad=True)
        base = live.live
        norm = (w * 2).norm(dim=1)  # the norm's node saves its output
        del norm
        assert live.live == base


# --- prediction against a real run ----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_fake_cuda_prediction_matches_a_real_cpu_run_of_the_same_step(recipe):
    """The same step (fp32, text encoder and VAE kept on the device, perceptual terms on every sample) counted on
    fake CUDA tensors and on real CPU tensors: peaks within 5%; gradients are the trainables' bytes; AdamW's state
    is two fp32 tensors per trainable and the fused kernel's step counter (a 512-byte block each). The assembly is compared where no loss network is built: on a CPU those are
    built on the device itself (torchvision's whole AlexNet/VGG before LPIPS keeps the features), on a GPU before
    they move there."""
    cfg = tiny_cfg(recipe)
    plan = MemoryPlan("no", False, "adamw", offload=False)
    fake = estimate_training(cfg, plan)
    torch.manual_seed(0)
    real = estimate_training(cfg, plan, fake=False)
    parts = ["step_peak", "validation_peak", "setup_peak"] + ([] if cfg.loss.lpips or cfg.loss.gram else ["assembly_peak"])
    for part in parts:
        assert getattr(fake, part) == pytest.approx(getattr(real, part), rel=0.05), part
    assert fake.gradients == real.gradients > 0
    assert fake.optimizer_state == 2 * fake.gradients + BLOCK * len(trainables(cfg)) == real.optimizer_state
    assert fake.device == "cuda" and real.device == "cpu"


ADAPTER_SETTINGS = {"dora": ["lora.dora=true"], "locon+dora": ["lora.type=locon", "lora.dora=true"],
                    "loha": ["lora.type=loha"], "lokr": ["lora.type=lokr", "lora.conv_rank=2"]}


@pytest.mark.parametrize("name", list(ADAPTER_SETTINGS))
def test_fake_cuda_prediction_matches_a_real_cpu_run_for_every_adapter_type(name):
    """The subject recipe (UNet and text encoder adapted, no loss network) with DoRA (its magnitudes and per-step
    weight norms), LoCon+DoRA on the convolutions, LoHa (its full-size ΔW per layer in forward and backward) and LoKr:
    fake and real peaks within 5%, the same gradients."""
    cfg = tiny_cfg("dreambooth_lora_subject", *ADAPTER_SETTINGS[name])
    plan = MemoryPlan("no", False, "adamw", offload=False)
    fake = estimate_training(cfg, plan)
    torch.manual_seed(0)
    real = estimate_training(cfg, plan, fake=False)
    for part in ("step_peak", "validation_peak", "setup_peak", "assembly_peak"):
        assert getattr(fake, part) == pytest.approx(getattr(real, part), rel=0.05), part
    assert fake.gradients == real.gradients != cached_estimate(tiny_cfg("dreambooth_lora_subject"), plan).gradients


def test_memory_auto_ladders_over_an_adapter_type_and_keeps_it():
    """A LoHa subject on a card that needs checkpointing: auto takes that rung and leaves the adapter settings."""
    cfg = tiny_cfg("dreambooth_lora_subject", "lora.type=loha", "lora.conv_rank=2", "data.resolution=128")
    without = total_bytes(cached_estimate(cfg, AS_SET).peak)
    chosen = fit(cfg, card(without - 1), estimate=cached_estimate)
    assert chosen.fits and [t["rung"] for t in chosen.tried] == ["as set", "gradient checkpointing"]
    assert chosen.plan.apply(cfg).lora == cfg.lora


SUBJECT_128 = ("dreambooth_lora_subject", "data.resolution=128")
AS_SET = MemoryPlan("fp16", False, "adamw", offload=False, batch_size=2, grad_accum=1)  # memory auto's first rung


def test_checkpointing_lowers_the_activation_peak():
    cfg = tiny_cfg(*SUBJECT_128)
    off, on = cached_estimate(cfg, AS_SET), cached_estimate(cfg, replace(AS_SET, gradient_checkpointing=True))
    assert on.activations < off.activations
    assert (on.weights, on.gradients, on.optimizer_state) == (off.weights, off.gradients, off.optimizer_state)


def test_prior_preservation_raises_the_step_peak():
    plan = MemoryPlan("fp16", False, "adamw")
    with_prior = cached_estimate(tiny_cfg("dreambooth_style"), plan)
    without = cached_estimate(tiny_cfg("dreambooth_style", "prompt.prior=false"), plan)
    assert with_prior.step_peak > without.step_peak and with_prior.settings["prior"]


def test_per_step_latents_keep_the_vae_on_the_gpu():
    """Without the latent cache the VAE encodes every batch on the GPU, so offloading cannot move it."""
    plan = MemoryPlan("fp16", False, "adamw")
    cached = cached_estimate(tiny_cfg("dreambooth_style", "prompt.prior=false"), plan)
    per_step = cached_estimate(tiny_cfg("dreambooth_style", "prompt.prior=false", "train.cache_latents=false"), plan)
    assert per_step.weights > cached.weights and not per_step.settings["cache_latents"]


def test_eight_bit_adam_holds_its_state_size():
    """bitsandbytes' layout: 2 bytes per element + fp32 absmax per 256-block for tensors of >= 4096 elements, fp32
    states below; AdamW: 8 bytes per element."""
    cfg = tiny_cfg("dreambooth_style", "prompt.prior=false")
    eight = cached_estimate(cfg, MemoryPlan("fp16", False, "adamw8bit"))
    full = cached_estimate(cfg, MemoryPlan("fp16", False, "adamw"))  # shared with the tests above
    params = trainables(cfg)
    expected = 2 * blocks(256 * 4)  # the two 256-entry fp32 quantile maps
    for p in params:
        n = p.numel()
        expected += 2 * blocks(4 * n) if n < 4096 else 2 * blocks(n) + 2 * blocks(4 * -(-n // 256))
    assert eight.optimizer_state == expected < full.optimizer_state


def unet_trainables() -> list[torch.nn.Parameter]:
    """The whole tiny UNet as full DreamBooth trains it (fp32)."""
    from customgen.models import load_components

    return [p.requires_grad_(True) for p in load_components("tiny", device="cpu", dtype=torch.float32).unet.parameters()]


@pytest.mark.parametrize("implementation,extra", [({"foreach": True}, "copy"), ({"fused": True}, "none"),
                                                  ({"foreach": False}, "one parameter")])
def test_adamw_step_allocates_one_copy_with_foreach_nothing_fused(implementation, extra):
    """Live bytes during AdamW's step (state already made) on fake CUDA, the whole tiny UNet: torch's default CUDA
    implementation (foreach) holds _foreach_sqrt of every second moment, one fp32 copy of the trainables in 512-byte
    blocks; the fused kernel updates in place; the for-loop one holds a few tensors of one parameter at a time."""
    params = unet_trainables()
    copy = sum(blocks(4 * p.numel()) for p in params)
    with fake_cuda(), LiveBytes("cuda") as live:
        fake = [torch.nn.Parameter(torch.zeros(p.shape, device="cuda")) for p in params]
        optimizer = torch.optim.AdamW(fake, lr=1e-4, **implementation)
        for p in fake:
            p.grad = torch.zeros_like(p)
        optimizer.step()  # makes the state
        before = live.reset_peak()
        optimizer.step()
        added = live.peak - before
    biggest = max(blocks(4 * p.numel()) for p in params)
    if extra == "copy":
        assert added == copy
    elif extra == "none":
        assert added == 0
    else:
        assert 0 < added <= 3 * biggest < copy


FULL_UNET = ("dreambooth_style", "dreambooth.scope=full", "prompt.prior=false", "train.batch_size=1",
             "train.max_grad_norm=0")  # no clipping: its per-tensor norms would blur the optimizer's own bytes


def test_the_plan_drops_foreach_adamws_copy_of_the_trainables(monkeypatch):
    """Full DreamBooth of the tiny UNet, fp16, checkpointing: the run's AdamW (fused on CUDA) against torch's default
    foreach one. The foreach step peaks in the optimizer, one fp32 copy of the trainables (= the gradients' bytes)
    above weights + gradients + state; fused keeps its step counters on the GPU (one 512-byte block per tensor) and
    its step peak is the backward's (`activations` above the same three), so the peak drops by the copy, less those
    counters, less the backward's excess over what stays alive through the optimizer step (≥ 0)."""
    import customgen.train.estimate as estimate

    cfg, plan = tiny_cfg(*FULL_UNET), MemoryPlan("fp16", True, "adamw", offload=False)
    fused = estimate_training(cfg, plan)
    monkeypatch.setattr(estimate, "counted_optimizer",
                        lambda groups, plan, *, weight_decay: torch.optim.AdamW(groups, weight_decay=weight_decay,
                                                                               foreach=True))
    foreach = estimate_training(cfg, plan)
    copy, counters = fused.gradients, BLOCK * len(unet_trainables())
    assert copy == sum(blocks(4 * p.numel()) for p in unet_trainables()) == foreach.gradients
    assert fused.optimizer_state - foreach.optimizer_state == counters
    assert foreach.activations >= copy  # the foreach step's peak holds the copy
    drop = foreach.step_peak - fused.step_peak
    assert copy - counters - fused.activations <= drop <= copy - counters
    assert drop > 0.9 * copy


def test_prodigy_state_is_predicted_as_prodigyopt_allocates_it():
    """Prodigy (prodigyopt) keeps exp_avg, exp_avg_sq, s and p0 per parameter, p0 a 0-d tensor for a parameter that
    is all zeros at its first step (LoRA's B): the fake-CUDA count equals a real CPU count and the formula."""
    for recipe in ("lora_style", "dreambooth_style"):
        cfg = tiny_cfg(recipe, "train.optimizer=prodigy", "train.lr=1.0", "loss.lpips=0")
        plan = MemoryPlan("no", False, "prodigy", offload=False)
        fake = estimate_training(cfg, plan)
        params = trainables(cfg)
        zeros = sum(not p.any() for p in params)
        expected = sum(3 * blocks(4 * p.numel()) + (blocks(4 * p.numel()) if p.any() else BLOCK) for p in params)
        assert fake.optimizer_state == expected
        assert (zeros > 0) == (recipe == "lora_style")  # LoRA's B starts at zero; DreamBooth's weights do not
        torch.manual_seed(0)
        assert estimate_training(cfg, plan, fake=False).optimizer_state == expected


def test_memory_auto_keeps_an_optimizer_that_was_asked_for():
    """train.optimizer=prodigy (or adamw) is the user's: the 8-bit rung is skipped with a note, every rung keeps it;
    only `auto` may turn to 8-bit Adam."""
    gpu = Gpu("test card", 2**30, False, "test", bnb=True)
    for asked in ("prodigy", "adamw"):
        rungs = list(ladder(tiny_cfg("lora_style", f"train.optimizer={asked}"), "fp16", gpu))
        assert f"skip:train.optimizer={asked}" in [r for r, _ in rungs] and "8-bit Adam" not in [r for r, _ in rungs]
        assert {plan.optimizer for _, plan in rungs} == {asked}
    rungs = dict(ladder(tiny_cfg("lora_style", "train.optimizer=auto"), "fp16", gpu))
    assert rungs["as set"].optimizer == "adamw" and rungs["8-bit Adam"].optimizer == "adamw8bit"


# --- memory auto -------------------------------------------------------------------------------------------------------
def card(nbytes: int) -> Gpu:
    return Gpu("test card", int(nbytes), False, "test", bnb=False)


def test_auto_turns_checkpointing_on_exactly_when_the_estimate_without_it_exceeds_the_cap():
    cfg = tiny_cfg(*SUBJECT_128)
    without = total_bytes(cached_estimate(cfg, AS_SET).peak)
    assert not fit(cfg, card(without), estimate=cached_estimate).plan.gradient_checkpointing
    chosen = fit(cfg, card(without - 1), estimate=cached_estimate)
    assert chosen.fits and chosen.plan.gradient_checkpointing and chosen.plan.predicted_bytes <= without - 1
    assert [t["rung"] for t in chosen.tried] == ["as set", "gradient checkpointing"]


def test_auto_splits_the_batch_keeping_the_images_per_step_and_leaves_set_keys_alone():
    cfg = tiny_cfg("lora_anime_kohya", "train.gradient_checkpointing=false", "validation.num_images=1")
    split = replace(AS_SET, offload=True, batch_size=1, grad_accum=2)
    need = total_bytes(cached_estimate(cfg, split).peak)
    chosen = fit(cfg, card(need), estimate=cached_estimate)
    assert [t["rung"] for t in chosen.tried] == ["as set", "text encoder/VAE off the GPU", "batch 1 x 2"]
    assert (chosen.plan.batch_size, chosen.plan.grad_accum, chosen.plan.gradient_checkpointing) == (1, 2, False)
    assert chosen.notes == ["train.gradient_checkpointing=false is set: memory auto leaves it (it would lower the peak)"]
    applied = chosen.plan.apply(cfg)
    assert (applied.train.batch_size, applied.train.grad_accum) == (1, 2)
    assert all(t["total_bytes"] > need for t in chosen.tried[:2])


def test_auto_on_cpu_changes_nothing_and_says_so():
    cfg = tiny_cfg("lora_style")
    plan = fit_memory(cfg, DeviceInfo("cpu", "cpu", 0, None, torch.float32, False))
    assert "no GPU" in plan.how and plan.predicted_bytes is None
    assert (plan.gradient_checkpointing, plan.optimizer, plan.batch_size) == (False, "adamw", None)


def test_nothing_fits_is_refused_in_one_line_before_any_weight_loads(tmp_path, monkeypatch, capsys):
    """`customgen train` with memory auto on a 0.3 GiB GPU: exit 2, one line with the smallest predicted peak and
    what to change; no weights loaded, no output folder made."""
    import customgen.train.build as build
    import customgen.train.run as run

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the memory plan")

    monkeypatch.setattr(build, "load_components", no_load)
    monkeypatch.setattr(run, "probe", lambda **k: DeviceInfo("cuda:0", "Tiny GPU", int(0.3 * GIB), (7, 5),
                                                             torch.float16, False))
    wikiart = make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 2}, size=(72, 72))
    out = tmp_path / "out"
    code = main(["train", str(ROOT / "configs" / "dreambooth_style.yaml"), "--model", "tiny", "--output", str(out),
                 "--set", f"data.root={wikiart}", "--set", "data.style=Cubism", "--set", "data.resolution=64",
                 "--set", "data.min_bucket=64", "--set", "train.gradient_checkpointing=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: nothing fits Tiny GPU (0.30 GiB): the smallest predicted peak is ")
    assert "dreambooth.scope=cross_attention" in err[0] and "prompt.prior=false" in err[0]
    assert not out.exists()


def test_cuda_out_of_memory_becomes_one_line_naming_step_and_peaks(tmp_path, monkeypatch, capsys):
    import customgen.train.loop as loop
    import customgen.train.run as run
    from customgen.memory import plan_memory

    calls = []

    def step(run_, step_):
        calls.append(step_)
        if step_ == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(many lines)")
        return real_step(run_, step_)

    real_step = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", step)
    monkeypatch.setattr(run, "fit_memory", lambda cfg, info: MemoryPlan(
        **{**vars(plan_memory(cfg.train, info)), "predicted_bytes": 3 * 2**29}))
    wikiart = make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 2}, size=(72, 72))
    code = main(["train", str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", "--output",
                 str(tmp_path / "out"), "--set", f"data.root={wikiart}", "--set", "data.style=Cubism",
                 "--set", "data.resolution=64", "--set", "data.min_bucket=64", "--set", "loss.lpips=0", "--set",
                 "loss.gram=0", "--max-steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and calls == [0, 1]
    assert err[-1].startswith("error: CUDA out of memory at step 1 (training step): predicted peak 1.50 GiB, real peak ")
    assert sum(line.startswith("error:") for line in err) == 1


# --- customgen plan --------------------------------------------------------------------------------------------------------
def test_plan_prints_the_table_and_json_whose_parts_add_up(capsys):
    argv = ["plan", str(ROOT / "configs" / "dreambooth_style.yaml"), "--model", "tiny", "--gpu", "t4",
            "--set", "data.resolution=64", "--set", "data.min_bucket=64"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer state", "activations peak", "validation peak", "CUDA context",
                "cuBLAS", "allocator slack", "total", "fits", "Tesla T4 (14.56 GiB)"):
        assert row in table, row
    assert main(argv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    b = rep["bytes"]
    assert rep["total_bytes"] == b["tensor_peak"] + sum(f["bytes"] for f in rep["fixed"])
    assert b["tensor_peak"] == max(b["step_peak"], b["validation_peak"], b["setup_peak"], b["assembly_peak"])
    assert b["step_peak"] == b["weights"] + b["gradients"] + b["optimizer_state"] + b["activations"]
    assert [f["name"] for f in rep["fixed"]] == [f.name for f in FIXED] and all(f["source"] for f in rep["fixed"])
    assert rep["fits"] and rep["gpu"]["source"] and rep["mode"] == "auto"
    assert fixed_costs(b["tensor_peak"]) == rep["fixed"]


def test_plan_refuses_a_card_nothing_fits_with_exit_2(capsys):
    code = main(["plan", str(ROOT / "configs" / "lora_anime_kohya.yaml"), "--model", "tiny", "--gpu", "0.25",
                 "--set", "data.resolution=64", "--set", "train.batch_size=1", "--set", "train.gradient_checkpointing=true",
                 "--set", "train.optimizer=adamw"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: nothing fits 0.25 GiB")
    assert "does not fit" in captured.out
    assert main(["plan", str(ROOT / "configs" / "lora_style.yaml"), "--gpu", "t5"]) == 2
    assert "--gpu 't5': choose one of t4" in capsys.readouterr().err


# --- inference ---------------------------------------------------------------------------------------------------------
def test_inference_picks_batch_and_vae_mode_from_the_cached_prediction(tmp_path, monkeypatch):
    from PIL import Image

    from customgen.inference import img2img, stylize
    from customgen.inference.fit import candidates, fit_sampling
    from customgen.inference.session import get_session
    from customgen.models.footprint import _cached_peak, sampling_peak

    session = get_session("tiny")
    session.activate([])  # the base alone (another test's styles would add their tensors to the prediction)
    real_batch = img2img.stylize_batch
    size = (64, 64)
    need = {c: total_bytes(sampling_peak(session.comps, kind="img2img", size=size, batch=c[0],
                                         dtype=session.comps.unet.dtype, slicing=c[1], tiling=c[2]))
            for c in candidates(3, True)}
    assert fit_sampling(session, kind="img2img", size=size, batch=3) == fit_sampling(session, kind="img2img",
                                                                                     size=size, batch=3)  # CPU: as asked
    assert fit_sampling(session, kind="img2img", size=size, batch=3).predicted_bytes is None
    order = list(need)
    for i, c in enumerate(order):  # a cap just at each candidate's need picks the first one that fits
        first = next(d for d in order if need[d] <= need[c])
        got = fit_sampling(session, kind="img2img", size=size, batch=3, cap_gib=need[c] / GIB)
        assert (got.batch, got.slicing, got.tiling) == first
    before = _cached_peak.cache_info().misses
    fit_sampling(session, kind="img2img", size=size, batch=3, cap_gib=need[order[1]] / GIB)
    assert _cached_peak.cache_info().misses == before  # a click costs a lookup
    contents = []
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"c{i}.png")
        contents.append(str(tmp_path / f"c{i}.png"))
    small = min(need.values())
    expected = next(c for c in order if need[c] <= small)
    seen = []
    monkeypatch.setattr(img2img, "stylize_batch", lambda session_, contents_, works, job: seen.append(len(works))
                        or real_batch(session_, contents_, works, job))
    outs = stylize(contents, None, model="tiny", steps=2, size=64, seed=0, batch=3, cap_gib=small / GIB)
    assert len(outs) == 3 and set(seen) == {expected[0]} and sum(seen) == 3
    assert (session.comps.vae.use_slicing, session.comps.vae.use_tiling) == expected[1:]
    with pytest.raises(UserError, match=r"needs .* GiB on the GPU .* use a smaller --size"):
        stylize(contents[:1], None, model="tiny", steps=2, size=64, seed=0, cap_gib=(small - 2**20) / GIB)


def test_the_cached_prediction_keeps_no_model_alive():
    """The prediction cache is keyed by the architecture: after a session's modules are dropped (clear_sessions,
    another model) their memory is freed, the cache holding none of their weights."""
    import gc
    import weakref

    from customgen.models import load_components
    from customgen.models.footprint import sampling_peak

    comps = load_components("tiny", device="cpu")
    unet = weakref.ref(comps.unet)
    first = sampling_peak(comps, kind="txt2img", size=(48, 64), batch=3, dtype=torch.float16)
    del comps
    gc.collect()
    assert unet() is None
    again = load_components("tiny", device="cpu")
    assert sampling_peak(again, kind="txt2img", size=(48, 64), batch=3, dtype=torch.float16) == first


def test_plan_sample_predicts_what_the_loaded_call_predicts(tmp_path, capsys):
    """`customgen plan --sample stylize` loads no weights (styles from their files' shapes, add-ons from their
    configs and shapes) and predicts the bytes a session with everything loaded predicts for the same call: a LoRA
    and a Textual Inversion artifact, a kohya LoRA file, a LoHa file with a bundled embedding, a local ControlNet and
    IP-Adapter, in bf16 (a card that computes it)."""
    from customgen.inference import adapters, clear_sessions, get_session
    from customgen.inference.fit import ladder as sampling_ladder, styles_bytes
    from customgen.inference.library import StyleLibrary
    from customgen.models.addons import controlnet_file, ip_adapter_file
    from customgen.models.footprint import addon_shapes
    from customgen.models.weightfile import family
    from tests import community_files as cf
    from tests.addon_fixtures import seeded_controlnet, write_controlnet, write_ip_adapter
    from tests.artifact_fixtures import make_lora, make_textual_inversion

    clear_sessions()
    session = get_session("tiny", device="cpu", dtype="bf16")
    lib = tmp_path / "styles"
    make_lora(lib / "lora_a", text_encoder=True)
    make_textual_inversion(lib / "ti_a", n_vectors=2)
    comps = session.comps
    cf.write(lib / "plain.safetensors", cf.kohya_state(comps, "locon", conv=False, text_encoder=False, seed=3))
    cf.write(lib / "ink.safetensors", cf.kohya_state(comps, "loha", seed=4) | {
        "bundle_emb.ink_style.string_to_param.*": cf.embedding(32, 2, seed=1)})
    net = write_controlnet(tmp_path / "control_tiny.safetensors", seeded_controlnet("tiny", seed=1))
    ip = write_ip_adapter(tmp_path / "h94", "tiny", seed=2)
    names = ["lora_a", "ti_a", "plain", "ink"]
    argv = ["plan", "--sample", "stylize", "--model", "tiny", "--styles", str(lib), "--controlnet", str(net),
            "--ip-adapter", str(ip), "--size", "64x48", "--batch", "3", "--gpu", "40", "--json"]
    for name in names:
        argv += ["--style", name]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["call"] == "stylize" and rep["dtype"] == "bfloat16" and rep["fits"]
    assert [s["kind"] for s in rep["styles"]] == ["lora", "textual_inversion", "lora", "merged"]

    library = StyleLibrary(lib)
    session.activate([(library.resolve(n), 1.0) for n in names])
    assert [s["bytes"] for s in rep["styles"]] == [session.loaded[library.resolve(n).key].kind.resident_bytes(
        session, session.loaded[library.resolve(n).key]) for n in names]
    assert all(s["bytes"] > 0 for s in rep["styles"]) and rep["bytes"]["styles"] == styles_bytes(session)
    fam = family(session)
    loaded = addon_shapes(adapters.load_controlnet(session, "canny", controlnet_file(net, fam)),
                          adapters.ip_adapter_weights(session, ip_adapter_file(ip, None, fam)))
    need = next(sampling_ladder(session.comps, kind="img2img", size=(48, 64), batch=3, dtype=torch.bfloat16,
                       addons=loaded, styles=styles_bytes(session)))[3]
    assert rep["tried"][0]["total_bytes"] == need
    clear_sessions()


def test_plan_sample_refuses_in_one_line_before_anything_loads(tmp_path, capsys):
    """A file customgen cannot use, an SDXL file, a bad size or batch, a CONFIG mixed with --sample options: one
    line, exit 2; a card nothing fits is the table, then the line."""
    from tests import community_files as cf

    sdxl = cf.write(tmp_path / "xl.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                  torch.zeros(4, 768)})
    cases = [(["--style", str(sdxl)], "SDXL"), (["--style", str(tmp_path / "missing.safetensors")], "does not exist"),
             (["--size", "65"], "multiples of 8"), (["--size", "big"], "WIDTHxHEIGHT"), (["--batch", "0"], "at least 1"),
             (["--sample", "generate", "--controlnet", str(tmp_path)], "--sample stylize"),
             ([str(ROOT / "configs" / "lora_style.yaml"), "--sample", "stylize"], "give one of them"),
             (["--set", "train.steps=2"], "training CONFIG")]
    for extra, message in cases:
        assert main(["plan", "--model", "tiny", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (extra, err)
    assert main(["plan"]) == 2 and "--sample stylize|generate" in capsys.readouterr().err
    assert main(["plan", "--sample", "generate", "--model", "sd15-random", "--size", "1024", "--batch", "4",
                 "--gpu", "2"]) == 2  # SD v1.5's fp16 weights alone are 2 GiB
    captured = capsys.readouterr()
    assert "does not fit" in captured.out and "use a smaller --size or fewer --num-images" in captured.err


def test_generate_demo_and_evaluate_plan_for_their_cap(tmp_path):
    """generate keeps its batch (one generator) and turns on VAE slicing when the cap asks; the demo's handler and
    the evaluation's requests carry the cap."""
    from types import SimpleNamespace

    from customgen import demo
    from customgen.config import EvalConfig
    from customgen.inference.fit import fit_sampling
    from customgen.inference.session import get_session
    from customgen.models.footprint import sampling_peak

    session = get_session("tiny")
    session.activate([])  # the base alone (another test's styles would add their tensors to the prediction)
    need = {sl: total_bytes(sampling_peak(session.comps, kind="txt2img", size=(64, 64), batch=2,
                                          dtype=session.comps.unet.dtype, slicing=sl)) for sl in (False, True)}
    assert need[True] < need[False]
    cap = need[True] / GIB
    got = fit_sampling(session, kind="txt2img", size=(64, 64), batch=2, cap_gib=cap, split=False)
    assert (got.batch, got.slicing, got.tiling) == (2, True, False)
    session.comps.vae.disable_slicing()
    state = SimpleNamespace(session=session, styles={}, library=SimpleNamespace(root=None), cap_gib=cap,
                            save=lambda img, prefix: str(tmp_path / f"{prefix}.png"))
    paths, _ = demo.generate_handler(state, "a photo", "", demo.NONE, 1.0, 2, 7.5, 0, 2)
    assert len(paths) == 2 and session.comps.vae.use_slicing
    assert EvalConfig(cap_gib=3.5).request("tiny").cap_gib == 3.5


def test_textual_inversion_with_prior_preservation_trains_in_half_precision(tmp_path):
    """The fp32 text encoder of Textual Inversion beside a bf16 UNet: the base model's class images are made under
    autocast (without it the pipeline fed fp32 prompt embeddings to the half-precision UNet; the fake-CUDA count of
    this plan found it)."""
    from customgen.train import train

    wikiart = make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 2}, size=(72, 72))
    cfg = tiny_cfg("textual_inversion", f"data.root={wikiart}", "data.style=Cubism", "train.steps=1",
                   "train.batch_size=1", "train.mixed_precision=bf16", "prompt.prior=true",
                   "prompt.class_prompt=a painting", "prompt.num_class_images=1", "prompt.class_steps=1",
                   "validation.steps=1", "validation.num_images=1", "train.checkpoint_every=0")
    out = train(cfg, output=tmp_path / "ti", progress=False)
    assert len(list((out / "class_images").glob("*.png"))) == 1 and (out / "style.json").is_file()
    assert cached_estimate(cfg, MemoryPlan("fp16", False, "adamw")).setup_peak > 0


PIVOTAL = ("dreambooth_lora_subject", "prompt.instance=a photo of TOK person")


def test_pivotal_tuning_is_predicted_and_holds_against_a_real_cpu_run():
    """Pivotal tuning's step (tokens beside the UNet and text-encoder LoRA) counted on fake CUDA and on real CPU tensors:
    peaks within 5%, as every recipe above. What it adds is the trained embedding table: its fp32 gradient and
    AdamW's two states over the whole table and its step counter (the optimizer holds it; after_step restores all but
    the new rows; the for-loop and fused AdamW keep each parameter's step as a tensor)."""
    plan = MemoryPlan("no", False, "adamw", offload=False)
    cfg = tiny_cfg(*PIVOTAL, "pivotal.tokens=2")
    fake = estimate_training(cfg, plan)
    torch.manual_seed(0)
    real = estimate_training(cfg, plan, fake=False)
    for part in ("step_peak", "validation_peak", "setup_peak", "assembly_peak"):
        assert getattr(fake, part) == pytest.approx(getattr(real, part), rel=0.05), part
    assert fake.gradients == real.gradients and fake.optimizer_state == real.optimizer_state
    plain = estimate_training(tiny_cfg(*PIVOTAL), plan)
    table = blocks(4 * (514 + 2) * 32)  # tiny's 514-token table and the two new rows, 32 wide, fp32
    assert fake.gradients - plain.gradients == table
    assert fake.optimizer_state - plain.optimizer_state == 2 * table + blocks(4)  # two moments and an fp32 step


def test_pivotal_tuning_keeps_the_text_encoder_in_fp32_under_fp16():
    """Under fp16 (a T4) the frozen text encoder would be fp16; with the trained table inside it stays fp32 (as for
    Textual Inversion): the weights predicted grow by exactly the text encoder's fp32 - fp16 bytes."""
    from customgen.models import load_components

    plan = MemoryPlan("fp16", False, "adamw", offload=False)
    pivotal = cached_estimate(tiny_cfg(*PIVOTAL, "pivotal.tokens=2", "lora.text_encoder=false"), plan)
    plain = cached_estimate(tiny_cfg(*PIVOTAL, "lora.text_encoder=false"), plan)
    te = load_components("tiny", device="cpu", dtype=torch.float32).text_encoder
    grown = sum(blocks(4 * p.numel()) - blocks(2 * p.numel()) for n, p in te.named_parameters()
                if "token_embedding" not in n)
    grown += blocks(4 * (514 + 2) * 32) - blocks(2 * 514 * 32)  # the table: two rows more, fp32
    assert pivotal.weights - plain.weights == grown
