"""Training on `tiny`: every recipe, frozen weights stay frozen, stock reloading, losses, resume, DDP."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from packaging.version import Version

from customgen import kinds
from customgen.kinds import dreambooth, lora, textual_inversion
from customgen.cli import main
from customgen.config import load_config
from customgen.models import build_pipeline, load_pipeline
from customgen.train import build_run, finish, prepare_output, train
from customgen.train import loop
from customgen.train.checkpoint import checkpoints
from tests.artifact_fixtures import assert_same_lora, stock_reads_kohya_text_encoder
from tests.image_fixtures import make_instance_folder, make_kohya_tree, make_wikiart_tree
from tests.interrupt import killed_at
from tests.t4_step import fp16_scaled_step
from tests.launch import launch_two_processes
from tests.tolerance import PIXEL_LEVELS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "data.min_size=32", "train.steps=3",
         "train.batch_size=1", "validation.steps=2", "prompt.num_class_images=2", "prompt.class_steps=2",
         "train.checkpoint_every=0", "train.validate_every=0", "loss.perceptual_every=1",
         "loss.perceptual_max_timestep=1000", "train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "wikiart": make_wikiart_tree(root / "wikiart", styles={"Cubism": 3, "Ukiyo_e": 2}, size=(80, 72)),
        "photos": make_instance_folder(root / "photos", n=3, size=(72, 72)),
        "kohya": make_kohya_tree(root / "kohya", folders={"3_sks girl": 2}),
    }


RECIPES = {
    "lora_style": lambda d: [f"data.root={d['wikiart']}", "data.style=Cubism"],
    "dreambooth_style": lambda d: [f"data.root={d['wikiart']}", "data.style=Cubism"],
    "textual_inversion": lambda d: [f"data.root={d['wikiart']}", "data.style=Cubism"],
    "dreambooth_lora_subject": lambda d: [f"data.root={d['photos']}"],
    "lora_anime_kohya": lambda d: [f"data.root={d['kohya']}"],
}


def recipe_cfg(name, data, *extra):
    return load_config(ROOT / "configs" / f"{name}.yaml", SMALL + RECIPES[name](data) + list(extra))


def snapshot(comps):
    return {(m, n): p.detach().clone() for m in ("unet", "vae", "text_encoder")
            for n, p in getattr(comps, m).named_parameters()}


def render(pipe, prompt):
    g = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=3.0, generator=g,
                output_type="np").images[0]


def stock_reload(manifest, out):
    """The artifact through stock diffusers loaders into a fresh base pipeline."""
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")
    if manifest.kind == "lora":
        pipe.load_lora_weights(str(out), weight_name=lora.WEIGHTS)  # offline, older diffusers insist on the name
    elif manifest.kind == "textual_inversion":
        pipe.load_textual_inversion(str(out / textual_inversion.WEIGHTS), token=manifest.token)
    else:
        dreambooth.load_dreambooth(pipe.unet, out)
    return pipe


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_only_its_parameters_and_reloads_with_stock_loaders(recipe, data, tmp_path):
    fast = ("train.lr=0.02", "lora.text_encoder_lr=0.02", "train.lr_scheduler=constant")  # visible after 3 steps
    cfg = recipe_cfg(recipe, data, "loss.lpips=0", "loss.gram=0", *fast)
    out = tmp_path / "art"
    prepare_output(out, resume="never", overwrite=False)
    run = build_run(cfg, out)
    before = snapshot(run.comps)
    trained = {id(p) for p in run.method.trained_params(run.comps).values()}
    stats = loop.run_loop(run, start=0, progress=False)
    assert torch.isfinite(torch.tensor(stats["last"]["loss"]))
    changed = 0
    for (m, n), p in ((k, dict(getattr(run.comps, k[0]).named_parameters())[k[1]]) for k in before):
        if id(p) not in trained:
            assert torch.equal(p, before[(m, n)]), f"frozen {m}.{n} changed"
        elif recipe == "textual_inversion":
            rows = torch.ones(p.shape[0], dtype=torch.bool)
            rows[run.method.token_ids] = False
            assert torch.equal(p[rows], before[(m, n)][rows]), "TI changed other embedding rows"
            changed += int(not torch.equal(p[~rows], before[(m, n)][~rows]))
        else:
            changed += int(not torch.equal(p, before[(m, n)]))
    assert changed > 0
    prompt = run.method.default_prompt()
    trained_image = render(build_pipeline(run.comps, kind="txt2img"), prompt)
    finish(run, stats["seconds"], 0)
    manifest = kinds.read_manifest(out)
    assert manifest.method == recipe and manifest.trainable_params == run.method.trainable_count(run.comps)
    assert manifest.file_bytes == (out / manifest.weights).stat().st_size > 0
    assert (out / "config.yaml").is_file() and (out / "logs" / "loss.csv").is_file()
    assert list((out / "samples").glob("step-*.png"))
    reload = stock_reload(manifest, out)
    reloaded = render(reload, prompt)
    base = render(load_pipeline("tiny", kind="txt2img", device="cpu"), prompt)
    assert np.array_equal(reloaded, trained_image)  # the saved weights, exactly, in the same layers
    assert abs(reloaded - base).max() > 1 / PIXEL_LEVELS  # the style shows in the saved 8-bit image
    if manifest.kind == "lora":  # the kohya/WebUI export loads and gives the same model
        kohya = load_pipeline("tiny", kind="txt2img", device="cpu")
        if manifest.text_encoder and not stock_reads_kohya_text_encoder(kohya.text_encoder):
            with pytest.raises(IndexError):  # diffusers < 0.42 under transformers >= 5.15: docs/interop.md
                kohya.load_lora_weights(str(out), weight_name=manifest.exports[0])
        else:
            kohya.load_lora_weights(str(out), weight_name=manifest.exports[0])
            assert_same_lora(kohya, reload)
        from safetensors import safe_open

        with safe_open(str(out / manifest.exports[0]), "pt") as f:
            meta = f.metadata()
        assert (meta["ss_resolution"], meta["ss_steps"], meta["ss_output_name"]) == ("(64, 64)", "3", "art")
        if recipe == "lora_anime_kohya":  # kohya's own count of caption tags per `N_folder` (make_kohya_tree)
            tags = json.loads(meta["ss_tag_frequency"])
            assert tags["3_sks girl"]["a photo of sks girl"] >= 1 and tags["3_sks girl"]["custom caption"] >= 1


def test_perceptual_losses_reach_lora_and_decoder_is_skipped_without_them(data, tmp_path, monkeypatch):
    cfg = recipe_cfg("lora_style", data, "loss.l2=0", "loss.lpips=1", "loss.gram=1")
    run = build_run(cfg, tmp_path / "p")
    losses = loop.step_losses(run, 0)
    assert losses["lpips"] > 0 and losses["gram"] > 0 and losses["loss"] == losses["lpips"] + losses["gram"]
    losses["loss"].backward()
    grads = [p.grad for n, p in run.comps.unet.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    cfg = recipe_cfg("lora_style", data, "loss.lpips=0", "loss.gram=0")
    run = build_run(cfg, tmp_path / "q")
    assert run.perceptual is None

    def no_decode(*a, **k):
        raise AssertionError("the VAE decoder ran although beta = gamma = 0")

    monkeypatch.setattr(run.comps.vae, "decode", no_decode)
    loop.run_loop(run, start=0, progress=False)


def test_content_pairs_use_the_img2img_strength(data, tmp_path):
    cfg = recipe_cfg("lora_style", data, "loss.lpips=1", "loss.gram=1", "loss.perceptual_max_timestep=10",
                     f"loss.content_root={data['wikiart'] / 'Ukiyo_e'}")
    run = build_run(cfg, tmp_path / "c")
    losses = loop.step_losses(run, 0)
    assert losses["lpips"] > 0 and losses["gram"] > 0  # the threshold does not apply: t comes from the strength


def test_resume_after_a_kill_gives_the_same_weights(data, tmp_path, monkeypatch):
    extra = ("train.steps=4", "train.checkpoint_every=2", "loss.lpips=0", "loss.gram=0")
    whole = train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "whole", progress=False)

    with killed_at(monkeypatch, 3):
        train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "cut", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step-000002"]
    assert not (tmp_path / "cut" / kinds.MANIFEST).exists()
    resumed = train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "cut", resume="auto", progress=False)
    from safetensors.torch import load_file

    a, b = (load_file(str(p / lora.WEIGHTS)) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_resumes_under_another_transformers_release(data, tmp_path, monkeypatch):
    """Kaggle (transformers 5.0: CLIPTextModel has `text_model.`) → Colab (5.15: it has not), or back: checkpoints
    name text-encoder tensors canonically and read either form, so the resumed subject LoRA is the same."""
    extra = ("train.steps=3", "train.checkpoint_every=2", "prompt.prior=false")
    whole = train(recipe_cfg("dreambooth_lora_subject", data, *extra), output=tmp_path / "whole", progress=False)
    with killed_at(monkeypatch, 2):
        train(recipe_cfg("dreambooth_lora_subject", data, *extra), output=tmp_path / "cut", progress=False)
    from safetensors.torch import load_file, save_file

    (ck,) = checkpoints(tmp_path / "cut")
    saved = load_file(str(ck / "trainable.safetensors"))
    te = [k for k in saved if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.") for k in te)  # canonical whatever is installed
    other = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in saved.items()}  # the other form
    save_file(other, str(ck / "trainable.safetensors"))
    resumed = train(recipe_cfg("dreambooth_lora_subject", data, *extra), output=tmp_path / "cut", resume="auto",
                    progress=False)
    a, b = (load_file(str(p / lora.WEIGHTS)) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoints_are_ignored_and_only_k_kept(data, tmp_path):
    out = tmp_path / "k"
    train(recipe_cfg("lora_style", data, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                     "loss.lpips=0", "loss.gram=0"), output=out, progress=False)
    assert [p.name for p in checkpoints(out)] == ["step-000004", "step-000005"]
    (out / "checkpoints" / ".tmp-step-000009").mkdir()
    (out / "checkpoints" / "step-000010").mkdir()  # no state.json: not complete
    assert [p.name for p in checkpoints(out)] == ["step-000004", "step-000005"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = loop.noise_l2
    calls = {"n": 0}

    def nan_at_third(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(loop, "noise_l2", nan_at_third)
    cfg = recipe_cfg("lora_style", data, "train.steps=4", "train.checkpoint_every=2", "loss.lpips=0", "loss.gram=0")
    with pytest.raises(loop.TrainingDiverged, match="step-000002"):
        train(cfg, output=tmp_path / "n", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "n")] == ["step-000002"]


def test_class_images_are_generated_once(data, tmp_path, monkeypatch):
    cfg = recipe_cfg("dreambooth_style", data, f"prompt.class_dir={tmp_path / 'cls'}")
    build_run(cfg, tmp_path / "a")
    assert len(list((tmp_path / "cls").glob("*.png"))) == 2
    import customgen.train.data as train_data

    monkeypatch.setattr(train_data, "build_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    run = build_run(cfg, tmp_path / "b")
    assert len(run.classes) == 2


def test_cli_train_and_bad_inputs(data, tmp_path, capsys):
    args = ["train", str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", "--max-steps", "1",
            "--output", str(tmp_path / "cli")] + sum((["--set", s] for s in SMALL[1:] + RECIPES["lora_style"](data)
                                                      + ["loss.lpips=0", "loss.gram=0"]), [])
    assert main(args) == 0
    assert kinds.read_manifest(tmp_path / "cli").steps == 1
    capsys.readouterr()
    assert main(args) == 2  # an artifact exists: no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    for bad in (["--set", "data.root=/no/such/dir"], ["--set", "train.nosuch=1"], ["--set", "data.style=Nope"]):
        assert main(args + ["--overwrite"] + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


@pytest.mark.slow
def test_two_process_accelerate_launch(data, tmp_path):
    sets = SMALL[1:] + RECIPES["lora_style"](data) + ["loss.lpips=0", "loss.gram=0", "train.steps=2",
                                                       "train.snapshot_every=1"]  # rank 0 writes it, rank 1 waits
    r = launch_two_processes(["train", str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", "--output",
                              str(tmp_path / "ddp"), *sum((["--set", s] for s in sets), [])], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = kinds.read_manifest(tmp_path / "ddp")
    assert m.steps == 2 and (tmp_path / "ddp" / "ddp.safetensors").is_file() and m.exports == ["ddp.safetensors"]
    (snap,) = kinds.list_snapshots(tmp_path / "ddp")
    assert kinds.read_manifest(snap).step == 1 and r.stdout.count("snapshot step 1:") == 1  # the main process only


def test_memory_plan_as_given_keeps_the_probe_rules():
    """plan_memory (train.memory=manual, or no GPU) takes the settings as set; precision comes from the probe (bf16
    only where the GPU has it); 8-bit Adam falls back with a notice where bitsandbytes does not work. What fits a
    card is customgen.train.fit's (tests/test_plan.py)."""
    import warnings

    from customgen.config import TrainConfig
    from customgen.errors import Notice, UserError
    from customgen.memory import DeviceInfo, plan_memory

    t4 = DeviceInfo("cuda:0", "Tesla T4", 15 * 2**30, (7, 5), torch.float16, False)
    plan = plan_memory(TrainConfig(optimizer="adamw"), t4)
    assert (plan.mixed_precision, plan.gradient_checkpointing) == ("fp16", False)  # no more "< 24 GiB" guess
    assert plan_memory(TrainConfig(optimizer="adamw", gradient_checkpointing=True), t4).gradient_checkpointing
    assert "Tesla T4" in plan.describe(t4) and "fp16" in plan.describe(t4)
    h100 = DeviceInfo("cuda:0", "H100", 80 * 2**30, (9, 0), torch.bfloat16, True)
    assert plan_memory(TrainConfig(optimizer="adamw"), h100).mixed_precision == "bf16"
    with pytest.raises(UserError, match="no bf16"):
        plan_memory(TrainConfig(mixed_precision="bf16"), t4)
    cpu = DeviceInfo("cpu", "cpu", 0, None, torch.float32, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_memory(TrainConfig(optimizer="adamw8bit"), cpu)
    assert plan.optimizer == "adamw" and any(issubclass(w.category, Notice) for w in caught)
    assert plan.mixed_precision == "no"


def test_fp16_plan_keeps_trainables_fp32(data, tmp_path):
    """The 'Attempting to unscale FP16 gradients' trap: frozen weights fp16, trainable weights fp32."""
    from types import SimpleNamespace

    from customgen.memory import MemoryPlan
    from customgen.kinds import make_method
    from customgen.models import load_components
    from customgen.train.build import place_components

    cfg = recipe_cfg("lora_style", data, "loss.lpips=0", "loss.gram=0")
    comps = load_components("tiny", device="cpu", dtype=torch.float32)
    method = make_method(cfg)
    method.setup(comps)
    place_components(cfg, comps, SimpleNamespace(device=torch.device("cpu")), MemoryPlan("fp16", False, "adamw"), method)
    dtypes = {p.requires_grad: set() for p in comps.unet.parameters()}
    for p in comps.unet.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes[True] == {torch.float32} and dtypes[False] == {torch.float16}
    assert {p.dtype for p in comps.vae.parameters()} == {torch.float16}


def test_validation_uses_fixed_content_images(data, tmp_path):
    from PIL import Image

    from customgen.train.validation import validation_content

    contents = data["wikiart"] / "Ukiyo_e"
    cfg = recipe_cfg("lora_style", data, "loss.lpips=0", "loss.gram=0", f"validation.content_root={contents}",
                     "validation.num_images=2", "train.steps=1")
    assert validation_content(cfg) == sorted(str(p) for p in contents.iterdir())[:2]
    out = train(cfg, output=tmp_path / "v", progress=False)
    (sample,) = (out / "samples").glob("step-*.png")
    assert Image.open(sample).size == (2 * 64, 64)  # img2img of each content image, side by side


# --- mixed precision: what a T4 (fp16 + scaler) and an A100/H100 (bf16) run, exercised on the CPU --------------

@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_in_bf16_with_gradient_checkpointing_and_reloads(recipe, data, tmp_path):
    """bf16 autocast (accelerate supports it on CPU) with checkpointing forced on, as configured by the recipe."""
    from customgen.train import run as run_module

    seen = {}

    def spy(run, **kwargs):  # what the loop really ran with (a silent fp32 fallback would pass the rest)
        seen.update(precision=run.accelerator.mixed_precision, checkpointing=run.comps.unet.is_gradient_checkpointing,
                    frozen={p.dtype for p in run.comps.unet.parameters() if not p.requires_grad})
        return real(run, **kwargs)

    real = run_module.run_loop
    cfg = recipe_cfg(recipe, data, "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.steps=2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", spy)
        out = train(cfg, output=tmp_path / "bf16", progress=False)
    assert seen == {"precision": "bf16", "checkpointing": True, "frozen": {torch.bfloat16}}, seen
    losses = pd.read_csv(out / "logs" / "loss.csv")["loss"]
    assert len(losses) == 2 and np.isfinite(losses).all()
    manifest = kinds.read_manifest(out)
    image = render(stock_reload(manifest, out), manifest.prompt or "a painting")
    assert np.isfinite(image).all() and image.max() > 0.01  # finite and not black


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp16_path_of_a_t4_with_grad_scaler_steps_each_method(recipe, data, tmp_path):
    """The T4 recipe: frozen weights fp16, trainables fp32, fp16 autocast, GradScaler unscale + step (on CPU)."""
    fp16_scaled_step(recipe_cfg(recipe, data, "loss.lpips=0", "loss.gram=0", "train.gradient_checkpointing=true"),
                     tmp_path / "fp16")


def test_two_runs_in_one_process_may_change_precision(data, tmp_path):
    """A notebook kernel trains in bf16, then in fp32: accelerate's global state must not refuse the second."""
    for i, precision in enumerate(("bf16", "no")):
        cfg = recipe_cfg("lora_style", data, "loss.lpips=0", "loss.gram=0", f"train.mixed_precision={precision}",
                         "train.steps=1")
        assert kinds.read_manifest(train(cfg, output=tmp_path / f"run{i}", progress=False)).steps == 1


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.24"), reason="the gate arrived in transformers "
                    "5.24; older releases gate other calls (4.x also load_adapter, which diffusers' stock loading uses) "
                    "at versions every supported peft meets, so raising it there tests something no release does")
