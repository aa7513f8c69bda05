"""Pivotal tuning on `tiny` (pivotal.tokens: new tokens <s0><s1> trained beside the LoRA, diffusers' advanced
DreamBooth-LoRA script's --train_text_encoder_ti): the embeddings train their share of the steps and then stay, the
other rows never change, bf16 and resume after a kill are exact, the files load in stock diffusers with the prompt
embeddings of customgen's session, the WebUI files read back with the same vectors, and the artifact works in
generate, blends, export, snapshots and subject evaluation; bad settings are one line before any weight loads."""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from customgen import kinds
from customgen.cli import main
from customgen.config import load_config
from customgen.formats import read_adapter
from customgen.inference import clear_sessions, generate, get_session
from customgen.inference.library import StyleLibrary
from customgen.inference.prompts import build_prompt, conditioning
from customgen.kinds import lora
from customgen.memory import MemoryPlan
from customgen.models import load_components, load_pipeline
from customgen.train import build_run, loop, train
from customgen.train.build import place_components
from customgen.train.checkpoint import checkpoints
from customgen.train.schedule import group_steps
from customgen.train.snapshots import OVERHEAD, artifact_bytes
from tests.artifact_fixtures import stock_reads_kohya_text_encoder
from tests.image_fixtures import make_instance_folder, make_wikiart_tree
from tests.interrupt import killed_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "data.min_size=32", "train.batch_size=1",
        "train.checkpoint_every=0", "train.validate_every=0", "validation.steps=2", "validation.num_images=1",
        "prompt.num_class_images=2", "prompt.class_steps=2", "train.log_every=1"]
SUBJECT = ["prompt.instance=a photo of TOK dog", "prompt.class_prompt=a photo of dog", "pivotal.tokens=2",
           "train.lr=0.01", "lora.text_encoder_lr=0.01", "pivotal.lr=0.05", "validation.prompts=[a TOK dog on a beach]"]
TOKENS = ["<s0>", "<s1>"]
RUN = dict(model="tiny", steps=2, seed=0, size=64, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pivotal_data")
    return {"photos": make_instance_folder(root / "photos", n=3, size=(72, 72)), "class": root / "class_images",
            "wikiart": make_wikiart_tree(root / "wikiart", styles={"Cubism": 2}, size=(72, 72))}


def subject_cfg(data, *extra):
    return load_config(ROOT / "configs" / "dreambooth_lora_subject.yaml", TINY + SUBJECT + [
        f"data.root={data['photos']}", f"prompt.class_dir={data['class']}", *extra])


@pytest.fixture(scope="module")
def subject(data, tmp_path_factory):
    """A pivotal subject (text-encoder LoRA on, as the recipe) trained 2 steps, a snapshot after step 1; the
    embeddings train ⌈0.5 × 2⌉ = 1 step."""
    out = tmp_path_factory.mktemp("pivotal") / "tok_dog"
    return train(subject_cfg(data, "train.steps=2", "train.snapshot_every=1", "pivotal.frac=0.5"), output=out,
                 progress=False)


def table(comps) -> torch.Tensor:
    return comps.text_encoder.get_input_embeddings().weight.detach().clone()


# --- training ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frac,steps", [(0.5, 4), (0.3, 10), (0.25, 3), (1.0, 7), (0.01, 2), (0.7, 10)])
def test_the_embeddings_share_of_the_steps_reads_the_fraction_as_written(frac, steps):
    assert group_steps(frac, steps) == math.ceil(Decimal(str(frac)) * steps)  # exact decimal arithmetic


def test_embeddings_train_their_share_then_stay_exactly_and_other_rows_never_change(data, tmp_path):
    """4 steps, frac 0.5: the new rows move in steps 1-2 and never after (the cosine scheduler rewrites every group's
    lr each step), the UNet and text-encoder LoRA keep learning, the base vocabulary's rows never move."""
    cfg = subject_cfg(data, "train.steps=4", "pivotal.frac=0.5", "train.lr_scheduler=cosine", "prompt.prior=false")
    run = build_run(cfg, tmp_path / "r")
    base, lora_params = run.method.pivotal.base, {
        k: p for k, p in run.method.trained_params(run.comps).items() if "lora" in k}
    assert {"unet", "text_encoder"} == {k.split(".")[0] for k in lora_params}
    start, rows, loras = table(run.comps), [], []
    for step in range(cfg.train.steps):
        loop.optimizer_step(run, step)
        now = table(run.comps)
        assert torch.equal(now[:base], start[:base]), f"a base row changed at step {step + 1}"
        rows.append(now[base:])
        loras.append({k: p.detach().clone() for k, p in lora_params.items()})
    moved = [not torch.equal(a, b) for a, b in zip([start[base:]] + rows, rows)]
    assert moved == [True, True, False, False]
    for before, after in zip(loras[1:], loras[2:]):  # steps 3 and 4: every LoRA tensor still learns
        assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert run.method.trainable_count(run.comps) == sum(p.numel() for p in lora_params.values()) + 2 * now.shape[1]


def test_random_and_word_initialisation(data, tmp_path):
    """random: N(0, σ²), σ the base rows' std, from train.seed; a word: token i starts from its token i mod n."""
    run = build_run(subject_cfg(data, "train.steps=1", "prompt.prior=false"), tmp_path / "random")
    base, emb = run.method.pivotal.base, table(run.comps)
    noise = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(run.cfg.train.seed))
    assert torch.equal(emb[base:], noise * emb[:base].std())
    run = build_run(subject_cfg(data, "train.steps=1", "prompt.prior=false", "pivotal.tokens=3", "pivotal.init=ab"),
                    tmp_path / "word")
    emb, ids = table(run.comps), run.comps.tokenizer.encode("ab", add_special_tokens=False)  # byte-level: a, b
    assert len(ids) == 2 and torch.equal(emb[run.method.pivotal.base:], emb[[ids[0], ids[1], ids[0]]])


