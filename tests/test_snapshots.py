"""Snapshots (train.snapshot_every): whole artifacts at earlier steps under <artifact>/snapshots/step-NNNNNN, on
`tiny`. Each holds what the final artifact holds (stock files, the kohya/WebUI export, config.yaml, style.json with
its `step`) and equals a run stopped at that step bit for bit (resume determinism: every random draw is a function
of (seed, step)); it loads through stock diffusers and customgen's own stylize/generate; the disk check refuses,
before any step, snapshots the output disk cannot hold. The SIGKILL + `--resume auto` case is in
tests/test_reliability.py."""
from __future__ import annotations

import errno
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from customgen import kinds
from customgen.cli import main
from customgen.config import load_config
from customgen.errors import Notice, UserError
from customgen.inference import StyleLibrary, clear_sessions, generate
from customgen.kinds import lora
from customgen.models import load_components, load_pipeline
from customgen.train import loop, prepare_output, train
from customgen.train import artifact
from customgen.train import snapshots
from customgen.train.checkpoint import checkpoints
from tests.image_fixtures import make_instance_folder, make_wikiart_tree
from tests.interrupt import killed_at

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "data.min_size=32", "train.batch_size=1",
         "validation.steps=2", "validation.num_images=1", "prompt.num_class_images=2", "prompt.class_steps=2",
         "train.checkpoint_every=0", "train.validate_every=0", "loss.lpips=0", "loss.gram=0", "train.log_every=1",
         "train.lr_scheduler=constant",  # the LR of step N does not depend on train.steps: a shorter run is a reference
         "train.lr=0.02", "lora.text_encoder_lr=0.02"]  # weights move visibly in a few steps
PHOTOS_RECIPES = ("dreambooth_lora_subject",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapdata")
    return {"wikiart": make_wikiart_tree(root / "wikiart", styles={"Cubism": 3}, size=(80, 72)),
            "photos": make_instance_folder(root / "photos", n=3, size=(72, 72)), "classes": root / "classes"}


def cfg_for(recipe: str, data, *extra):
    source = [f"data.root={data['photos']}"] if recipe in PHOTOS_RECIPES else [
        f"data.root={data['wikiart']}", "data.style=Cubism"]
    shared = [f"prompt.class_dir={data['classes'] / recipe}"]  # class images made once per recipe (base model)
    return load_config(ROOT / "configs" / f"{recipe}.yaml", SMALL + source + shared + list(extra))


def weights(folder: Path) -> dict[str, dict]:
    """Every weights file of an artifact (main file and exports), by its role: 'main', 'export0', ..."""
    manifest, kind = kinds.read_artifact(folder)
    files = kind.files(manifest)
    return {("main" if i == 0 else f"export{i - 1}"): load_file(str(folder / f)) for i, f in enumerate(files)}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def render(pipe, prompt: str) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=3.0, generator=g,
                output_type="np").images[0]


def stock(folder: Path) -> np.ndarray:
    """The artifact applied by the stock diffusers way of its kind to a fresh pipeline, rendered."""
    style = namedtuple("Style", "folder manifest")(folder, kinds.read_manifest(folder))
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")
    kinds.get_kind(style.manifest.kind).load_stock(pipe, style, next(iter(kinds.get_kind(style.manifest.kind)
                                                                          .stock_variants())))
    return render(pipe, style.manifest.prompt)


Trained = namedtuple("Trained", "long short")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """recipe → (a 3-step run with snapshot_every=1, a 2-step run): snapshot 2 of the first must equal the second."""
    root, made = tmp_path_factory.mktemp("snapruns"), {}

    def get(recipe: str) -> Trained:
        if recipe not in made:
            long = train(cfg_for(recipe, data, "train.steps=3", "train.snapshot_every=1"), output=root / recipe,
                         progress=False)
            short = train(cfg_for(recipe, data, "train.steps=2"), output=root / f"{recipe}-2", progress=False)
            made[recipe] = Trained(long, short)
        return made[recipe]
    return get


