"""CLI conventions: exit 0/2/1, one-line errors without tracebacks, --debug tracebacks."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from customgen.cli import main


def run_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "customgen", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def test_inspect_sd15_random_json_reports_exact_counts():
    r = run_cli("inspect", "sd15-random", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["unet"]["total"] == 859_520_964
    assert report["vae"]["total"] == 83_653_863
    assert report["text_encoder"]["total"] == 123_060_480
    assert report["unet"]["lora"] == 797_184  # rank 4 on to_q/to_k/to_v/to_out.0


def test_inspect_hub_offline_is_one_actionable_line():
    r = run_cli("inspect", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Internet" in lines[0]
    assert "Traceback" not in r.stderr


def test_inspect_text_output(capsys):
    assert main(["inspect", "tiny", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and "LoRA rank 8" in out


@pytest.mark.parametrize("argv", [["bogus"], ["inspect"], ["inspect", "/no/such/file.safetensors"],
                                  ["inspect", "tiny", "--rank", "x"], []])
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_unexpected_failure_exits_1_and_debug_shows_traceback(monkeypatch, capsys):
    import customgen.models.inspect as insp

    monkeypatch.setattr(insp, "inspect_components", lambda *a, **k: 1 / 0)
    assert main(["inspect", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "Traceback" not in err and "--debug" in err
    assert main(["--debug", "inspect", "tiny"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_data_samples_writes_a_scannable_dataset(tmp_path, capsys):
    from customgen.data import scan_images

    assert main(["data", "samples", str(tmp_path / "s")]) == 0
    wikiart = scan_images(tmp_path / "s" / "wikiart", layout="wikiart")  # default min size: big enough
    assert wikiart.counts() == {"Dots": 8, "Stripes": 8, "Waves": 8} and not wikiart.skipped
    assert len(scan_images(tmp_path / "s" / "coco" / "val2017", layout="coco").records) == 6
    capsys.readouterr()
    assert main(["data", "samples", str(tmp_path / "s")]) == 2  # not empty: no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_smoke_flag_applies_the_smoke_overrides():
    from customgen.cli import build_parser, load_cli_config

    from customgen.config import find_config

    args = build_parser().parse_args(["train", str(find_config("lora_style")), "--smoke", "--set", "train.steps=5"])
    cfg = load_cli_config(args)
    assert cfg.data.resolution == 64 and cfg.train.steps == 5  # --set wins over --smoke


# --- `plan` makes no network request; `--json` writes the document alone ------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
RECIPES = [p for p in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "studies").glob("*.yaml"))
           if "\nmethod:" in "\n" + p.read_text()]  # the training recipes and study presets (eval configs plan nothing)
TINY_PLAN = ["--model", "tiny", "--gpu", "t4", "--set", "data.resolution=64", "--set", "data.min_bucket=64", "--set",
             "eval.size=64"]
# What a library that downloads prints, on stdout, as torch.hub.download_url_to_file does (torch/hub.py)
DOWNLOADING = 'Downloading: "https://download.pytorch.org/models/vgg16-397923af.pth" to {}\n'


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every socket connection fails and is recorded; the torch hub cache is empty and no offline flag is set, so
    code that would download tries to (what a Kaggle session with Internet on meets)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network guard: no connection allowed in this test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return attempts


@pytest.mark.parametrize("config", RECIPES, ids=[p.stem for p in RECIPES])
def test_plan_of_every_recipe_makes_no_network_request(config, no_network, capfd):
    """Style recipes build LPIPS and Gram networks (VGG behind torch.hub): the plan builds them without weights."""
    assert main(["plan", str(config), *TINY_PLAN, "--json"]) == 0
    out = capfd.readouterr().out
    assert json.loads(out)["method"] and no_network == []
    assert not list(Path(os.environ["TORCH_HOME"]).glob("**/*.pth"))


def test_the_default_models_architecture_needs_no_network(no_network):
    """The recipes' model (the SD v1.5 Hub id) is planned from the shipped configs, offline or not."""
    from customgen.request import DEFAULT_MODEL
    from customgen.models.loading import load_architecture

    comps = load_architecture(DEFAULT_MODEL)
    assert comps.unet.device.type == "meta" and no_network == []


