"""Study presets (configs/studies/) and the schedule they rest on, on `tiny`: each preset loads, validates and trains
2 optimizer steps with its study's effective batch, visible in style.json; gradient accumulation makes one optimizer
step per N micro-batches and trains as the larger batch; subjects do not flip, styles do; epochs count as kohya's."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from customgen import kinds
from customgen.cli import main
from customgen.config import find_config, load_config
from customgen.errors import UserError
from customgen.models import load_pipeline
from customgen.train import build_run, finish, prepare_output, train
from customgen.train import loop
from customgen.train import run as run_module
from customgen.train.checkpoint import checkpoints
from customgen.train.schedule import Schedule
from customgen.train.validation import validate
from tests.image_fixtures import make_instance_folder, make_kohya_tree, make_wikiart_tree

ROOT = Path(__file__).resolve().parents[1]
# What `tiny` needs and nothing more: the model, 64 px, two class images made in two steps, fast validation images.
TINY = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "data.min_size=32", "prompt.num_class_images=2",
        "prompt.class_steps=2", "validation.steps=2", "train.checkpoint_every=0"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Each study's settings as issue 23's table states them: what style.json's `training` must show after the run.
STUDIES = {
    "style_lora_plan": ("wikiart", dict(
        lr=1e-4, batch_size=2, grad_accum=1, effective_batch=2, optimizer="adamw", lr_scheduler="cosine",
        warmup_steps=0, rank=4, targets=ATTENTION, loss={"l2": 1.0, "lpips": 0.1, "gram": 0.1, "snr_gamma": 0.0})),
    "style_dreambooth_plan": ("wikiart", dict(
        lr=1e-5, batch_size=1, grad_accum=16, effective_batch=16, optimizer="adamw", scope="attention", prior=True,
        prior_weight=1.0, gradient_checkpointing=True, attention_slicing=True, vae_slicing=True, vae_tiling=True)),
    "style_textual_inversion_plan": ("wikiart", dict(
        lr=5e-5, batch_size=1, grad_accum=4, effective_batch=4, optimizer="adamw", token="sks style", num_vectors=1,
        captions=["{} painting"])),
    "subject_report": ("photos", dict(
        lr=1e-4, text_encoder_lr=5e-6, batch_size=1, grad_accum=4, effective_batch=4, lr_scheduler="constant",
        warmup_steps=0, rank=8, alpha=8.0, targets=ATTENTION, text_encoder_targets=["q_proj", "k_proj", "v_proj",
                                                                                     "out_proj"],
        prior=True, prior_weight=1.0, optimizer="adamw8bit", betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01,
        max_grad_norm=1.0, gradient_checkpointing=True, mixed_precision="fp16", center_crop=True, random_flip=False)),
    "anime_lora_writeup": ("kohya", dict(
        lr=1e-4, batch_size=1, grad_accum=2, effective_batch=2, rank=16, random_flip=False)),
    "subject_pivotal_advanced": ("photos", dict(  # diffusers' advanced README command, Prodigy at 1.0
        lr=1.0, optimizer="prodigy", batch_size=3, grad_accum=1, effective_batch=3, lr_scheduler="constant", warmup_steps=0, rank=8,
        alpha=8.0, targets=ATTENTION, text_encoder=False, prior=False, center_crop=False, random_flip=False,
        gradient_checkpointing=True, weight_decay=1e-4, max_grad_norm=1.0, seed=0,
        loss={"l2": 1.0, "lpips": 0.0, "gram": 0.0, "snr_gamma": 5.0},
        pivotal={"tokens": 2, "trigger": "TOK", "init": "random", "lr": 1.0, "frac": 0.5})),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return {
        "wikiart": [f"data.root={make_wikiart_tree(root / 'wikiart', styles={'Analytical_Cubism': 3}, size=(80, 72))}"],
        "photos": [f"data.root={make_instance_folder(root / 'photos', n=3, size=(72, 72))}"],
        "kohya": [f"data.root={make_kohya_tree(root / 'kohya', folders={'1_myAnimeStyleToken anime_face': 2})}"],
    }


def preset(name, data, *extra):
    return load_config(find_config(name), TINY + data[STUDIES[name][0]] + list(extra))


@pytest.mark.parametrize("name", list(STUDIES))
def test_study_preset_trains_two_steps_with_the_study_settings_in_style_json(name, data, tmp_path, monkeypatch):
    # kohya's epochs: 2 images × 1 repeat at batch 1 are 2 micro-batches, 1 optimizer step at accumulation 2
    steps = "train.epochs=2" if name == "anime_lora_writeup" else "train.steps=2"
    captions, stepping = [], []  # the captions the steps encode (not the fixed prompts cached before the first step)
    real, real_offload = loop.encode_prompts, run_module.offload_unused
    monkeypatch.setattr(loop, "encode_prompts", lambda run, c: (captions.extend(c) if stepping else None) or real(run, c))
    monkeypatch.setattr(run_module, "offload_unused", lambda run: real_offload(run) or stepping.append(True))
    out = train(preset(name, data, steps, "train.log_every=1"), output=tmp_path / name, progress=False)
    manifest = kinds.read_manifest(out)
    settings = manifest.training
    assert {k: settings[k] for k in STUDIES[name][1]} == STUDIES[name][1]
    assert settings["preset"] == name and settings["steps"] == manifest.steps == 2
    assert settings["effective_batch"] == settings["batch_size"] * settings["grad_accum"] * settings["processes"]
    # no bitsandbytes step on a CPU: AdamW, with a notice (8-bit Adam asked or auto); an optimizer named runs as asked
    assert settings["optimizer_used"] == (settings["optimizer"] if settings["optimizer"] == "prodigy" else "adamw")
    assert pd.read_csv(out / "logs" / "loss.csv")["step"].tolist() == [1, 2]
    assert len(captions) == 2 * settings["grad_accum"] * settings["batch_size"] * (2 if settings["prior"] else 1)
    if name == "style_textual_inversion_plan":  # the plan's captions, the token a new two-word token
        assert set(captions) == {"sks style painting"} and manifest.token == "sks style"
        pipe = load_pipeline("tiny", kind="txt2img", device="cpu")  # stock diffusers reads it under that token
        pipe.load_textual_inversion(str(out / manifest.weights), token=manifest.token)
        (token_id,) = pipe.tokenizer("sks style", add_special_tokens=False).input_ids
        learned = load_file(str(out / manifest.weights))["sks style"][0]
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), learned)
    if name == "subject_pivotal_advanced":  # the new tokens in place of the README's trigger, in every caption
        assert set(captions) == {"a photo of <s0><s1> person"} and manifest.tokens == ["<s0>", "<s1>"]
        assert (out / manifest.embeddings).is_file() and manifest.prompt == "a photo of <s0><s1> person"
    if name == "anime_lora_writeup":  # a validation image each epoch with the write-up's prompt
        assert settings["epochs"] == 2 and settings["epoch_steps"] == 1
        assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000001.png", "step-000002.png"]
        assert manifest.prompt == "" and load_config(out / "config.yaml").validation.prompts == [
            "myAnimeStyleToken anime_face girl, high quality"]
    saved = load_config(out / "config.yaml")
    assert saved.train.snapshot_every == {"subject_report": 1000, "anime_lora_writeup": 500}.get(name, 0)
    if manifest.kind == "lora":  # kohya's own names for the schedule, in the WebUI export
        with safe_open(str(out / manifest.exports[0]), "pt") as f:
            meta = f.metadata()
        assert meta["ss_gradient_accumulation_steps"] == str(settings["grad_accum"])
        assert meta["ss_total_batch_size"] == str(settings["effective_batch"])
        assert meta["ss_flip_aug"] == str(settings["random_flip"])
        assert meta["ss_enable_bucket"] == str("buckets" in settings)  # kohya's names for buckets and captions
        assert meta["ss_caption_dropout_rate"] == str(settings["caption_dropout"])
        assert meta["ss_shuffle_caption"] == str(settings["shuffle_caption"])
        if "buckets" in settings:
            info = json.loads(meta["ss_bucket_info"])["buckets"]
            assert [(b["resolution"], b["count"]) for b in info.values()] == [
                (row["bucket"], row["count"]) for row in settings["buckets"]]
            assert meta["ss_min_bucket_reso"] == str(settings["min_bucket"])


def spy_step(monkeypatch, run):
    """Record, at every real optimizer step, the micro-steps run so far, the gradients and whether weights moved."""
    micro, steps = [], []
    real_losses, inner = loop.step_losses, run.optimizer.optimizer
    real_step, trained = inner.step, run.method.trained_params(run.comps)

    def losses(r, step):
        out = real_losses(r, step)
        micro.append((step, float(out["loss"])))
        return out

    def step(*args, **kwargs):
        grads = {k: None if p.grad is None else p.grad.detach().clone() for k, p in trained.items()}
        before = {k: p.detach().clone() for k, p in trained.items()}
        result = real_step(*args, **kwargs)
        moved = any(not torch.equal(before[k], p) for k, p in trained.items())
        steps.append({"micro": len(micro), "grads": grads, "moved": moved})
        return result

    monkeypatch.setattr(loop, "step_losses", losses)
    monkeypatch.setattr(inner, "step", step)
    return micro, steps


def test_accumulation_makes_one_optimizer_step_per_n_micro_batches(data, tmp_path, monkeypatch):
    cfg = load_config(find_config("lora_style"), TINY + data["wikiart"] + [
        "loss.lpips=0", "loss.gram=0", "train.batch_size=1", "train.grad_accum=4", "train.steps=3",
        "train.lr_scheduler=linear", "train.log_every=1", "train.snapshot_every=1", "train.checkpoint_every=2",
        "train.validate_every=2"])
    out = tmp_path / "acc"
    prepare_output(out, resume="never", overwrite=False)
    run = build_run(cfg, out)
    micro, steps = spy_step(monkeypatch, run)
    finish(run, loop.run_loop(run, start=0, progress=False, validate=validate)["seconds"], 0)
    assert [s for s, _ in micro] == list(range(12))  # micro-steps 0..11 ...
    assert [s["micro"] for s in steps] == [4, 8, 12] and all(s["moved"] for s in steps)  # ... one real step per 4
    assert run.lr_scheduler.scheduler.last_epoch == 3  # the LR schedule counts optimizer steps
    log = pd.read_csv(out / "logs" / "loss.csv")
    assert log["step"].tolist() == [1, 2, 3]  # one row per optimizer step, its loss the mean of its micro-batches
    means = [sum(v for _, v in micro[4 * i:4 * i + 4]) / 4 for i in range(3)]
    assert log["loss"].tolist() == pytest.approx(means, abs=1e-6)  # the CSV rounds to 6 decimals
    assert log["lr"].tolist() == pytest.approx([cfg.train.lr * (3 - k) / 3 for k in (1, 2, 3)], rel=1e-6)
    # snapshots, checkpoints and validation images count optimizer steps too; every manifest has the settings
    assert [p.name for p in checkpoints(out)] == ["step-000002"]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png", "step-000003.png"]
    final = kinds.read_manifest(out)
    snaps = [kinds.read_manifest(p) for p in kinds.list_snapshots(out)]
    assert [m.step for m in snaps] == [1, 2] and all(m.training == final.training for m in snaps)
    assert final.training["effective_batch"] == 4 and final.training["grad_accum"] == 4


@pytest.mark.parametrize("recipe,source", [("dreambooth_lora_subject", "photos"), ("textual_inversion", "wikiart")])
def test_batch_one_with_accumulation_four_trains_as_batch_four(recipe, source, data, tmp_path, monkeypatch):
    """The same 4 examples (with their own flips, latent samples, timesteps, noise, templates) in one optimizer step:
    the loss is a mean, so the gradient of 4 micro-batches of 1 (accelerate divides each by 4) is the batch's."""
    common = TINY + data[source] + ["loss.lpips=0", "loss.gram=0", "train.steps=1", "train.max_grad_norm=0",
                                    "train.lr_scheduler=constant", "train.validate_every=0",
                                    f"prompt.class_dir={tmp_path / 'class_images'}"]
    seen = {}
    for split in ("batch_size=1 grad_accum=4", "batch_size=4 grad_accum=1"):
        cfg = load_config(find_config(recipe), common + [f"train.{kv}" for kv in split.split()])
        run = build_run(cfg, tmp_path / split.replace(" ", "-"))
        with monkeypatch.context() as m:
            micro, steps = spy_step(m, run)
            loop.run_loop(run, start=0, progress=False)
        assert len(steps) == 1 and steps[0]["moved"]
        seen[split] = steps[0]["grads"], sum(v for _, v in micro) / len(micro)
    (g1, loss1), (g4, loss4) = seen.values()
    eps = torch.finfo(torch.float32).eps
    assert loss1 == pytest.approx(loss4, rel=64 * eps)
    for k in g4:
        if g4[k] is None:
            assert g1[k] is None
            continue
        # The same sums in another order (per micro-batch, then accumulated): a reordered fp32 sum of n terms moves
        # by at most about n ulps of its magnitude; each entry here sums n = 4 examples × 8 × 8 latent positions.
        n = 4 * (64 // 8) ** 2
        assert (g1[k] - g4[k]).abs().max() <= n * eps * g4[k].abs().max(), k


def flips_seen(run, monkeypatch, micro_steps: int) -> list[bool]:
    """The flip mask the loop passes for the instance images, over `micro_steps` micro-steps, after checking that a
    flipped example's latent is the mirror image of the same example unflipped."""
    masks, real = [], run.images.batch

    def checked(positions, *, flip, generators, **kwargs):
        states = [g.get_state() for g in generators]
        out = real(positions, flip=flip, generators=generators, **kwargs)
        plain = real(positions, flip=torch.zeros_like(flip), generators=[torch.Generator().set_state(s)
                                                                          for s in states], **kwargs)
        expected = torch.where(flip.view(-1, 1, 1, 1), plain["latents"].flip(-1), plain["latents"])
        assert torch.equal(out["latents"], expected)
        masks.extend(flip.tolist())
        return out

    monkeypatch.setattr(run.images, "batch", checked)
    for step in range(micro_steps):
        loop.step_losses(run, step)
    return masks


@pytest.mark.parametrize("recipe,source,flips", [
    ("dreambooth_lora_subject", "photos", False), ("lora_anime_kohya", "kohya", False),
    ("lora_style", "wikiart", True), ("dreambooth_style", "wikiart", True)])
def test_subjects_do_not_flip_and_styles_do(recipe, source, flips, data, tmp_path, monkeypatch):
    cfg = load_config(find_config(recipe), TINY + data[source] + ["loss.lpips=0", "loss.gram=0", "train.batch_size=2"])
    assert cfg.data.random_flip is None  # the recipe leaves it to its target
    run = build_run(cfg, tmp_path / recipe)
    assert run.cfg.data.random_flip is flips  # resolved, as config.yaml and style.json record it
    masks = flips_seen(run, monkeypatch, micro_steps=6)
    assert len(masks) == 12 and (any(masks) and not all(masks) if flips else not any(masks))


def test_a_subject_flips_when_asked(data, tmp_path, monkeypatch):
    cfg = load_config(find_config("dreambooth_lora_subject"), TINY + data["photos"] + ["data.random_flip=true"])
    run = build_run(cfg, tmp_path / "asked")
    assert any(flips_seen(run, monkeypatch, micro_steps=6))


def test_epochs_count_optimizer_steps_as_kohya_does():
    for examples, batch, accum, processes in [(25, 2, 3, 2), (24, 1, 2, 1), (1, 4, 1, 1), (7, 3, 1, 2), (100, 1, 16, 1)]:
        s = Schedule(examples=examples, batch_size=batch, grad_accum=accum, processes=processes, steps=0, epochs=5)
        # train_network.py: max_train_epochs * ceil(len(train_dataloader) / num_processes / gradient_accumulation_steps)
        # where len(train_dataloader) = ceil(images × repeats / batch) for one bucket
        assert s.epoch_steps == math.ceil(math.ceil(examples / batch) / processes / accum)
        assert s.effective_batch == batch * accum * processes


def test_cli_trains_a_preset_by_name_in_epochs_and_max_steps_replaces_them(data, tmp_path, capsys):
    sets = sum((["--set", s] for s in TINY[1:] + data["kohya"] + ["train.epochs=3"]), [])
    assert main(["train", "anime_lora_writeup", "--model", "tiny", "--output", str(tmp_path / "e"), *sets]) == 0
    assert "schedule: 3 epochs × 1 optimizer steps = 3 steps of effective batch 2" in capsys.readouterr().out
    assert kinds.read_manifest(tmp_path / "e").training["epochs"] == 3
    assert main(["train", "anime_lora_writeup", "--model", "tiny", "--output", str(tmp_path / "m"), "--max-steps", "1",
                 *sets]) == 0
    manifest = kinds.read_manifest(tmp_path / "m")
    assert manifest.steps == 1 and "epochs" not in manifest.training
    with pytest.raises(UserError, match="subject_report"):  # the error lists the presets
        find_config("no_such_preset")


def test_memory_helpers_switch_diffusers_slicing_on_and_keep_the_loss(data, tmp_path):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    losses = {}
    for helpers in (False, True):
        switches = [f"train.{k}={str(helpers).lower()}" for k in ("attention_slicing", "vae_slicing", "vae_tiling")]
        cfg = load_config(find_config("lora_style"), TINY + data["wikiart"] + ["loss.lpips=0", "loss.gram=0", *switches])
        run = build_run(cfg, tmp_path / str(helpers))
        processors = run.comps.unet.attn_processors.values()
        assert all(isinstance(p, SlicedAttnProcessor) for p in processors) is helpers
        assert (run.comps.vae.use_slicing, run.comps.vae.use_tiling) == (helpers, helpers)
        losses[helpers] = float(loop.step_losses(run, 0)["loss"])
    # the same attention computed by other kernels (SDPA, sliced baddbmm + softmax): a few fp32 ulps through the UNet
    assert losses[True] == pytest.approx(losses[False], rel=64 * torch.finfo(torch.float32).eps)


def test_style_json_without_training_settings_still_loads(tmp_path):
    manifest = kinds.Manifest(name="old", method="lora_style", kind="lora", base_model="tiny", weights="w.safetensors")
    kinds.write_manifest(tmp_path, manifest)
    data = json.loads((tmp_path / kinds.MANIFEST).read_text())
    del data["training"]  # written before style.json carried it
    (tmp_path / kinds.MANIFEST).write_text(json.dumps(data))
    assert kinds.read_manifest(tmp_path).training == {}
    data["training"] = ["not", "a", "mapping"]
    (tmp_path / kinds.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(UserError, match="training"):
        kinds.read_manifest(tmp_path)


@pytest.mark.parametrize("override,key", [("train.epochs=-1", "train.epochs"), ("train.epochs=2.5", "train.epochs"),
                                          ("train.validate_every_epochs=-1", "train.validate_every_epochs"),
                                          ("train.attention_slicing=3", "train.attention_slicing"),
                                          ("data.random_flip=maybe", "data.random_flip")])
def test_new_keys_refuse_bad_values_naming_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("caption", ["sks style painting", "{} and {}", "{token} painting", "{} painting }"])
def test_a_textual_inversion_caption_holds_the_token_once(caption):
    from customgen.kinds import make_method

    cfg = load_config(find_config("style_textual_inversion_plan"), [f"textual_inversion.caption={caption}"])
    with pytest.raises(UserError, match="textual_inversion.caption"):
        make_method(cfg)