@pytest.mark.parametrize("recipe", ["dreambooth_lora_subject", "dreambooth_style", "textual_inversion"])
def test_snapshot_equals_a_run_stopped_at_its_step_and_loads_through_stock_diffusers(runs, recipe):
    long, short = runs(recipe)
    snaps = kinds.list_snapshots(long)
    assert [p.name for p in snaps] == ["step-000001", "step-000002"]  # not step 3: the final artifact is step 3
    assert same_tensors(weights(snaps[1])["main"], weights(short)["main"])  # bit for bit
    assert not same_tensors(weights(snaps[0])["main"], weights(snaps[1])["main"])
    assert not same_tensors(weights(snaps[1])["main"], weights(long)["main"])
    for role, tensors in weights(snaps[1]).items():  # the exports for other tools too
        assert same_tensors(tensors, weights(short)[role]), role
    assert np.array_equal(stock(snaps[1]), stock(short))
    assert not np.array_equal(stock(snaps[1]), stock(long))


def test_snapshot_manifest_holds_the_final_artifacts_fields_with_its_step(runs):
    long, _ = runs("dreambooth_lora_subject")
    snap = kinds.snapshot_folder(long, 2)
    final, mine = kinds.read_manifest(long), kinds.read_manifest(snap)
    assert (final.step, final.steps, mine.step, mine.steps) == (3, 3, 2, 3)
    volatile = {"name", "step", "exports", "file_bytes", "train_seconds", "peak_memory_bytes", "created"}
    a, b = ({k: v for k, v in vars(m).items() if k not in volatile} for m in (final, mine))
    assert a == b and mine.config_hash == final.config_hash and mine.text_encoder
    assert mine.name == f"{long.name}-step-000002" and mine.exports == [f"{long.name}-step-000002.safetensors"]
    assert mine.file_bytes == (snap / lora.WEIGHTS).stat().st_size
    assert load_config(snap / "config.yaml") == load_config(long / "config.yaml")
    with safe_open(str(snap / mine.exports[0]), "pt") as f:  # kohya's own fields: trained steps, of how many
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_output_name"]) == ("2", "3", mine.name)
    assert not (snap / "samples").exists() and not (snap / "checkpoints").exists()


def test_subject_snapshot_loads_through_stock_load_lora_weights_and_customgen(runs, data, tmp_path, capfd):
    long, short = runs("dreambooth_lora_subject")
    snap = kinds.snapshot_folder(long, 2)
    prompt = kinds.read_manifest(long).prompt
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")  # a fresh stock StableDiffusionPipeline
    pipe.load_lora_weights(str(snap), weight_name=lora.WEIGHTS)
    reference = load_pipeline("tiny", kind="txt2img", device="cpu")
    reference.load_lora_weights(str(short), weight_name=lora.WEIGHTS)
    assert np.array_equal(render(pipe, prompt), render(reference, prompt))
    # customgen's own inference: a snapshot is an artifact named by its path
    clear_sessions()
    settings = dict(model="tiny", steps=2, seed=0, size=64, device="cpu")
    ours = np.asarray(generate(prompt, [str(snap)], **settings))
    assert np.array_equal(ours, np.asarray(generate(prompt, [str(short)], **settings)))
    assert not np.array_equal(ours, np.asarray(generate(prompt, [str(long)], **settings)))
    clear_sessions()
    capfd.readouterr()
    for command in (["generate", "--prompt", prompt], ["stylize", "--content", str(data["photos"] / "photo_0.png")]):
        out = tmp_path / f"{command[0]}.png"
        assert main([*command, "--model", "tiny", "--style", str(snap), "--steps", "2", "--size", "64",
                     "--out", str(out)]) == 0, capfd.readouterr().err
        assert out.is_file()
    clear_sessions()
    # the style library lists the artifact, never its snapshots (they are reached by path)
    library = StyleLibrary(long.parent)
    assert "step-000002" not in library.names() and long.name in library.names()
    assert library.resolve(str(snap)).manifest.step == 2


def test_each_snapshot_is_printed_with_its_size_and_keep_snapshots_prunes_the_oldest(data, tmp_path, capsys):
    out = train(cfg_for("lora_style", data, "train.steps=5", "train.snapshot_every=1", "train.keep_snapshots=2"),
                output=tmp_path / "keep", progress=False)
    assert [p.name for p in kinds.list_snapshots(out)] == ["step-000003", "step-000004"]
    assert not [p for p in (out / kinds.SNAPSHOTS).iterdir() if p.name.startswith(".")]  # no temporary folders
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("snapshot ")]
    assert len(lines) == 4  # one per snapshot written (steps 1-4), pruned ones included
    for step, line in zip(range(1, 5), lines):
        match = re.fullmatch(rf"snapshot step {step}: (\S+) \((.+)\)", line)
        assert match and Path(match[1]) == kinds.snapshot_folder(out, step), line
        if step >= 3:  # the kept ones: the size printed is the folder's
            assert match[2] == snapshots.human_bytes(snapshots.artifact_bytes(Path(match[1])))


