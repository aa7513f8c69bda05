"""How far ComfyUI's output-axis DoRA merge lies from the DoRA formula on an SD v1.5 layer (docs/interop.md).

DoRA (peft's `use_dora`, LyCORIS's default `wd_on_output`) merges W' = m·(W+ΔW)/‖W+ΔW‖, one norm per output row.
Current ComfyUI divides by ‖W‖ instead, so its weight is the formula's times ‖W+ΔW‖/‖W‖ per row: the gap is exactly
the relative change of the row norms that ΔW makes. This script measures it on the cross-attention key projection of
SD v1.5's first transformer block (320 × 768; `sd15-random`: the real shape, random initial weights) with a rank-4
ΔW of a chosen size relative to W (‖ΔW‖/‖W‖ = 1 %, 5 %, 10 %, 20 %), with m = ‖W‖ (peft's initial magnitude): the
formula's merge is then a pure rotation of each row, ComfyUI's also rescales it. customgen merges with the formula
(customgen.formats.Delta; the ComfyUI variant is written out below).
Output: results/benchmarks/dora_comfy_gap_sd15.json (with the command and machine).
Run: .venv/bin/python scripts/dora_comfy_gap.py
"""
import json
import platform
import sys
from pathlib import Path

import torch

from customgen.formats import Delta
from customgen.models import load_components

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
RATIOS = (0.01, 0.05, 0.1, 0.2)
RANK = 4


def gap(w: torch.Tensor, ratio: float, g: torch.Generator) -> dict:
    """ComfyUI's weight against the formula's for a rank-4 ΔW with ‖ΔW‖ = ratio·‖W‖ (Frobenius), in float64."""
    down, up = torch.randn(RANK, w.shape[1], generator=g, dtype=torch.float64), torch.randn(
        w.shape[0], RANK, generator=g, dtype=torch.float64)
    up *= ratio * w.norm() / (up @ down).norm()
    m = w.norm(dim=1, keepdim=True)  # (out, 1): peft's magnitude at initialisation
    delta = Delta("locon", {"lora_down.weight": down, "lora_up.weight": up}, alpha=RANK, dora_scale=m)
    formula = delta.merged(w, 1.0)
    comfy = m * (w + up @ down) / w.norm(dim=1, keepdim=True)  # comfy/weight_adapter/base.py's ‖W‖ (output axis)
    row = (comfy - formula).norm(dim=1) / formula.norm(dim=1)
    return {"delta_over_weight": ratio, "row_relative_gap_mean": row.mean().item(),
            "row_relative_gap_max": row.max().item(),
            "gap_over_dora_change": ((comfy - formula).norm() / (formula - w).norm()).item()}


def main() -> None:
    comps = load_components("sd15-random", device="cpu", dtype=torch.float32)
    w = comps.unet.get_submodule(LAYER).weight.detach().double()
    g = torch.Generator().manual_seed(0)
    rows = [gap(w, r, g) for r in RATIOS]
    out = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "dora_comfy_gap_sd15.json"
    out.write_text(json.dumps({
        "command": "python scripts/dora_comfy_gap.py", "model": "sd15-random (SD v1.5 architecture, random weights)",
        "layer": LAYER, "shape": list(w.shape), "rank": RANK, "magnitude": "‖W‖ per output row",
        "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
        "python": sys.version.split()[0], "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(f"‖ΔW‖/‖W‖ {r['delta_over_weight']:.2f}: per-row gap mean {r['row_relative_gap_mean']:.2e}, max "
              f"{r['row_relative_gap_max']:.2e}; gap / DoRA's change {r['gap_over_dora_change']:.3f}")


if __name__ == "__main__":
    main()