def test_text_encoder_lora_never_goes_through_transformers_peft_gate(data, tmp_path, monkeypatch):
    """transformers 5.24 refuses its own add_adapter/set_adapter/... unless peft >= 0.22, which PyPI did not have
    (newest: 0.21.2): a fresh install broke every subject LoRA. peft's own injection (what diffusers calls) has
    no such gate. Here transformers demands an impossible peft: training, stock reload and a session that
    activates, blends and switches off the subject must still work."""
    import transformers.integrations.peft as hf_peft
    from customgen.inference import clear_sessions, generate

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "999.0")
    cfg = recipe_cfg("dreambooth_lora_subject", data, "loss.lpips=0", "loss.gram=0", "train.steps=1",
                     "train.lr=0.02", "lora.text_encoder_lr=0.02")
    out = train(cfg, output=tmp_path / "subject", progress=False)
    manifest = kinds.read_manifest(out)
    assert manifest.text_encoder
    prompt = manifest.prompt
    assert np.isfinite(render(stock_reload(manifest, out), prompt)).all()
    clear_sessions()
    run = dict(model="tiny", steps=2, seed=0, size=64, device="cpu")
    base = np.asarray(generate(prompt, None, **run))
    styled = np.asarray(generate(prompt, [str(out)], scales=[1.0], **run))
    blended = np.asarray(generate(prompt, [str(out)], scales=[0.5], **run))
    assert np.array_equal(np.asarray(generate(prompt, None, **run)), base)  # switched off: the base model again
    assert not np.array_equal(styled, base) and not np.array_equal(blended, styled)
    clear_sessions()