def test_the_disk_check_estimates_every_kind_from_its_shapes(runs):
    """The estimate the disk check uses: the trained tensors' bytes (from the base model's shapes, before any
    adapter exists) × the files the kind writes, plus a fixed allowance; it matches what a snapshot holds."""
    for recipe in ("dreambooth_lora_subject", "dreambooth_style", "textual_inversion"):
        long, _ = runs(recipe)
        snap = kinds.snapshot_folder(long, 1)
        manifest, kind = kinds.read_artifact(snap)
        method = kinds.make_method(load_config(long / "config.yaml"))
        estimate = method.saved_bytes(load_components("tiny", device="cpu", dtype=torch.float32))
        with safe_open(str(snap / manifest.weights), "pt") as f:
            main_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert estimate == main_bytes * len(kind.files(manifest)), recipe
        assert snapshots.artifact_bytes(snap) <= estimate + snapshots.OVERHEAD, recipe


Usage = namedtuple("Usage", "total used free")  # what shutil.disk_usage returns


class Disk:
    """shutil.disk_usage of a disk with `free` bytes left; records the paths asked about."""

    def __init__(self, free: int):
        self.free, self.asked = free, []

    def __call__(self, path):
        self.asked.append(Path(path))
        return Usage(10 * self.free, 9 * self.free, self.free)


def test_snapshots_that_would_not_fit_are_refused_before_anything_is_made(data, tmp_path, monkeypatch, capsys):
    cfg = cfg_for("dreambooth_lora_subject", data, "train.steps=10", "train.snapshot_every=2",
                  f"prompt.class_dir={tmp_path / 'cls'}")
    method = kinds.make_method(cfg)
    per = method.saved_bytes(load_components("tiny", device="cpu", dtype=torch.float32)) + snapshots.OVERHEAD
    disk = Disk(3 * per)  # room for 2 snapshots and the final artifact; the setting keeps 4 (steps 2, 4, 6, 8)
    monkeypatch.setattr(snapshots.shutil, "disk_usage", disk)
    monkeypatch.setattr(loop, "optimizer_step", lambda *a: pytest.fail("a step ran before the disk check"))
    out = tmp_path / "new" / "art"  # the folder's parent does not exist yet
    with pytest.raises(UserError) as err:
        train(cfg, output=out, progress=False)
    message = str(err.value)
    assert "\n" not in message and disk.asked and out.is_relative_to(disk.asked[0])
    assert f"4 snapshots of about {snapshots.human_bytes(per)} each" in message
    assert f"{snapshots.human_bytes(5 * per)} needed" in message and f"{snapshots.human_bytes(3 * per)} free" in message
    assert "raise train.snapshot_every" in message and "train.keep_snapshots=2" in message
    assert not (tmp_path / "cls").exists()  # refused before the class images were generated
    # what the message proposes fits; the plan is printed
    monkeypatch.undo()
    monkeypatch.setattr(snapshots.shutil, "disk_usage", disk)
    capsys.readouterr()
    done = train(cfg_for("dreambooth_lora_subject", data, "train.steps=10", "train.snapshot_every=2",
                         "train.keep_snapshots=2"), output=out, progress=False)
    assert [p.name for p in kinds.list_snapshots(done)] == ["step-000006", "step-000008"]
    assert re.search(r"snapshots: every 2 steps, 2 kept, about .+ each", capsys.readouterr().out)


