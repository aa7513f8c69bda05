"""Trainable parameters and artifact file sizes of every recipe on the SD v1.5 architecture.

Builds `sd15-random` (real architecture, random weights), sets each recipe's kind up exactly as training does
(customgen.kinds) and writes its artifact with the real save code, untrained: sizes depend only on
the shapes. Output: results/benchmarks/artifact_sizes_sd15.json (with the command and machine).
Run: .venv/bin/python scripts/artifact_sizes.py
"""
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from customgen.config import find_config, load_config
from customgen.kinds import RECIPES, make_method, training_facts
from customgen.models import load_components


def measure(recipe: str) -> dict:
    cfg = load_config(find_config(recipe), ["model.ref=sd15-random"])
    comps = load_components("sd15-random", device="cpu", dtype=torch.float32)
    method = make_method(cfg)
    method.setup(comps)
    with tempfile.TemporaryDirectory() as d:
        fields = method.save(Path(d), comps, training_facts(cfg, recipe))
        files = {p.name: p.stat().st_size for p in Path(d).iterdir()}
    return {"recipe": recipe, "method": method.kind.name, "trainable_params": method.trainable_count(comps),
            "weights_file": fields["weights"], "files_bytes": files,
            **{k: v for k, v in fields.items() if k not in ("weights",)}}


def main() -> None:
    t0 = time.time()
    rows = [measure(r) for r in RECIPES]  # every recipe of the kinds registry
    out = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "artifact_sizes_sd15.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python scripts/artifact_sizes.py", "model": "sd15-random (SD v1.5 architecture, random weights)",
        "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
        "note": "untrained artifacts written by customgen's save code; sizes depend only on shapes (fp32 tensors)",
        "seconds": round(time.time() - t0, 1), "python": sys.version.split()[0], "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(f"{r['recipe']:<26} {r['trainable_params']:>12,} params  {r['files_bytes']}")


if __name__ == "__main__":
    main()