def test_style_recipe_trains_in_bf16_and_resumes_bit_identically_after_a_kill(data, tmp_path, monkeypatch):
    """The style recipe with pivotal tuning and no text-encoder LoRA, bf16 autocast (the text encoder fp32 around
    its trained table): a run killed at step 3 of 4 resumes from its step-2 checkpoint to the same bytes; the
    embeddings stop after ⌈0.75 × 4⌉ = 3 steps, so the resumed run crosses the switch-off."""
    sets = TINY + [f"data.root={data['wikiart']}", "data.style=Cubism", "loss.lpips=0", "loss.gram=0",
                   "prompt.instance=a painting in the style of TOK", "pivotal.tokens=2", "pivotal.frac=0.75",
                   "train.mixed_precision=bf16", "train.steps=4", "train.checkpoint_every=2", "train.lr=0.01",
                   "pivotal.lr=0.05"]
    cfg = lambda: load_config(ROOT / "configs" / "lora_style.yaml", sets)  # noqa: E731
    whole = train(cfg(), output=tmp_path / "whole", progress=False)
    with killed_at(monkeypatch, 3):
        train(cfg(), output=tmp_path / "cut", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step-000002"]
    resumed = train(cfg(), output=tmp_path / "cut", resume="auto", progress=False)
    m = kinds.read_manifest(whole)
    assert m.training["mixed_precision"] == "bf16" and not m.text_encoder and m.prompt == "a painting in the style " \
        "of <s0><s1>"
    for name in kinds.get_kind(m.kind).files(m):  # the export names (and the bundled word) follow the folder's name
        a, b = ({k.replace(f.name, "NAME"): v for k, v in load_file(str(f / name.replace(whole.name, f.name))).items()}
                for f in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.isfinite(load_file(str(whole / m.embeddings))["clip_l"]).all()


def test_fp16_path_of_a_t4_with_grad_scaler_steps_the_embeddings(data, tmp_path):
    """The T4 recipe on CPU: frozen UNet fp16, the text encoder fp32 (it holds the trained table), trainables fp32,
    fp16 autocast, GradScaler unscale + step; the new rows move, the base rows are restored."""
    cfg = subject_cfg(data, "train.steps=1", "prompt.prior=false")
    run = build_run(cfg, tmp_path / "fp16")
    run.weight_dtype = place_components(cfg, run.comps, run.accelerator, MemoryPlan("fp16", False, "adamw"), run.method)
    assert {p.dtype for p in run.comps.unet.parameters() if not p.requires_grad} == {torch.float16}
    assert {p.dtype for p in run.comps.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in run.method.trained_params(run.comps).values()} == {torch.float32}
    before, base = table(run.comps), run.method.pivotal.base
    optimizer, scaler = run.optimizer.optimizer, torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        losses = loop.step_losses(run, 0)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)  # "Attempting to unscale FP16 gradients." if a trainable were fp16
    scaler.step(optimizer)
    scaler.update()
    run.method.after_step(run.comps)
    after = table(run.comps)
    assert torch.equal(after[:base], before[:base]) and not torch.equal(after[base:], before[base:])


# --- the artifact -----------------------------------------------------------------------------------------------------
def test_artifact_holds_the_lora_and_the_embeddings_as_the_advanced_script_lays_them_out(subject):
    m = kinds.read_manifest(subject)
    assert (m.prompt, m.token, m.tokens) == ("a photo of <s0><s1> dog", "<s0><s1>", TOKENS)
    assert m.embeddings == f"{subject.name}_emb.safetensors" and m.exports == [f"{subject.name}.safetensors"]
    assert kinds.get_kind("lora").files(m) == [lora.WEIGHTS, m.exports[0], m.embeddings]
    vectors = load_file(str(subject / m.embeddings))
    assert list(vectors) == ["clip_l"] and vectors["clip_l"].shape == (2, 32) and vectors["clip_l"].dtype == torch.float32
    assert m.training["pivotal"] == {"tokens": 2, "trigger": "TOK", "init": "random", "lr": 0.05, "frac": 0.5}
    lora_values = sum(v.numel() for v in load_file(str(subject / lora.WEIGHTS)).values())
    assert m.trainable_params == lora_values + 2 * 32  # the LoRA and the two new rows, not the whole table
    captions = (subject / "captions.jsonl").read_text()
    assert "a photo of <s0><s1> dog" in captions and "TOK" not in captions
    (snap,) = kinds.list_snapshots(subject)
    s = kinds.read_manifest(snap)
    cfg, comps = load_config(subject / "config.yaml"), load_components("tiny", device="cpu", dtype=torch.float32)
    estimate = kinds.make_method(cfg).saved_bytes(comps)  # the snapshot disk check: the embedding file counted
    plain = kinds.make_method(replace(cfg, pivotal=replace(cfg.pivotal, tokens=0))).saved_bytes(comps)
    assert estimate - plain == 4 * 2 * 32 and artifact_bytes(snap) <= estimate + OVERHEAD
    assert s.embeddings == f"{snap.parent.parent.name}-{snap.name}_emb.safetensors" and (snap / s.embeddings).is_file()
    # frac 0.5 of 2 steps: the embeddings trained step 1 only, so the snapshot holds the final vectors; the LoRA moved on
    assert torch.equal(load_file(str(snap / s.embeddings))["clip_l"], vectors["clip_l"])
    a, b = (load_file(str(p / lora.WEIGHTS)) for p in (snap, subject))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def stock_pipeline(subject):
    """The artifact through stock diffusers as the advanced script's README loads it (fused, as customgen fuses one
    style)."""
    m = kinds.read_manifest(subject)
    pipe = load_pipeline("tiny", kind="img2img", device="cpu")
    pipe.load_lora_weights(str(subject), weight_name=lora.WEIGHTS)
    state = load_file(str(subject / m.embeddings))
    pipe.load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    return pipe


def test_stock_diffusers_reload_gives_the_prompt_embeddings_of_customgens_session(subject):
    clear_sessions()
    session, style = get_session("tiny", device="cpu"), StyleLibrary().resolve(str(subject))
    specs = [(style, 1.0)]
    session.activate(specs)
    prompt = build_prompt(session, specs, None)
    assert prompt == "a photo of <s0><s1> dog"
    mine = conditioning(session, session.pipeline("img2img"), specs, prompt, "", guidance=1.0)["prompt_embeds"]
    stock = stock_pipeline(subject).encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(mine, stock)
    without = session.pipeline("img2img").encode_prompt("a photo of dog", "cpu", 1, False)[0]
    assert not torch.equal(mine, without)  # the tokens carry the subject


def test_webui_files_read_back_through_customgen_formats_with_the_same_vectors(subject):
    """The embedding file as the WebUI and ComfyUI take it (one embedding, its word the file stem) gives the trained
    vectors; the kohya LoRA file holds LoRA keys only (a bundle_emb key would make stock diffusers refuse the file and
    ComfyUI report it "not loaded"), so stock diffusers still reads it and customgen.formats finds no embedding there."""
    m = kinds.read_manifest(subject)
    vectors = load_file(str(subject / m.embeddings))["clip_l"]
    word = Path(m.embeddings).stem  # the WebUI's trigger word: the file stem, <name>_emb
    emb = read_adapter(subject / m.embeddings)
    assert list(emb.embeddings) == [word] and torch.equal(emb.embeddings[word], vectors) and not emb.deltas
    kohya = read_adapter(subject / m.exports[0])
    with safe_open(str(subject / m.exports[0]), "pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys()) and not kohya.embeddings
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")
    if stock_reads_kohya_text_encoder(pipe.text_encoder):  # not diffusers < 0.42 with transformers >= 5.15
        assert kohya.stock_loadable
        pipe.load_lora_weights(str(subject), weight_name=m.exports[0])
        assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}


def test_generate_blend_and_two_subjects_with_the_same_tokens(subject, tmp_path):
    """The trigger prompt changes the image; a second pivotal subject (other vectors, the same <s0><s1>) loads under
    aliases, so in a session that loaded the first one it gives exactly its image of a fresh session; both blend."""
    other = tmp_path / "other_dog"
    shutil.copytree(subject, other)
    m = kinds.read_manifest(other)
    emb = load_file(str(other / m.embeddings))
    save_file({"clip_l": emb["clip_l"].flip(0) * 2}, str(other / m.embeddings))
    clear_sessions()
    alone = np.asarray(generate(None, [str(other)], **RUN))
    clear_sessions()
    base = np.asarray(generate("a photo of <s0><s1> dog", None, **RUN))
    first = np.asarray(generate(None, [str(subject)], **RUN))
    second = np.asarray(generate(None, [str(other)], **RUN))
    assert np.array_equal(second, alone) and not np.array_equal(first, second) and not np.array_equal(first, base)
    session = get_session("tiny", device="cpu")
    specs = [(StyleLibrary().resolve(str(p)), 0.5) for p in (subject, other)]
    assert build_prompt(session, specs, None) == "a photo of <s0><s1> dog, a photo of <s0-1><s1-1> dog"
    blended = np.asarray(generate(None, [str(subject), str(other)], scales=[0.5, 0.5], **RUN))
    assert np.isfinite(blended).all() and not np.array_equal(blended, first)
    off = np.asarray(generate("a photo of <s0><s1> dog", [str(subject)], scales=[0.0], **RUN))
    assert np.array_equal(off, np.asarray(generate("a photo of dog", None, **RUN)))  # scale 0: the base model


def test_export_diffusers_carries_the_tokens_and_single_file_refuses_in_one_line(subject, tmp_path, capsys):
    from customgen.export import export
    from diffusers import StableDiffusionPipeline

    out = export(str(subject), tmp_path / "folder", fmt="diffusers", model="tiny", dtype="fp32")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert all(t in pipe.tokenizer.get_vocab() for t in TOKENS)
    prompt = "a photo of <s0><s1> dog"
    assert torch.equal(pipe.encode_prompt(prompt, "cpu", 1, False)[0],
                       stock_pipeline(subject).encode_prompt(prompt, "cpu", 1, False)[0])
    capsys.readouterr()
    assert main(["export", str(subject), "--model", "tiny", "--format", "single-file", "--out",
                 str(tmp_path / "one.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "single-file" in err[0] and "diffusers" in err[0]


def test_evaluate_scores_the_subject_and_its_snapshot_with_its_tokens(subject, tmp_path, monkeypatch):
    import customgen.inference.txt2img as txt2img
    import pandas as pd

    prompts, real = [], txt2img.generate
    monkeypatch.setattr(txt2img, "generate", lambda p=None, s=None, r=None, **kw: prompts.append(p) or real(p, s, r, **kw))
    library = tmp_path / "library"
    shutil.copytree(subject, library / subject.name)
    sets = [f"eval.styles={library}", f"eval.output={tmp_path / 'results'}", "eval.steps=2", "eval.size=64",
            "eval.smoke=true", "eval.samples_per_prompt=2", "eval.min_size=32",
            'eval.prompts=["a {token} {noun} on the beach"]']
    assert main(["evaluate", "configs/eval_subject.yaml", "--model", "tiny",
                 *[a for kv in sets for a in ("--set", kv)]]) == 0
    rows = pd.read_csv(tmp_path / "results" / "subject_metrics.csv")
    assert list(zip(rows["model"], rows["step"])) == [("baseline", 0), (subject.name, 1), (subject.name, 2)]
    assert set(prompts) == {"a <s0><s1> dog on the beach", "a photo of dog"}


# --- bad settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets,says", [
    (["prompt.instance=a photo of sks dog"], "pivotal.trigger 'TOK' is not a word of prompt.instance"),
    (["prompt.instance=a photo of TOKYO"], "pivotal.trigger 'TOK' is not a word"),
    (["pivotal.trigger= "], "pivotal.trigger"),
    (["pivotal.init=<|endoftext|>"], "pivotal.init"),
    (["pivotal.init= "], "pivotal.init"),
    (["pivotal.frac=0"], "pivotal.frac must be > 0 and <= 1"),
    (["pivotal.frac=1.5"], "pivotal.frac must be > 0 and <= 1"),
    (["pivotal.lr=0"], "pivotal.lr must be > 0"),
    (["pivotal.lr=-1"], "pivotal.lr must be > 0"),
    (["pivotal.tokens=76"], "pivotal.tokens"),
    (["method=textual_inversion"], "pivotal tuning"),
])
def test_bad_settings_are_one_line_and_exit_2_before_any_weight_loads(sets, says, data, tmp_path, capsys,
                                                                      monkeypatch):
    import customgen.train.build as build

    monkeypatch.setattr(build, "load_components", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    args = ["train", str(ROOT / "configs" / "dreambooth_lora_subject.yaml"), "--model", "tiny", "--output",
            str(tmp_path / "bad")]
    for kv in TINY[1:] + SUBJECT + [f"data.root={data['photos']}"] + sets:
        args += ["--set", kv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