def test_cli_refuses_snapshots_without_room_in_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(snapshots.shutil, "disk_usage", Disk(1000))
    args = ["train", str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", "--output", str(tmp_path / "cli")]
    for s in SMALL[1:] + [f"data.root={data['wikiart']}", "data.style=Cubism", "train.steps=4",
                          "train.snapshot_every=1"]:
        args += ["--set", s]
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error: train.snapshot_every=1 keeps 3 snapshots") and "Traceback" not in "".join(err)
    assert main(args + ["--set", "train.snapshot_every=0"]) == 0  # no snapshots, no check


def test_overwrite_clears_snapshots_and_snapshot_keys_do_not_block_resume(data, tmp_path):
    out = tmp_path / "o"
    train(cfg_for("lora_style", data, "train.steps=2", "train.snapshot_every=1"), output=out, progress=False)
    assert kinds.list_snapshots(out)
    prepare_output(out, resume="never", overwrite=True)
    assert not (out / kinds.SNAPSHOTS).exists()
    from customgen.train.checkpoint import config_differences
    from customgen.config import to_dict

    a = to_dict(cfg_for("lora_style", data, "train.snapshot_every=1", "train.keep_snapshots=3"))
    b = to_dict(cfg_for("lora_style", data, "train.snapshot_every=5"))
    assert config_differences(a, b) == []


def test_resume_keeps_snapshots_of_the_same_run_and_drops_those_of_another_config(data, tmp_path, monkeypatch, recwarn):
    """Killed at step 4 (snapshots 1-3 written, checkpoint 2): resumed with the same config, snapshot 3 is re-made
    identically; resumed with a forced shorter run (train.steps=3), snapshot 3 is another run's and goes."""
    extra = ("train.steps=5", "train.snapshot_every=1", "train.checkpoint_every=2")
    whole = train(cfg_for("lora_style", data, *extra), output=tmp_path / "whole", progress=False)
    for name in ("same", "forced"):
        with killed_at(monkeypatch, 3):  # the 4th optimizer step
            train(cfg_for("lora_style", data, *extra), output=tmp_path / name, progress=False)
        assert [p.name for p in kinds.list_snapshots(tmp_path / name)] == [f"step-00000{i}" for i in (1, 2, 3)]
        assert [p.name for p in checkpoints(tmp_path / name)] == ["step-000002"]
    train(cfg_for("lora_style", data, *extra), output=tmp_path / "same", progress=False)
    assert [p.name for p in kinds.list_snapshots(tmp_path / "same")] == [p.name for p in kinds.list_snapshots(whole)]
    for a, b in zip(kinds.list_snapshots(tmp_path / "same"), kinds.list_snapshots(whole)):
        assert all(same_tensors(x, y) for x, y in zip(weights(a).values(), weights(b).values()))
    assert not any("snapshot" in str(w.message) for w in recwarn if w.category is Notice)
    train(cfg_for("lora_style", data, *extra[1:], "train.steps=3"), output=tmp_path / "forced", progress=False,
          resume_force=True)
    assert [p.name for p in kinds.list_snapshots(tmp_path / "forced")] == ["step-000001", "step-000002"]
    assert any("step-000003" in str(w.message) and "another config" in str(w.message)
               for w in recwarn if w.category is Notice)


def test_a_snapshot_is_on_disk_before_the_checkpoint_of_its_step(data, tmp_path, monkeypatch):
    """A run killed right after checkpoint N resumes at step N + 1 and never makes snapshot N again: it must be
    complete before that checkpoint is written."""
    seen, real = {}, loop.checkpoint

    def spy(run, step):
        seen[step] = [p.name for p in kinds.list_snapshots(run.out)]
        return real(run, step)

    monkeypatch.setattr(loop, "checkpoint", spy)
    train(cfg_for("lora_style", data, "train.steps=5", "train.snapshot_every=2", "train.checkpoint_every=2"),
          output=tmp_path / "order", progress=False)
    assert seen == {2: ["step-000002"], 4: ["step-000002", "step-000004"]}


def test_a_failed_snapshot_write_removes_its_temporary_folder_and_says_so(data, tmp_path, monkeypatch):
    cfg = cfg_for("lora_style", data, "train.steps=3", "train.snapshot_every=1")
    def disk_full(config, path):  # the weights are written, then the disk is full
        Path(path).write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "save_config", disk_full)
    with pytest.raises(UserError, match=r"cannot write snapshot .*step-000001 \(no space left on the device\); "):
        train(cfg, output=tmp_path / "full", progress=False)
    assert not list((tmp_path / "full" / kinds.SNAPSHOTS).iterdir())  # neither a snapshot nor its temporary folder
