"""Trainable parameters and artifact file sizes of every recipe, and of the style recipe's LoRA types (lora.type,
lora.dora), on the SD v1.5 architecture.

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


TYPES = {  # lora.type / lora.dora settings of the style recipe (docs/training_guide.md, "LoRA types")
    "dora": ["lora.dora=true"], "locon": ["lora.type=locon"], "locon+dora": ["lora.type=locon", "lora.dora=true"],
    "loha": ["lora.type=loha"], "lokr": ["lora.type=lokr"],
}


def measure(recipe: str, sets: tuple = ()) -> dict:
    cfg = load_config(find_config(recipe), ["model.ref=sd15-random", *sets])
    comps = load_components("sd15-random", device="cpu", dtype=torch.float32)
    method = make_method(cfg)
    method.setup(comps)
    with tempfile.TemporaryDirectory() as d:
        fields = method.save(Path(d), comps, training_facts(cfg, recipe))
        files = {p.name: p.stat().st_size for p in Path(d).iterdir()}
    return {"recipe": recipe, "method": method.kind.name, "sets": list(sets),
            "kind": fields.get("kind", method.kind.name), "trainable_params": method.trainable_count(comps),
            "weights_file": fields["weights"], "files_bytes": files,
            **{k: v for k, v in fields.items() if k not in ("weights",)}}


def main() -> None:
    t0 = time.time()
    rows = [measure(r) for r in RECIPES]  # every recipe of the kinds registry
    rows += [measure("lora_style", tuple(sets)) for sets in TYPES.values()]  # the style recipe's LoRA types
    out = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "artifact_sizes_sd15.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python scripts/artifact_sizes.py", "model": "sd15-random (SD v1.5 architecture, random weights)",
        "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
        "note": "untrained artifacts written by customgen's save code; sizes depend only on shapes (fp32 tensors)",
        "seconds": round(time.time() - t0, 1), "python": sys.version.split()[0], "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(f"{r['recipe']:<26} {' '.join(r['sets']):<34} {r['trainable_params']:>12,} params  {r['files_bytes']}")


if __name__ == "__main__":
    main()