def test_a_sampling_plan_of_the_default_model_makes_no_network_request(no_network, capfd):
    """`customgen plan --sample` of SD v1.5 (the Hub id, from the shipped configs) on a T4: no connection tried."""
    assert main(["plan", "--sample", "generate", "--size", "512", "--batch", "2", "--gpu", "t4", "--json"]) == 0
    rep = json.loads(capfd.readouterr().out)
    assert rep["fits"] and rep["dtype"] == "float16" and no_network == []


@pytest.mark.parametrize("network", ["reachable", "unreachable"])
@pytest.mark.parametrize("command", ["plan", "plan --sample", "inspect", "inspect FILE"])
def test_json_stdout_is_the_document_alone_whatever_a_library_prints(command, network, no_network, monkeypatch,
                                                                      capfd, tmp_path):
    """A library writing to stdout while the command works (torch.hub's `Downloading:` line through print, and a
    write to file descriptor 1 as C code or a child process makes) lands on stderr; stdout parses as JSON. With the
    network "reachable" torch.hub's downloader prints as torch does; unreachable, the probe says no."""
    import customgen.formats.report
    import customgen.inference.plan
    import customgen.models
    import customgen.network
    import customgen.train.plan

    cache = Path(os.environ["TORCH_HOME"])
    monkeypatch.setattr(customgen.network, "reachable", lambda *a, **k: network == "reachable")

    def download(url, dst, *args, **kwargs):
        print(DOWNLOADING.format(dst), end="")
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    target = {"plan": (customgen.train.plan, "plan_for"), "inspect": (customgen.models, "load_components"),
              "plan --sample": (customgen.inference.plan, "load_architecture"),
              "inspect FILE": (customgen.formats.report, "examine")}[command]
    real = getattr(*target)

    def noisy(*args, **kwargs):
        print(DOWNLOADING.format(cache / "hub" / "checkpoints" / "vgg16-397923af.pth"), end="")
        os.write(1, b"written to fd 1 by C code\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, noisy)
    lora = tmp_path / "ink.safetensors"  # a kohya LoRA file of one layer
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(lora))
    argv = {"plan": ["plan", str(ROOT / "configs" / "lora_style.yaml"), *TINY_PLAN], "inspect": ["inspect", "tiny"],
            "plan --sample": ["plan", "--sample", "stylize", "--model", "tiny", "--style", str(lora)],
            "inspect FILE": ["inspect", str(lora)]}[command]
    assert main([*argv, "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) and "Downloading:" in err and "written to fd 1" in err
    assert main(argv) == 0  # without --json the table goes to stdout as before, the library lines with it
    assert "Downloading:" in capfd.readouterr().out


def test_cli_json_survives_a_real_library_print_and_a_socket_guard_in_a_fresh_process(tmp_path):
    """The installed entry point in a fresh process: a sitecustomize refuses every connection (and records it),
    TORCH_HOME is empty, no offline flag; Prodigy's constructor prints `Using decoupled weight decay` on stdout."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import os, socket\n"
        "def _refuse(*a, **k):\n"
        "    with open(os.environ['NETWORK_LOG'], 'a') as f:\n"
        "        f.write(repr(a) + '\\n')\n"
        "    raise OSError('network guard')\n"
        "socket.socket.connect = lambda self, *a, **k: _refuse(*a)\n"
        "socket.socket.connect_ex = lambda self, *a, **k: _refuse(*a)\n"
        "socket.create_connection = _refuse\n")
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"PYTHONPATH": os.pathsep.join([str(guard), str(ROOT / "src"), env.get("PYTHONPATH", "")]),
            "NETWORK_LOG": str(log), "TORCH_HOME": str(tmp_path / "torch-home")}
    r = subprocess.run([sys.executable, "-m", "customgen", "plan", "lora_style", *TINY_PLAN,
                        "--set", "train.optimizer=prodigy", "--set", "train.lr=1.0", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["optimizer"] == "prodigy"
    assert "Using decoupled weight decay" in r.stderr  # the library's print, kept off stdout
    assert not log.exists(), log.read_text()
    assert not list((tmp_path / "torch-home").glob("**/*.pth"))
