"""Reliability battery (issue 9, docs/reliability.md): bad inputs and faults across the CLI, configs, checkpoints,
artifacts, evaluation and the demo.

Every case states its input, the exit code and the message it expects. A refused command exits 2 with exactly
one `error: ` line on stderr (the only line when it fails before any progress output; the last line otherwise),
no traceback, and leaves every file of the sandbox outside the command's output as it was (hashed before and
after, tests/reliability_fixtures.py). Most cases call `customgen.cli.main` in-process on the `tiny` model; real
SIGKILLs use subprocesses; the demo is driven through gradio_client and once through headless Chromium.
"""
from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from customgen.cli import main
from customgen.inference import clear_sessions, get_session
from customgen.kinds import KINDS, list_snapshots, lora, read_artifact
from customgen.lock import LOCK_NAME, output_lock
from customgen.train.checkpoint import checkpoints
from tests.reliability_fixtures import (ROOT, Evil, build_inputs, build_library, build_pickled_model, build_runs, cli,
                                        fresh_run, notes, snapshot, train_argv)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    """The sandbox: inputs, a style library with broken variants, a pickled model folder, finished runs."""
    clear_sessions()  # another module's cached session may hold the same TI token
    root = tmp_path_factory.mktemp("sandbox")
    inputs = build_inputs(root)
    lib = build_library(root)
    shutil.copytree(lib / "lora_a", root / "eval_styles" / "lora_a")
    return SimpleNamespace(root=root, lib=lib, model=build_pickled_model(root), runs=build_runs(root), **inputs)


def stylize(sb, *extra, content=None) -> list:
    content = sb.content if content is None else content
    return ["stylize", "--model", "tiny", "--styles", sb.lib, "--content", content, "--steps", "4", "--size", "64",
            "--seed", "1", *extra]


def generate(sb, *extra) -> list:
    return ["generate", "--model", "tiny", "--styles", sb.lib, "--prompt", "a photo", "--steps", "2", "--size", "64",
            "--seed", "1", *extra]


def export(sb, *extra) -> list:
    return ["export", "lora_a", "--styles", sb.lib, "--dtype", "fp32", *extra]


def bench(sb, *extra) -> list:
    return ["bench", "--model", "tiny", "--jobs", "perceptual", "--train-resolution", "64", "--repeats", "1",
            "--no-flops", *extra]


def taken_report(sb) -> Path:
    """A folder holding b.json, as an earlier `customgen bench --name b` leaves it."""
    folder = sb.root / "bench_taken"
    folder.mkdir(exist_ok=True)
    (folder / "b.json").write_text("{}\n")
    return folder


def read_only_folder(sb) -> Path:
    """A folder that refuses new files even to root: /sys (sysfs) when root, else a chmod 555 folder."""
    if os.geteuid() == 0:
        return Path("/sys/customgen-battery")
    folder = sb.root / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return folder / "out"


# --- CLI: sampling inputs refused before any model loads ---------------------------------------------------------
SAMPLING = [  # (case, argv builder, message pattern)
    ("empty --content ''", lambda sb: stylize(sb, content=""), r"empty content path"),
    ("missing content file", lambda sb: stylize(sb, content=sb.root / "nope.png"), r"does not exist"),
    ("content folder without images", lambda sb: stylize(sb, content=sb.root / "empty_folder"), r"holds no images"),
    ("text file as content", lambda sb: stylize(sb, content=sb.bad / "text.png"), r"not_an_image"),
    ("0-byte content", lambda sb: stylize(sb, content=sb.bad / "empty.png"), r"empty \(0 bytes\)"),
    ("truncated content", lambda sb: stylize(sb, content=sb.bad / "truncated.png"), r"truncated"),
    ("--steps 1000000000", lambda sb: stylize(sb, "--steps", "1000000000"), r"steps must be between 1 and 1000,"),
    ("--steps 0", lambda sb: stylize(sb, "--steps", "0"), r"steps must be between 1 and 1000"),
    ("--steps many", lambda sb: stylize(sb, "--steps", "many"), r"invalid int value"),
    ("--size 100000", lambda sb: stylize(sb, "--size", "100000"), r"size must be between 8 and 2048"),
    ("--size 63", lambda sb: stylize(sb, "--size", "63"), r"multiple of 8"),
    ("--seed 2**70", lambda sb: stylize(sb, "--seed", str(2**70)), r"seed must be between 0 and 18446744073709551615"),
    ("--seed -5", lambda sb: stylize(sb, "--seed", "-5"), r"seed must be between 0"),
    ("--strength 1.5", lambda sb: stylize(sb, "--strength", "1.5"), r"strength must be between 0 and 1"),
    ("--stylization nan", lambda sb: stylize(sb, "--stylization", "nan"), r"stylization must be a finite number"),
    ("--guidance 1e9", lambda sb: stylize(sb, "--guidance", "1e9"), r"guidance must be between 0 and 100"),
    ("--scheduler bogus", lambda sb: stylize(sb, "--scheduler", "bogus"), r"invalid choice"),
    ("unknown --style", lambda sb: stylize(sb, "--style", "nosuch"), r"unknown style 'nosuch'"),
    ("--mask not an image", lambda sb: stylize(sb, "--mask", sb.bad / "text.png"), r"not_an_image"),
    ("generate --num-images 1000", lambda sb: ["generate", "--model", "tiny", "--prompt", "x", "--num-images", "1000"],
     r"num_images must be between 1 and 16"),
    ("generate --width 100000", lambda sb: ["generate", "--model", "tiny", "--prompt", "x", "--width", "100000"],
     r"width must be between 8 and 2048"),
    ("generate without a prompt", lambda sb: ["generate", "--model", "tiny", "--styles", sb.lib, "--steps", "2",
                                              "--size", "64"], r"generate needs a prompt"),
    ("--out under a regular file", lambda sb: stylize(sb, "--out", sb.root / "a_file" / "x.png"),
     r"a_file is a file, not a folder; choose another --out"),
    ("--out in a read-only folder", lambda sb: stylize(sb, "--out", read_only_folder(sb) / "x.png"),
     r"refuses new files \(.+\); choose another --out"),
    ("--out an existing file", lambda sb: stylize(sb, "--out", sb.bad / "whole.png"),
     r"already exists; pass --overwrite"),
    ("--out not a .png", lambda sb: stylize(sb, "--out", sb.root / "x.jpg"), r"outputs are written as \.png"),
    ("generate --out under a regular file", lambda sb: generate(sb, "--out", sb.root / "a_file" / "new" / "x.png"),
     r"a_file is a file, not a folder; choose another --out"),
    ("generate --out in a read-only folder", lambda sb: generate(sb, "--out", read_only_folder(sb) / "new" / "x.png"),
     r"refuses new files \(.+\); choose another --out"),
    ("generate --out an existing file", lambda sb: generate(sb, "--out", sb.bad / "whole.png"),
     r"whole.png already exists; pass --overwrite"),
    ("export --out under a regular file", lambda sb: export(sb, "--out", sb.root / "a_file" / "new" / "x.safetensors"),
     r"a_file is a file, not a folder; choose another --out"),
    ("export --out in a read-only folder", lambda sb: export(sb, "--out", read_only_folder(sb) / "x.safetensors"),
     r"refuses new files \(.+\); choose another --out"),
    ("export --out an existing file", lambda sb: export(sb, "--out", sb.lib / "lora_a" / lora.WEIGHTS),
     r"already exists; pass --overwrite"),
    ("export --format diffusers --out an existing folder", lambda sb: export(sb, "--format", "diffusers", "--out",
                                                                             sb.lib / "lora_a"),
     r"lora_a already exists; pass --overwrite"),
    ("bench --out under a regular file", lambda sb: bench(sb, "--out", sb.root / "a_file" / "bench"),
     r"a_file is a file, not a folder; choose another --out"),
    ("bench --out in a read-only folder", lambda sb: bench(sb, "--out", read_only_folder(sb) / "bench"),
     r"refuses new files \(.+\); choose another --out"),
    ("bench --out holding the report already", lambda sb: bench(sb, "--out", taken_report(sb), "--name", "b"),
     r"b.json already exists; pass --overwrite"),
    ("--model missing file", lambda sb: stylize(sb, "--model", sb.root / "nope.safetensors"), r"does not exist"),
    ("data scan --out in a read-only folder", lambda sb: ["data", "scan", sb.root / "data" / "wikiart", "--out",
                                                          read_only_folder(sb) / "scan"],
     r"cannot use .+ \((permission denied|operation not permitted)\); check the path"),
    ("data samples under a regular file", lambda sb: ["data", "samples", sb.root / "a_file" / "samples"],
     r"cannot use .+a_file/samples\S* \(a file stands where a folder is needed\)"),
]