# --- optimizers ---------------------------------------------------------------------------------------------------
def adamw_reference(p0, grads, *, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019, decoupled decay, Adam's bias correction; torch's documented algorithm) in
    float64, and a first-order bound on how far an fp32 implementation of it can land (Higham 2002, §3.1): per step,
    m is 3 roundings of terms below max|g| (plus β1 rounded to fp32: u·β1/(1−β1) of it); v sums non-negative terms,
    4 roundings a step, compounding, plus u·β2/(1−β2) from β2 rounded; 1 − β^k computed in fp32 (the fused kernel)
    loses (k+3)·u·β^k/(1−β^k) to cancellation; the square root, ε, division and the weight update 4 more; the
    weight (decay, product, subtraction) 3 roundings of |p| + lr·|update|. Errors of earlier steps carry over."""
    from tests.tolerance import gamma, unit_roundoff

    u, g32 = unit_roundoff(torch.float32), lambda n: gamma(n, torch.float32)  # noqa: E731
    b1, b2 = betas
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    envelope, bound = torch.zeros_like(p), torch.zeros_like(p)
    for k, g in enumerate(grads, 1):
        g = g.double()
        envelope = torch.maximum(envelope, g.abs())
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** k, 1 - b2 ** k
        denom = (v / bc2).sqrt() + eps
        update = m / bc1 / denom
        rel_bc1, rel_bc2 = ((k + 3) * u * b ** k / bc + 2 * u for b, bc in ((b1, bc1), (b2, bc2)))
        rel_v = g32(4 * k) + (b2 / (1 - b2) + k) * u
        err_m = (g32(9 * k) + (b1 / (1 - b1) + k) * u) * envelope
        err_update = err_m / bc1 / denom + update.abs() * (rel_bc1 + (rel_v + rel_bc2) / 2 + g32(4))
        bound += lr * err_update + g32(3) * (p.abs() + lr * update.abs())
        p = p * (1 - lr * wd) - lr * update
    return p, bound


@pytest.mark.parametrize("implementation", [{"fused": True}, {"foreach": False}], ids=["fused", "for-loop"])
def test_adamw_implementations_give_the_same_weights_to_fp32_rounding(implementation):
    """The run's AdamW (fused on CUDA, for-loop elsewhere) against torch's default CUDA one (foreach) and the
    published update in float64: 10 steps over the whole tiny UNet with fixed gradients of 10^-4..1 scale; each lands
    within the derived bound of the reference, so within twice it of each other, and the bound is far below what the
    steps changed. The fused kernel runs here on the CPU (torch >= 2.4), the same code CUDA's kernel implements."""
    from customgen.models import load_components

    if implementation.get("fused"):
        try:
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        except RuntimeError:
            pytest.skip("this torch has no fused AdamW for the CPU (torch < 2.4)")
    params = [p.detach() for p in load_components("tiny", device="cpu", dtype=torch.float32).unet.parameters()]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen) * 10 ** torch.empty(p.shape).uniform_(-4, 0, generator=gen)
              for p in params] for _ in range(10)]
    lr, wd = 1e-3, 1e-2
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts]).double()  # noqa: E731
    reference, bound = adamw_reference(flat(params), [flat(gs) for gs in grads], lr=lr, wd=wd)
    finals = {}
    for name, kwargs in {"run": implementation, "foreach": {"foreach": True}}.items():
        trained = [torch.nn.Parameter(p.clone()) for p in params]
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=wd, **kwargs)
        for gs in grads:
            for p, g in zip(trained, gs):
                p.grad = g.clone()
            optimizer.step()
        finals[name] = flat(trained)
        assert ((finals[name] - reference).abs() <= bound).all(), name
    assert ((finals["run"] - finals["foreach"]).abs() <= 2 * bound).all()
    assert bound.max() < 1e-3 * (reference - flat(params)).abs().max()


