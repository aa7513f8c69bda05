"""How far ComfyUI's output-axis DoRA merge (normalised by ‖W‖) is from the DoRA formula (‖W+ΔW‖), on an SD v1.5 layer.

    .venv/bin/python scripts/dora_comfy_difference.py [--layer NAME] [--rank 16] [--sizes 0.01,0.05,0.2]

For a DoRA file on an `sd15-random` layer (random weights: the layer's shape and its default initialisation, not a
trained model) whose low-rank change has Frobenius size s·‖W‖ and whose magnitude is the trained ‖W‖ rows, it prints
the largest relative difference of the merged weights, max |W_comfy − W_dora| / max |W_dora|, and the spread of the
per-row factor ‖W+ΔW‖/‖W‖ that separates them (docs/interop.md quotes its output).
"""
from __future__ import annotations

import argparse

import torch

from customgen.formats import Delta
from customgen.models import load_components


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sizes", default="0.01,0.05,0.2")
    args = p.parse_args()
    unet = load_components("sd15-random", device="cpu").unet
    w = unet.get_submodule(args.layer).weight.detach().double()
    g = torch.Generator().manual_seed(0)
    print(f"layer {args.layer} {tuple(w.shape)}, rank {args.rank} (sd15-random)")
    for size in (float(s) for s in args.sizes.split(",")):
        down = torch.randn(args.rank, w.shape[1], generator=g, dtype=torch.float64)
        up = torch.randn(w.shape[0], args.rank, generator=g, dtype=torch.float64)
        up *= size * w.norm() / (up @ down).norm()
        m = (w + up @ down).norm(dim=1, keepdim=True) * (1 + 0.02 * torch.randn(w.shape[0], 1, generator=g,
                                                                                  dtype=torch.float64))
        dora = Delta("locon", {"lora_down.weight": down, "lora_up.weight": up}, alpha=None, dora_scale=m).merged(w, 1.0)
        calc = w + up @ down
        comfy = calc * m / (w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps)
        ratio = (calc.norm(dim=1) / w.norm(dim=1)).numpy()
        print(f"|ΔW| = {size:g}·|W|: max |comfy − dora| / max |dora| = {float((comfy - dora).abs().max() / dora.abs().max()):.4f}; "
              f"‖W+ΔW‖/‖W‖ per row from {ratio.min():.4f} to {ratio.max():.4f}")


if __name__ == "__main__":
    main()