@pytest.mark.parametrize("case,argv,match", SAMPLING, ids=[c[0] for c in SAMPLING])
def test_sampling_input_refused_in_one_line(sb, capfd, case, argv, match):
    """Input: the argv; expected: exit 2, one `error: ` line matching; nothing written (no outputs/ in cwd)."""
    cli(capfd, sb.root, argv(sb), code=2, match=match)


LIMITS = [c for c in SAMPLING if re.search(r"--(steps|size|seed|strength|stylization|guidance|num-images|width) ", c[0])]


@pytest.mark.parametrize("case,argv,match", LIMITS, ids=[c[0] for c in LIMITS])
def test_absurd_numbers_are_refused_before_any_model_loads(sb, capfd, monkeypatch, case, argv, match):
    """Input: the argv with no model able to load; expected: the same one-line refusal (the limits are argument
    checks, so a billion steps never reach a GPU)."""
    from customgen.inference import img2img, txt2img

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (img2img, txt2img):
        monkeypatch.setattr(module, "get_session", no_model)
    cli(capfd, sb.root, argv(sb), code=2, match=match)


def addon(sb, name: str) -> Path:
    """Local add-on files for the refusals below (tests/addon_fixtures.py), written once into the sandbox."""
    from tests.addon_fixtures import Payload, seeded_controlnet, write_controlnet, write_ip_adapter

    folder = sb.root / "addons"
    folder.mkdir(exist_ok=True)
    path = {"sdxl_cn": folder / "sdxl_canny.safetensors", "sdxl_ip": folder / "sdxl_ip" / "models" / "ip-adapter_sd15.bin",
            "evil_cn": folder / "evil.pth", "evil_ip": folder / "evil_ip.bin"}[name]
    if not path.exists():
        if name == "sdxl_cn":
            write_controlnet(path, seeded_controlnet("tiny", cross_attention_dim=2048))
        elif name == "sdxl_ip":
            write_ip_adapter(folder / "sdxl_ip", "tiny", suffix=".bin", width=2048)
        else:  # the payload would write a file into the sandbox: the snapshot check sees it if it ran
            torch.save({"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2), "x": Payload(folder / "ran.txt")}, path)
    return path


ADDONS = [  # (case, argv builder, message pattern): local ControlNet / IP-Adapter files
    ("--controlnet missing file", lambda sb: stylize(sb, "--structure", "canny", "--controlnet", sb.root / "no.pth"),
     r"ControlNet .+no.pth does not exist"),
    ("--controlnet not weights", lambda sb: stylize(sb, "--structure", "canny", "--controlnet", sb.bad / "text.png"),
     r"a ControlNet file must be .safetensors or .pth"),
    ("--controlnet for SDXL", lambda sb: stylize(sb, "--structure", "canny", "--controlnet", addon(sb, "sdxl_cn")),
     r"is a ControlNet for SDXL \(cross-attention width 2048\)"),
    ("--controlnet pickle payload", lambda sb: stylize(sb, "--structure", "canny", "--controlnet", addon(sb, "evil_cn")),
     r"weights-only unpickler refuses"),
    ("--controlnet without --structure", lambda sb: stylize(sb, "--controlnet", addon(sb, "sdxl_cn")),
     r"needs a structure"),
    ("--ip-adapter missing file", lambda sb: stylize(sb, "--style-image", sb.content, "--ip-adapter",
                                                     sb.root / "no.bin"), r"IP-Adapter .+no.bin does not exist"),
    ("--ip-adapter for SDXL", lambda sb: stylize(sb, "--style-image", sb.content, "--ip-adapter", addon(sb, "sdxl_ip")),
     r"is an IP-Adapter for SDXL \(cross-attention width 2048\)"),
    ("--ip-adapter pickle payload", lambda sb: stylize(sb, "--style-image", sb.content, "--ip-adapter",
                                                       addon(sb, "evil_ip")), r"weights-only unpickler refuses"),
    ("--ip-adapter without --style-image", lambda sb: stylize(sb, "--ip-adapter", addon(sb, "sdxl_ip")),
     r"needs a style image"),
    ("--image-encoder without --ip-adapter", lambda sb: stylize(sb, "--image-encoder", sb.root),
     r"only with a local IP-Adapter"),
]


@pytest.mark.parametrize("case,argv,match", ADDONS, ids=[c[0] for c in ADDONS])
def test_bad_local_addon_files_are_refused_before_any_model_loads(sb, capfd, monkeypatch, case, argv, match):
    """Input: a bad --controlnet / --ip-adapter / --image-encoder with no model able to load; expected: exit 2, one
    `error: ` line, nothing written and nothing from a pickle run (a payload would write into the sandbox)."""
    from customgen.inference import img2img

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the add-on files were checked")

    monkeypatch.setattr(img2img, "get_session", no_model)
    cli(capfd, sb.root, argv(sb), code=2, match=match)


MISSING_FOLDERS = [  # (command, argv builder for an --out under folders that do not exist, what it writes there)
    ("stylize", lambda sb, out: stylize(sb, "--style", "lora_a", "--out", out / "x.png"), ["x.png"]),
    ("generate", lambda sb, out: generate(sb, "--style", "lora_a", "--out", out / "x.png"), ["x.png"]),
    ("export", lambda sb, out: export(sb, "--out", out / "db.safetensors"), ["db.safetensors"]),
    ("export diffusers", lambda sb, out: export(sb, "--format", "diffusers", "--out", out / "db"), ["db"]),
    ("bench", lambda sb, out: bench(sb, "--out", out, "--name", "b"), ["b.json", "b.md"]),
]


@pytest.mark.parametrize("case,argv,written", MISSING_FOLDERS, ids=[c[0] for c in MISSING_FOLDERS])
def test_missing_output_folders_are_created(sb, capfd, case, argv, written):
    """Input: --out under three folders that do not exist yet (relative to the working folder, as users type
    `--out exports/db.safetensors`); expected: exit 0, the folders created and the output written there."""
    top = f"new-{case.replace(' ', '-')}"
    cli(capfd, sb.root, argv(sb, Path(top) / "deep" / "folder"), code=0, changes=[sb.root / "cwd" / top])
    out = sb.root / "cwd" / top / "deep" / "folder"
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    if case == "stylize":
        assert Image.open(out / "x.png").size == Image.open(sb.content).size
    if case.startswith("export"):
        assert (out / "db.safetensors").stat().st_size > 0 if case == "export" else (out / "db" / "unet").is_dir()


def test_a_refused_export_leaves_no_new_folder(sb, capfd):
    """Input: export of a Textual Inversion style as a single file (refused after the style is read) to --out under
    folders that do not exist; expected: exit 2, one line, and no folder made for an output never written."""
    argv = ["export", "ti", "--styles", sb.lib, "--out", Path("never") / "made" / "ti.safetensors"]
    cli(capfd, sb.root, argv, code=2, match="cannot be|embedding")
    assert not (sb.root / "cwd" / "never").exists()


def test_bench_overwrite_replaces_an_earlier_report(sb, capfd):
    """Input: bench --name b into a folder holding b.json, with --overwrite; expected: exit 0, b.json replaced by
    this run's report (without --overwrite the same command is refused: SAMPLING)."""
    folder = taken_report(sb)
    cli(capfd, sb.root, bench(sb, "--out", folder, "--name", "b", "--overwrite"), code=0, changes=[folder])
    assert json.loads((folder / "b.json").read_text())["perceptual"][0]["status"] == "ok"


# --- artifacts: adapters checked on load, files kept inside their folder -----------------------------------------
ARTIFACTS = [  # (library style, message pattern)
    ("lora_1d", r"has 1 dimension\(s\) \(\d+,\), a LoRA matrix for this layer has 2"),
    ("lora_int", r"has dtype I32, adapter weights must be floating point"),
    ("lora_bool", r"has dtype BOOL, adapter weights must be floating point"),
    ("lora_nan", r"holds NaN or infinite values"),
    ("lora_inf", r"holds NaN or infinite values"),
    ("lora_ranks", r"LoRA matrices of different ranks \[2, 4\]"),
    ("lora_nokeys", r"holds no LoRA matrices for this model's layers"),
    ("lora_alpha_nan", r"metadata unet.lora_alpha is nan, not a finite number"),
    ("lora_wide", r"has 48 features in the style but 32 in this model"),
    ("lora_truncated", r"is not a readable safetensors file"),
    ("ti_nan", r"holds NaN or infinite values"),
    ("ti_int", r"has dtype I64, adapter weights must be floating point"),
    ("ti_3d", r"has shape \(1, 1, 32\), expected \(n_vectors, 32\)"),
    ("db_nan", r"holds NaN or infinite values"),
    ("db_shape", r"has shape \(\d+, \d+\), this UNet has"),
    ("db_key", r"key no.such.layer.weight is not in this UNet"),
    ("escape_dotdot", r"file '\.\./\.\./outside/stolen/pytorch_lora_weights.safetensors' lies outside the artifact"),
    ("escape_abs", r"lies outside the artifact folder"),
    ("escape_symlink", r"lies outside the artifact folder"),
    ("escape_export", r"stolen/lora_a.safetensors' lies outside the artifact folder"),
    ("weights_null", r"is corrupt: weights is None, expected <class 'str'>"),
    ("weights_nul", r"is not a file name"),
    ("kind_unknown", r"unknown artifact kind 'hypernetwork'"),
    ("manifest_garbage", r"style.json is corrupt \(Expecting property name"),
]


@pytest.mark.parametrize("style,match", ARTIFACTS, ids=[a[0] for a in ARTIFACTS])
def test_broken_artifact_refused_in_one_line(sb, capfd, style, match):
    """Input: stylize with a damaged or escaping style; expected: exit 2, one line naming the problem, never a
    black image; an escaping file is refused before it is opened (the file it names is a valid LoRA)."""
    cli(capfd, sb.root, stylize(sb, "--style", style), code=2, match=match)


@pytest.fixture(scope="module")
def downloads(sb):
    """Files from elsewhere customgen refuses (tests/community_files.py), with the marker a pickle payload would make."""
    from tests.community_files import refused_files

    return refused_files(sb.root / "downloads", get_session("tiny").comps, sb.root / "PAYLOAD_RAN")


FILE_CASES = ["sdxl lora_te1_/lora_te2_", "sdxl 2048-wide", "sd2 1024-wide", "sd3 keys", "flux keys",
              "sdxl embedding (clip_g)", "NaN values", "hypernetwork", "LyCORIS OFT", "no SD1 layer",
              "checkpoint as a style", "truncated", "not safetensors", "not a pickle", "pickle payload"]


@pytest.mark.parametrize("case", FILE_CASES)
@pytest.mark.parametrize("command", ["stylize", "generate", "export", "plan"])
def test_refused_style_file_is_one_line_before_any_model_loads(sb, capfd, monkeypatch, downloads, case, command):
    """Input: --style FILE (export: FILE) of another family, unsafe, damaged or of an unsupported layout, with no
    model able to load; expected: exit 2, one line naming the file and why, nothing run from the file."""
    from customgen import export as export_module
    from customgen.inference import img2img, plan, txt2img

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the file was checked")

    for module in (img2img, txt2img):
        monkeypatch.setattr(module, "get_session", no_model)
    monkeypatch.setattr(export_module, "load_components", no_model)
    monkeypatch.setattr(plan, "load_architecture", no_model)  # not even the weightless architecture
    path, match = downloads[case]
    argv = {"stylize": lambda: stylize(sb, "--style", path), "generate": lambda: generate(sb, "--style", path),
            "export": lambda: ["export", path, "--out", sb.root / "refused_export.safetensors"],
            "plan": lambda: ["plan", "--sample", "stylize", "--model", "tiny", "--style", path]}[command]()
    cli(capfd, sb.root, argv, code=2, match=re.escape(path.name) + ".*" + match, changes=[sb.root / "downloads"])
    assert not (sb.root / "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("style,dtype", [("lora_f16", torch.float16), ("lora_f64", torch.float64)])
def test_other_float_dtypes_are_cast(sb, capfd, style, dtype):
    """Input: a LoRA stored in fp16 / fp64 (the fp32 style's tensors cast); expected: exit 0, its layers hold
    exactly the fp32 style's weights rounded to that dtype, and the fp64 copy (exact) draws the same pixels. The
    fp16 copy is another LoRA (2^-11 apart): its pixels through tiny's random UNet move by a CPU-dependent amount."""
    outs = [sb.root / "cast" / f"{name}.png" for name in (style, "lora_a")]
    for name, out in zip((style, "lora_a"), outs):
        cli(capfd, sb.root, stylize(sb, "--style", name, "--out", out, "--overwrite"), code=0,
            changes=[sb.root / "cast"])
    session = get_session("tiny")
    adapters = {folder.name: name for folder, name in session.state(KINDS["lora"]).adapters.items()}
    layers = lora.lora_layers(session.pipeline("img2img"), adapters["lora_a"])
    assert layers and all(torch.equal(m[adapters[style]].weight, m[adapters["lora_a"]].weight.to(dtype).float())
                          for layer in layers for m in (layer.lora_A, layer.lora_B))
    if dtype == torch.float64:
        assert np.array_equal(*(np.asarray(Image.open(p)) for p in outs))


@pytest.mark.parametrize("decoy,style", [("lora_nan_decoy", "lora_a"), ("ti_nan_decoy", "ti"),
                                         ("db_nan_decoy", "dreambooth")])
def test_the_weights_file_checked_is_the_file_loaded(sb, capfd, decoy, style):
    """Input: a style whose style.json names `clean.safetensors` (the good style's weights) beside a stock-named
    file full of NaN; expected: exit 0 and the good style's pixels (a check of one file and a load of the other
    gave a black image)."""
    outs = [sb.root / "decoy" / f"{name}.png" for name in (decoy, style)]
    for name, out in zip((decoy, style), outs):
        cli(capfd, sb.root, stylize(sb, "--style", name, "--out", out, "--overwrite"), code=0,
            changes=[sb.root / "decoy"])
    assert np.array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))


def test_pickled_model_folder_is_one_line_and_runs_no_code(sb, capfd):
    """Input: --model a diffusers folder whose UNet is a malicious pickled .bin; expected: exit 2, one line naming
    the file, the pickle never executed."""
    cli(capfd, sb.root, stylize(sb, "--model", sb.model), code=2,
        match=r"unet/diffusion_pytorch_model.bin is a pickle that torch's safe loader refuses .*\.safetensors")
    assert not (sb.root / "PWNED").exists()


# --- configs ------------------------------------------------------------------------------------------------
CONFIGS = [  # (--set or extra args, message pattern)
    (["--set", "train.steps=0"], r"config key train.steps must be >= 1 and <= 1000000, got 0"),
    (["--max-steps", "0"], r"config key train.steps must be >= 1"),
    (["--max-steps", "1000000000"], r"config key train.steps must be >= 1 and <= 1000000"),
    (["--set", "data.resolution=100000"], r"config key data.resolution must be >= 8 and <= 2048"),
    (["--set", "data.resolution=63"], r"config key data.resolution must be a multiple of 8"),
    (["--set", "lora.rank=0"], r"config key lora.rank must be >= 1"),
    (["--set", "train.lr=nan"], r"config key train.lr must be > 0 and <= 1, got nan"),
    (["--set", "train.lr=-1"], r"config key train.lr must be > 0"),
    (["--set", f"train.seed={2**70}"], r"config key train.seed must be >= 0 and <= 4294967295"),
    (["--set", "train.batch_size=0"], r"config key train.batch_size must be >= 1"),
    (["--set", "textual_inversion.num_vectors=0"], r"config key textual_inversion.num_vectors must be >= 1"),
    (["--set", "train.nosuch=1"], r"unknown config key train.nosuch"),
    (["--set", "data.resolution=big"], r"config key data.resolution: expected int"),
    (["--set", "loss.noise_offset=2"], r"config key loss.noise_offset must be >= 0 and <= 1, got 2"),
    (["--set", "loss.adaptive_noise_scale=0.05"],
     r"config key loss.adaptive_noise_scale \(0.05\) needs loss.noise_offset > 0"),
    (["--set", "train.optimizer=sgd"], r"config key train.optimizer: 'sgd' is not one of auto, adamw, adamw8bit, prodigy"),
]


@pytest.mark.parametrize("extra,match", CONFIGS, ids=[" ".join(c[0]) for c in CONFIGS])
def test_bad_training_config_refused_before_anything_is_written(sb, capfd, extra, match):
    """Input: train with an absurd or wrong config value; expected: exit 2, one line naming the key, no output
    folder created."""
    cli(capfd, sb.root, train_argv(sb.root, sb.root / "work" / "never", extra=extra), code=2, match=match)


@pytest.mark.parametrize("command", ["train", "plan"])
def test_prodigy_without_its_package_is_one_line_before_any_weight_loads(sb, capfd, monkeypatch, command):
    """Input: train.optimizer=prodigy where prodigyopt is not installed (hidden from imports); expected: exit 2, one
    line saying how to install it; no model architecture or weights loaded, no output folder."""
    import customgen.train.build as build
    import customgen.train.estimate as estimate

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the optimizer was checked")

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` raises ImportError
    for module, name in ((build, "load_components"), (estimate, "load_architecture"), (estimate, "load_components")):
        monkeypatch.setattr(module, name, no_model)
    argv = train_argv(sb.root, sb.root / "work" / "never", "train.optimizer=prodigy")
    if command == "plan":
        argv = ["plan", argv[1], "--model", "tiny", "--set", "train.optimizer=prodigy"]
    cli(capfd, sb.root, argv, code=2,
        match=r"^error: train.optimizer=prodigy needs the prodigyopt package, which is not installed: run "
              r"`pip install prodigyopt`")


# --- checkpoints and resume ---------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def nan_weights(path: Path) -> None:
    save_file({k: v * float("nan") for k, v in load_file(str(path)).items()}, str(path))


def test_resume_named_checkpoint_with_truncated_weights(sb, capfd):
    """Input: --resume CK whose trainable.safetensors is cut in half; expected: exit 2, one line 'is damaged'."""
    out = fresh_run(sb.root, sb.runs["lora"], "truncated")
    truncate(out / "checkpoints" / "step-000004" / "trainable.safetensors")
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", out / "checkpoints" / "step-000004"]), code=2,
        match=r"step-000004 is damaged \(SafetensorError.*; resume from another checkpoint", changes=[out])


def test_resume_auto_falls_back_to_an_older_intact_checkpoint(sb, capfd, recwarn):
    """Input: --resume auto, newest checkpoint truncated; expected: exit 0 with a note, resumed from step 2, the
    weights equal an uninterrupted run's."""
    out = fresh_run(sb.root, sb.runs["lora"], "fallback")
    truncate(out / "checkpoints" / "step-000004" / "optimizer.safetensors")
    r = cli(capfd, sb.root, train_argv(sb.root, out), code=0, changes=[out])
    assert any("step-000004 is damaged" in n and "trying the previous checkpoint" in n for n in notes(recwarn))
    assert "resumed from" in r.out and "at step 2" in r.out
    assert_same_weights(out, sb.runs["lora"])


def test_resume_auto_with_every_checkpoint_damaged(sb, capfd):
    """Input: --resume auto, both checkpoints without state trees; expected: exit 2 'no intact checkpoint'."""
    out = fresh_run(sb.root, sb.runs["lora"], "alldamaged")
    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / "optimizer.safetensors").unlink()
    cli(capfd, sb.root, train_argv(sb.root, out), code=2, changes=[out],
        match=r"no intact checkpoint in .* \(step-000004, step-000002 damaged\); pass --resume never")


@pytest.mark.parametrize("case,damage,match", [
    ("state.json garbage", lambda ck: (ck / "state.json").write_text("{oops"), r"is damaged \(JSONDecodeError"),
    ("trainable missing", lambda ck: (ck / "trainable.safetensors").unlink(), r"is damaged"),
    ("state tree edited", lambda ck: (ck / "state.json").write_text(json.dumps(
        {**json.loads((ck / "state.json").read_text()), "optimizer": {"pickle": "x"}})), r"is damaged \(ValueError"),
    ("NaN weights", lambda ck: nan_weights(ck / "trainable.safetensors"), r"holds NaN or infinite values"),
])
def test_corrupted_checkpoint_refused(sb, capfd, case, damage, match):
    """Input: --resume CK with one file damaged; expected: exit 2, one line, the run folder untouched otherwise."""
    out = fresh_run(sb.root, sb.runs["lora"], "corrupt-" + case.replace(" ", "-"))
    damage(out / "checkpoints" / "step-000004")
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", out / "checkpoints" / "step-000004"]), code=2,
        match=match, changes=[out])


def test_foreign_checkpoint_of_another_rank(sb, capfd):
    """Input: --resume CK written with lora.rank=8 into a rank-4 run; expected: exit 2, one line naming the shape
    and the config difference."""
    ck = sb.runs["rank8"] / "checkpoints" / "step-000004"
    out = sb.root / "work" / "rank"
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", ck]), code=2, changes=[out],
        match=r"of shape \((8, \d+|\d+, 8)\), this run has \((4, \d+|\d+, 4)\) \(it was made with lora.rank: 8 → 4\)")


def test_foreign_checkpoint_of_another_method(sb, capfd):
    """Input: --resume CK of a DreamBooth run into a LoRA run; expected: exit 2, one line 'other trainable tensors'."""
    ck = sb.runs["dreambooth"] / "checkpoints" / "step-000004"
    out = sb.root / "work" / "method"
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", ck]), code=2, changes=[out],
        match=r"holds other trainable tensors than this run .*made with method: 'dreambooth_style' → 'lora_style'")


def test_checkpoint_of_another_config_needs_force(sb, capfd, recwarn):
    """Input: resume a run with train.lr changed; expected: exit 2 naming the key and --resume-force; with
    --resume-force: exit 0 and a note."""
    out = fresh_run(sb.root, sb.runs["lora"], "config")
    cli(capfd, sb.root, train_argv(sb.root, out, "train.lr=5e-05"), code=2, changes=[out],
        match=r"made with another config \(train.lr: 0.0001 → 5e-05\); pass --resume-force")
    cli(capfd, sb.root, train_argv(sb.root, out, "train.lr=5e-05", extra=["--resume-force"]), code=0, changes=[out])
    assert any("forced" in n and "train.lr" in n for n in notes(recwarn))


def test_pickled_optimizer_state_is_never_loaded(sb, capfd):
    """Input: --resume CK holding a malicious optimizer.pt (the pre-safetensors format); expected: exit 2, one
    line saying pickles are never loaded, the pickle never executed."""
    out = fresh_run(sb.root, sb.runs["lora"], "pickle")
    ck = out / "checkpoints" / "step-000004"
    (ck / "optimizer.safetensors").unlink()
    torch.save({"state": Evil(sb.root / "PWNED")}, ck / "optimizer.pt")
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", ck]), code=2, changes=[out],
        match=r"stores its optimizer state as a pickle \(optimizer.pt\), which customgen never loads")
    assert not (sb.root / "PWNED").exists()


@pytest.mark.parametrize("resume,match", [("/no/such/checkpoint", r"no such checkpoint folder"),
                                          ("a_file", r"not a complete checkpoint folder")])
def test_resume_path_that_is_no_checkpoint(sb, capfd, resume, match):
    """Input: --resume a missing path / a regular file; expected: exit 2, one line."""
    path = sb.root / resume if resume == "a_file" else resume
    out = sb.root / "work" / "nockpt"
    cli(capfd, sb.root, train_argv(sb.root, out, extra=["--resume", path]), code=2, match=match, changes=[out])


def test_disk_full_during_the_first_checkpoint(sb, capfd):
    """Input: train under a 64 kB file-size limit (RLIMIT_FSIZE, a disk-full stand-in: the optimizer state is
    larger); expected: exit 2, one last line 'cannot write checkpoint', no .tmp-step-* or step-* folder left."""
    out = sb.root / "work" / "diskfull"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 64_000:
        pytest.skip("the hard file-size limit is already below the test's")
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))
    try:
        cli(capfd, sb.root, train_argv(sb.root, out), code=2, changes=[out], strict=False,
            match=r"cannot write checkpoint .*step-000002 \(file too large.*\); free disk space")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list((out / "checkpoints").iterdir())


def test_output_under_a_file_and_read_only(sb, capfd):
    """Input: train --output under a regular file, then in a read-only folder; expected: exit 2, one line each."""
    for out in (sb.root / "a_file" / "run", read_only_folder(sb) / "run"):
        cli(capfd, sb.root, train_argv(sb.root, out), code=2, match=r"cannot write to output folder .*; choose")


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = (load_file(str(p / lora.WEIGHTS)) for p in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def log_rows(folder: Path) -> list[dict]:
    with (folder / "logs" / "loss.csv").open() as f:
        return list(csv.DictReader(f))


# --- one run per output folder ------------------------------------------------------------------------------
def test_second_train_into_a_locked_folder_is_refused(sb, capfd):
    """Input: train into a folder whose lock another run holds; expected: exit 2, one line naming the holder
    (pid, host), the holder's files untouched."""
    out = fresh_run(sb.root, sb.runs["lora"], "locked")
    with output_lock(out, command="train"):
        cli(capfd, sb.root, train_argv(sb.root, out), code=2,
            match=rf"{out} is in use by another customgen train \(pid {os.getpid()} on .+\); wait for it")
    assert not (out / LOCK_NAME).exists()  # released by its holder


def test_stale_lock_is_taken_over_with_a_note(sb, capfd, recwarn):
    """Input: a lock file left by a run that died (nobody holds its flock); expected: exit 0, a note, the lock
    file removed at the end."""
    out = fresh_run(sb.root, sb.runs["lora"], "stale")
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "command": "train"}))
    cli(capfd, sb.root, train_argv(sb.root, out), code=0, changes=[out])
    assert any("pid 999999999" in n and "taking it over" in n for n in notes(recwarn))
    assert not (out / LOCK_NAME).exists()


# --- evaluation ---------------------------------------------------------------------------------------------
def eval_argv(sb, out: Path, *sets: str) -> list:
    values = {"eval.styles": sb.root / "eval_styles", "eval.content_root": sb.root / "contents",
              "eval.style_root": sb.root / "data" / "wikiart", "eval.output": out, "eval.steps": 2, "eval.size": 64,
              "eval.strength": 0.5, "eval.min_size": 32, "eval.smoke": "true", "eval.max_contents": 2}
    args = ["evaluate", ROOT / "configs" / "eval.yaml", "--model", "tiny"]
    for kv in [f"{k}={v}" for k, v in values.items()] + list(sets):
        args += ["--set", kv]
    return args


@pytest.fixture(scope="module")
def evaluated(sb):
    """A finished evaluation (2 contents × baseline + one LoRA), for the re-run cases to copy."""
    out = sb.root / "evaluated"
    assert main([str(a) for a in eval_argv(sb, out)]) == 0
    return out


def test_evaluate_rerun_regenerates_a_truncated_output(sb, capfd, recwarn, evaluated):
    """Input: re-run an evaluation after one output PNG was cut in half (and another replaced by text); expected:
    exit 0, a note per file, both regenerated pixel-identical, the others reused."""
    out = sb.root / "work" / "eval-truncated"
    shutil.copytree(evaluated, out)
    pngs = sorted((out / "images").rglob("*.png"))
    originals = [np.asarray(Image.open(p)) for p in pngs[:2]]
    truncate(pngs[0])
    pngs[1].write_text("not a png")
    cli(capfd, sb.root, eval_argv(sb, out), code=0, changes=[out])
    assert sum("is unreadable" in n and "generating it again" in n for n in notes(recwarn)) == 2
    assert all(np.array_equal(np.asarray(Image.open(p)), o) for p, o in zip(pngs, originals))
    counts = json.loads((out / "run.json").read_text())["images"]
    assert (counts["generated"], counts["reused"]) == (2, len(pngs) - 2)


@pytest.mark.parametrize("case,sets,match", [
    ("eval.size=100000", ["eval.size=100000"], r"config key eval.size must be >= 8 and <= 2048"),
    ("eval.seed=-1", ["eval.seed=-1"], r"config key eval.seed must be >= 0"),
    ("eval.steps=1000000000", ["eval.steps=1000000000"], r"config key eval.steps must be >= 1 and <= 1000"),
    ("eval.scheduler=bogus", ["eval.scheduler=bogus"], r"unknown scheduler 'bogus'"),
    ("eval.output under a file", ["eval.output={a_file}/results"], r"cannot write to output folder"),
])
def test_bad_evaluation_settings_refused(sb, capfd, case, sets, match):
    """Input: evaluate with an absurd setting or an unwritable output; expected: exit 2, one line, nothing written."""
    sets = [s.format(a_file=sb.root / "a_file") for s in sets]
    cli(capfd, sb.root, eval_argv(sb, sb.root / "work" / "eval-bad", *sets), code=2, match=match)


def test_second_evaluation_into_a_locked_folder_is_refused(sb, capfd):
    """Input: evaluate into a results folder another evaluation holds; expected: exit 2, one line, nothing written."""
    out = sb.root / "work" / "eval-locked"
    with output_lock(out, command="evaluate"):
        cli(capfd, sb.root, eval_argv(sb, out), code=2, match=r"is in use by another customgen evaluate \(pid",
            changes=[out / LOCK_NAME])
    assert list(out.iterdir()) == []


# --- real kills ---------------------------------------------------------------------------------------------
# A subprocess runs the CLI with one function wrapped to stop at a chosen moment (so the kill lands there, not
# somewhere random): it writes a marker file, then sleeps until the test SIGKILLs it.
PAUSED = """
import importlib, sys, time
from pathlib import Path
target = importlib.import_module("{module}")
real, calls = target.{name}, []
def paused(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(str(args[1]))
    if {when}:
        Path(sys.argv[1]).write_text(calls[-1])
        time.sleep(600)
    return result
target.{name} = paused
from customgen.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_paused(sb, argv: list, *, module: str, name: str, when: str) -> tuple[subprocess.Popen, Path]:
    """Start the CLI in a subprocess and wait until it reaches the pause; returns (process, marker)."""
    marker = sb.root.parent / f"{sb.root.name}-{name}-paused"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    script = PAUSED.format(module=module, name=name, when=when)
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker), *map(str, argv)], env=env, cwd=sb.root / "cwd",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the paused run ended early (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    return proc, marker


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def test_kill_during_checkpoint_write_then_concurrent_run_then_resume(sb, capfd, recwarn):
    """Input: SIGKILL while checkpoint step 4 is half written (trainable and optimizer files in .tmp-step-000004,
    no state.json); meanwhile a second train into the same folder. Expected: the second run exits 2 with one line
    naming the first (a run holding the folder); after the kill only step-000002 counts; `--resume auto` takes
    over the stale lock with a note, resumes at step 2, leaves no temporary folder, logs each step once, and ends
    with the weights and losses of an uninterrupted run."""
    out = sb.root / "work" / "killed"
    proc, marker = start_paused(sb, train_argv(sb.root, out), module="customgen.train.checkpoint", name="save_file",
                                when="'.tmp-step-000004' in calls[-1] and calls[-1].endswith('optimizer.safetensors')")
    try:
        cli(capfd, sb.root, train_argv(sb.root, out), code=2, changes=[out],
            match=rf"is in use by another customgen train \(pid {proc.pid} on ")
    finally:
        kill(proc)
    marker.unlink()
    assert [p.name for p in checkpoints(out)] == ["step-000002"] and (out / "checkpoints" / ".tmp-step-000004").is_dir()
    r = cli(capfd, sb.root, train_argv(sb.root, out), code=0, changes=[out])
    assert "resumed from" in r.out and "at step 2" in r.out
    assert any(f"pid {proc.pid}" in n and "taking it over" in n for n in notes(recwarn))
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / LOCK_NAME).exists()
    rows, reference = log_rows(out), log_rows(sb.runs["lora"])
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    assert_same_weights(out, sb.runs["lora"])


SNAPSHOT_SETS = ["train.snapshot_every=1", "train.keep_snapshots=3", "train.checkpoint_every=4",
                 "prompt.num_class_images=2", "prompt.class_steps=2"]  # the subject recipe, snapshots at 1-5


def all_weights(folder: Path) -> list[dict]:
    """The tensors of every weights file of an artifact (main file first, then its exports)."""
    manifest, kind = read_artifact(folder)
    return [load_file(str(folder / name)) for name in kind.files(manifest)]


def test_kill_after_a_snapshot_past_the_last_checkpoint_then_resume(sb, capfd):
    """Input: a subject run (snapshot every step, 3 kept, checkpoint at step 4 of 6) SIGKILLed right after
    snapshot 5 was renamed into place, before the oldest was pruned: snapshots 2-5 on disk, checkpoint 4.
    Expected: `--resume auto` resumes at step 4, re-makes snapshot 5 in its place (a new folder, never a second
    one, no temporary folder left), prunes step 2, and ends with exactly the snapshot folders of an uninterrupted
    run, every weights file (diffusers and kohya) holding the same tensors."""
    sets = [*SNAPSHOT_SETS, f"data.root={sb.root / 'data' / 'wikiart' / 'Cubism'}"]
    whole, out = sb.root / "work" / "snap-whole", sb.root / "work" / "snap-killed"
    cli(capfd, sb.root, train_argv(sb.root, whole, *sets, config="dreambooth_lora_subject"), code=0, changes=[whole])
    argv = train_argv(sb.root, out, *sets, config="dreambooth_lora_subject")
    proc, marker = start_paused(sb, argv, module="customgen.train.artifact", name="write_folder",
                                when="len(calls) == 5")  # snapshot 5 renamed into place
    kill(proc)
    marker.unlink()
    assert [p.name for p in list_snapshots(out)] == [f"step-00000{i}" for i in (2, 3, 4, 5)]
    assert [p.name for p in checkpoints(out)] == ["step-000004"] and not (out / "style.json").exists()
    killed_inode = (out / "snapshots" / "step-000005" / "style.json").stat().st_ino
    r = cli(capfd, sb.root, argv, code=0, changes=[out])
    assert "resumed from" in r.out and "at step 4" in r.out
    names = [p.name for p in list_snapshots(out)]
    assert names == [p.name for p in list_snapshots(whole)] == ["step-000003", "step-000004", "step-000005"]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == names  # no temporary or replaced folder left
    assert (out / "snapshots" / "step-000005" / "style.json").stat().st_ino != killed_inode  # re-made, in place
    for a, b in zip([*list_snapshots(out), out], [*list_snapshots(whole), whole]):
        for x, y in zip(all_weights(a), all_weights(b), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a


def test_kill_during_evaluation_then_rerun(sb, capfd, recwarn, evaluated):
    """Input: SIGKILL an evaluation after its second output image; expected: the re-run exits 0, takes over the
    stale lock with a note, reuses the two images, generates the rest, and its metrics equal an uninterrupted run's."""
    out = sb.root / "work" / "eval-killed"
    proc, marker = start_paused(sb, eval_argv(sb, out), module="customgen.evaluate.generate", name="save_image",
                                when="len(calls) == 2")
    kill(proc)
    marker.unlink()
    assert len(list((out / "images").rglob("*.png"))) == 2 and (out / LOCK_NAME).exists()
    cli(capfd, sb.root, eval_argv(sb, out), code=0, changes=[out])
    assert any("taking it over" in n for n in notes(recwarn))
    counts = json.loads((out / "run.json").read_text())["images"]
    assert (counts["generated"], counts["reused"]) == (2, 2)
    a, b = (pd.read_csv(p / "metrics.csv") for p in (out, evaluated))
    cost = [c for c in a.columns if "seconds" in c or "memory" in c]  # timings differ from run to run
    pd.testing.assert_frame_equal(a.drop(columns=cost), b.drop(columns=cost), check_exact=True)  # same computation


# --- the demo (gradio_client, one case in Chromium) ---------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo(sb):
    """The demo on 127.0.0.1 with the one-LoRA library, and a gradio_client connected to it."""
    from gradio_client import Client

    from customgen.demo import create_app, launch

    app = create_app(model="tiny", styles_dir=sb.root / "eval_styles")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    yield SimpleNamespace(app=app, url=url, client=Client(url, verbose=False))
    app.close()


def uploads(sb) -> Path:
    """Files users upload: broken ones, one over the pixel cap (small on disk), one over the upload size cap."""
    folder = sb.root / "uploads"
    if not folder.exists():
        shutil.copytree(sb.bad, folder)
        Image.new("RGB", (5000, 4000), (10, 20, 30)).save(folder / "huge.png")  # 20 MP, a few kB
        (folder / "big.png").write_bytes(os.urandom(21 * 1024 * 1024))  # 21 MB: over MAX_FILE_SIZE
    return folder


DEMO = [  # (case, stylize inputs from (handle_file, uploads folder, content), message pattern)
    ("non-image content", lambda f, u, c: [f(u / "text.png")], r"^text.png is not an image: upload a PNG, JPEG"),
    ("0-byte content", lambda f, u, c: [f(u / "empty.png")], r"^empty.png is empty \(0 bytes\): upload a PNG"),
    ("truncated content", lambda f, u, c: [f(u / "truncated.png")],
     r"^truncated.png cannot be read as an image \(truncated\): upload another copy"),
    ("content over the pixel cap", lambda f, u, c: [f(u / "huge.png")],
     r"^huge.png has more than 16.8 million pixels, this demo's limit: resize it"),
    ("non-image style image", lambda f, u, c: [f(c), "(none)", f(u / "text.png")], r"^text.png is not an image"),
    ("no content", lambda f, u, c: [None], r"^upload a content image first$"),
    ("steps 1000000000", lambda f, u, c: [f(c), "lora_a", None, "auto", None, 0.5, 1_000_000_000],
     r"^Value 1000000000 is greater than maximum value 50\.$"),
    ("seed 2**70", lambda f, u, c: [f(c), "lora_a", None, "auto", None, 0.5, 4, 2**70],
     r"^Value 1180591620717411303424 is greater than maximum value 18446744073709551615\.$"),
]
DEFAULT_INPUTS = [None, "lora_a", None, "auto", None, 0.5, 4, 1, "none"]


@pytest.mark.parametrize("case,inputs,match", DEMO, ids=[d[0] for d in DEMO])
def test_demo_bad_input_is_one_plain_sentence(sb, demo, case, inputs, match):
    """Input: a stylize call through gradio_client; expected: the app's error is one plain sentence (no "Could not
    preprocess", no traceback), nothing in the sandbox changed."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    given = inputs(handle_file, uploads(sb), sb.content)
    args = given + DEFAULT_INPUTS[len(given):]
    before = snapshot(sb.root)
    with pytest.raises(AppError) as err:
        demo.client.predict(*args, api_name="/stylize")
    message = str(err.value)
    assert re.search(match, message) and "\n" not in message and "preprocess" not in message, message
    assert snapshot(sb.root) == before


def test_demo_refuses_uploads_over_the_size_cap(sb, demo):
    """Input: a 21 MB file posted to the demo's upload endpoint; expected: refused by the server (HTTP 413) with
    the documented 20 MB cap named, before any of our code runs."""
    import httpx

    big = uploads(sb) / "big.png"
    before = snapshot(sb.root)
    with big.open("rb") as f:
        r = httpx.post(demo.url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=120)
    assert r.status_code == 413 and f"maximum allowed size of {20 * 1024 * 1024} bytes" in r.text, (r.status_code,
                                                                                                   r.text[:300])
    assert snapshot(sb.root) == before


def test_demo_good_upload_still_works(sb, demo):
    """Input: a valid photo; expected: a PNG result with the settings (the checks do not get in the way), and no
    file written into the package (Gradio writes .pyi stubs for component subclasses)."""
    from gradio_client import handle_file

    before = snapshot(sb.root)
    result, download, settings = demo.client.predict(handle_file(sb.content), *DEFAULT_INPUTS[1:], api_name="/stylize")
    assert snapshot(sb.root) == before  # the result lives in the demo's own temp folder
    assert Image.open(result).size == Image.open(sb.content).size and settings["styles"][0]["name"] == "lora_a"
    assert not list((ROOT / "src" / "customgen").rglob("*.pyi"))


@pytest.mark.browser
def test_browser_upload_of_a_non_image_shows_one_sentence(sb, demo):
    """Input: in Chromium, upload a text file as the content photo and click Stylize; expected: the page shows the
    plain sentence and never Gradio's "Could not preprocess input component" message."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    text = uploads(sb) / "text.png"  # made before the snapshot: the test also runs alone
    before = snapshot(sb.root)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(demo.url)
            page.locator("#content input[type=file]").set_input_files(str(text))
            page.locator("#stylize").click()  # the content is checked once, by the click (tests/test_demo_browser.py)
            sentence = page.get_by_text("text.png is not an image: upload a PNG, JPEG or WebP photo.")
            sentence.first.wait_for(timeout=30_000)
            assert "Could not preprocess" not in page.content()
        finally:
            browser.close()
    assert snapshot(sb.root) == before


@pytest.mark.parametrize("value,kind", [(float("nan"), "seed box"), (float("nan"), "stylization")])
def test_demo_nan_is_one_sentence(sb, demo, value, kind):
    """Input: NaN in the seed box or the stylization (an API client can send non-JSON floats); expected: one
    sentence (gr.Error), not a ValueError from int(nan)."""
    import gradio as gr

    from customgen.demo import _ui, seed_box, stylize_handler

    box = seed_box()
    before = snapshot(sb.root)
    with pytest.raises(gr.Error) as err:
        if kind == "seed box":
            box.preprocess(value)
        else:
            _ui(stylize_handler)(demo.app.customgen_state, str(sb.content), "lora_a", None, "auto", None, value, 4, 1,
                                 "none")
    expected = {"seed box": r"^The seed must be a whole number from 0 to 18446744073709551615, or -1 for a random "
                            r"one\.$", "stylization": r"^stylization must be a finite number, got nan$"}[kind]
    assert re.match(expected, err.value.message), err.value.message
    assert box.preprocess(7.0) == 7 and snapshot(sb.root) == before