def test_the_run_takes_fused_adamw_on_cuda_and_the_for_loop_elsewhere():
    """customgen.train.optimizers.adamw: fused where every parameter is on CUDA (a fake CUDA tensor here), else
    foreach=False (what torch runs on a CPU anyway); the checkpoint of one resumes into the other's kernel."""
    from customgen.peak import fake_cuda
    from customgen.train.checkpoint import same_implementation
    from customgen.train.optimizers import adamw

    cpu = adamw([{"params": [torch.nn.Parameter(torch.zeros(4))], "lr": 1e-3}], weight_decay=0.0)
    assert (cpu.defaults["fused"], cpu.defaults["foreach"]) in ((None, False), (False, False))
    with fake_cuda():
        cuda = adamw([{"params": [torch.nn.Parameter(torch.zeros(4, device="cuda"))], "lr": 1e-3}], weight_decay=0.0)
    assert cuda.defaults["fused"] and cuda.param_groups[0]["fused"]
    saved = {"state": {}, "param_groups": [{**cpu.state_dict()["param_groups"][0], "fused": None, "foreach": None}]}
    assert same_implementation(saved, cuda)["param_groups"][0]["fused"] is True


RESUMED = {  # a setting whose state or randomness must survive a kill: its --set lines
    "prodigy bf16": ("train.optimizer=prodigy", "train.lr=1.0", "train.mixed_precision=bf16"),
    "noise offset": ("loss.noise_offset=0.1", "loss.adaptive_noise_scale=0.05"),
}


