"""CLI conventions: exit 0/2/1, one-line errors without tracebacks, --debug tracebacks."""
import json
import subprocess
import sys

import pytest

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
