"""scripts/benchmark.py runs end to end (on `tiny`, CPU) and writes the documented JSON."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_benchmark_script_on_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    mod.main(["--model", "tiny", "--resolution", "64", "--warmup", "1", "--steps", "2", "--infer-steps", "4",
              "--repeats", "2", "--recipes", "lora_style,textual_inversion", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["device"] == "cpu" and "--model tiny" in report["command"]
    assert [r["recipe"] for r in report["training"]] == ["lora_style", "textual_inversion"]
    assert all(r["status"] == "ok" and r["seconds_per_step"] > 0 for r in report["training"])
    assert report["img2img"]["seconds_per_image"] > 0 and report["img2img"]["steps"] == 4