@pytest.mark.parametrize("setting", list(RESUMED))
def test_resume_after_a_kill_is_exact_with_prodigy_and_noise_offset(setting, data, tmp_path, monkeypatch):
    """Killed at step 3 after the step-2 checkpoint, resumed: the weights and the step-4 checkpoint (Prodigy's
    exp_avg, exp_avg_sq, s, p0, and d, d_max, d_numerator, d_hat, k in its groups) equal an uninterrupted run's bit
    for bit. A run resumed from step 2 holds step 2's estimate, and a d that has grown (tiny's noisy gradients keep
    Prodigy's d_hat below d0 = 1e-6 for the first steps) goes through a checkpoint file and back."""
    from safetensors.torch import load_file

    from customgen.train.checkpoint import read_checkpoint, restore, save_checkpoint

    extra = ("train.steps=5", "train.checkpoint_every=2", "loss.lpips=0", "loss.gram=0", *RESUMED[setting])
    whole = train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "whole", progress=False)
    with killed_at(monkeypatch, 3):
        train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "cut", progress=False)
    if setting.startswith("prodigy"):
        (ck,) = checkpoints(tmp_path / "cut")
        saved = read_checkpoint(ck).optimizer["param_groups"][0]
        assert saved["k"] == 2 and saved["d_numerator"] > 0 and saved["d_hat"] > 0
        run = build_run(recipe_cfg("lora_style", data, *extra), tmp_path / "cut")
        assert loop.resume(run, "auto") == 2
        group, tensors = run.optimizer.param_groups[0], run.method.trained_params(run.comps)
        assert {k: group[k] for k in saved if k != "params"} == {k: v for k, v in saved.items() if k != "params"}
        group["d"] = group["d_max"] = 2.5e-6
        grown = save_checkpoint(tmp_path / "grown", step=2, tensors=tensors, optimizer=run.optimizer,
                                lr_scheduler=run.lr_scheduler, info={}, keep=0)
        group["d"] = group["d_max"] = group["d0"]
        restore(read_checkpoint(grown), tensors=tensors, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler)
        group = run.optimizer.param_groups[0]  # load_state_dict makes new group dicts
        assert group["d"] == group["d_max"] == 2.5e-6
    resumed = train(recipe_cfg("lora_style", data, *extra), output=tmp_path / "cut", resume="auto", progress=False)
    a, b = (load_file(str(p / lora.WEIGHTS)) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step4 = [read_checkpoint(p / "checkpoints" / "step-000004") for p in (whole, resumed)]
    assert step4[0].optimizer["param_groups"] == step4[1].optimizer["param_groups"]
    states = [load_file(str(c.path / "optimizer.safetensors")) for c in step4]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_noise_offset_adds_a_per_channel_constant_drawn_from_each_examples_stream(data, tmp_path, monkeypatch):
    """The noise the loop gives the scheduler: with loss.noise_offset o it is the noise without it plus o·z, z
    constant over each latent channel and the same z for any o (each example's own generator, after its noise);
    with kohya's adaptive_noise_scale a it is o' = max(0, o + a·|channel mean of the latents|) times that z."""
    seen = {}

    def noise_of(*sets):
        run = build_run(recipe_cfg("lora_style", data, "loss.lpips=0", "loss.gram=0", "train.batch_size=2", *sets),
                        tmp_path / "n")
        add = run.comps.noise_scheduler.add_noise
        monkeypatch.setattr(run.comps.noise_scheduler, "add_noise",
                            lambda latents, noise, t: seen.update(latents=latents, noise=noise) or add(latents, noise, t))
        loop.step_losses(run, 3)
        return seen["noise"], seen["latents"]

    plain, latents = noise_of()
    small, _ = noise_of("loss.noise_offset=0.05")
    big, _ = noise_of("loss.noise_offset=0.2")
    adaptive, _ = noise_of("loss.noise_offset=0.2", "loss.adaptive_noise_scale=-0.5")
    z = (big - plain) / 0.2  # (B, C, H, W), constant over H, W
    assert z.shape == plain.shape and torch.allclose(z, z[..., :1, :1].expand_as(z), rtol=0, atol=1e-5)
    assert torch.allclose((small - plain) / 0.05, z, rtol=0, atol=1e-4) and z.abs().max() > 0.1
    scale = torch.clamp(0.2 - 0.5 * latents.float().mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    assert torch.allclose(adaptive - plain, scale * z, rtol=0, atol=1e-5)


def test_an_overflowing_fp16_step_is_skipped_where_accelerate_sees_it():
    """T4 path: GradScaler with inf gradients. accelerate marks a step skipped (and holds the LR schedule) only when
    GradScaler does not call optimizer.step(); fused AdamW would take the step call and skip inside its kernel. The
    run's fused AdamW leaves the skip to GradScaler: step() is not called, the weights stay, as with the for-loop one."""
    from customgen.train.optimizers import adamw

    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        pytest.skip("this torch has no fused AdamW for the CPU (torch < 2.4)")
    for grad in (float("inf"), 1.0):
        p = torch.nn.Parameter(torch.ones(4))
        optimizer = adamw([{"params": [p], "lr": 0.1}], weight_decay=0.0, fused=True)
        assert optimizer.defaults["fused"]
        calls, step = [], optimizer.step
        optimizer.step = lambda *a, **k: calls.append(1) or step(*a, **k)  # what accelerate's patched step records
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale((p * grad).sum()).backward()
        scaler.step(optimizer)
        assert (len(calls), torch.equal(p.detach(), torch.ones(4))) == ((0, True) if grad == float("inf") else (1, False))


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(data):
    """A checkpoint's saved config from before loss.noise_offset, loss.adaptive_noise_scale existed is the same config
    at their defaults (off: what that run did), and another config once the setting is on."""
    import copy

    from customgen.config import to_dict
    from customgen.train.checkpoint import config_differences

    current = to_dict(recipe_cfg("lora_style", data))
    older = copy.deepcopy(current)
    del older["loss"]["noise_offset"], older["loss"]["adaptive_noise_scale"]
    assert config_differences(older, current) == []
    assert config_differences(older, to_dict(recipe_cfg("lora_style", data, "loss.noise_offset=0.1"))) == \
        ["loss.noise_offset: 0.0 → 0.1"]
