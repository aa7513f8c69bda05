"""One layer's change as a community file stores it, and the weight it merges to.

The products come from lycoris-lora's functional API (the library kohya's sd-scripts trains LyCORIS with), on its
plain torch path; the scale each algorithm uses, and DoRA's strength, follow ComfyUI's LoraLoader
(comfy/weight_adapter) and the WebUI, so a file gives the weights users see in those tools:

    LoRA / LoCon   ΔW = (α/r)·up·down             r = rank of `lora_down` (Tucker: up ×mid× down, `lora_mid`)
    LoHa           ΔW = (α/r)·(w1a·w1b ⊙ w2a·w2b)  r = rows of `hada_w1_b` (Tucker: `hada_t1`, `hada_t2`)
    LoKr           ΔW = s·(w1 ⊗ w2)               w1 = w1a·w1b and w2 = w2a·w2b (or ×t2×) where decomposed;
                                                  s = α/r of the decomposed factor, 1 when both are full
    merged         W' = W + k·ΔW                  k = the strength (the `<lora:name:k>` weight)
    DoRA           W' = W + k·(m·(W+ΔW)/‖W+ΔW‖ − W)   ‖·‖ per output row (`dora_scale` (out, 1), LyCORIS 4's
                                                  default and peft's) or per input column ((1, in))

An `.alpha` missing from a file means scale 1 (ComfyUI's rule). Two places differ from ComfyUI on purpose, with the
published formula: an output-axis DoRA is normalised by ‖W+ΔW‖ (ComfyUI uses ‖W‖), and LoKr's Tucker form is
merged (lycoris 4.1.3's `lokr.diff_weight` scales it by the wrong dimension, so the scale is given here; current
ComfyUI leaves such a layer unpatched). docs/interop.md states both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lycoris.functional import general, lokr, locon, loha

BACKEND = "torch"  # lycoris' plain torch path: the reference formulas, on every device (its kernels are opt-in)
PARTS = {  # algorithm → the tensor names a kohya/LyCORIS file stores per layer (besides alpha and dora_scale)
    "locon": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),  # LyCORIS's name for LoRA and LoCon
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
REQUIRED = {"locon": ("lora_down.weight", "lora_up.weight"), "loha": PARTS["loha"][:4], "lokr": ()}


@dataclass
class Delta:
    """One layer's stored change: its algorithm, tensors (by the file's own part names), alpha and DoRA scale."""

    algo: str  # locon (LoRA, LoCon) | loha | lokr, LyCORIS's algorithm names
    parts: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The rank α is divided by (None where the scale is 1: LoKr with both factors full)."""
        p = self.parts
        if self.algo == "locon":
            return p["lora_down.weight"].shape[0]
        if self.algo == "loha":
            return p["hada_w1_b"].shape[0]
        if "lokr_w2_b" in p:
            return p["lokr_w2_b"].shape[0]
        return p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None

    @property
    def scale(self) -> float:
        """α/r (1 without α, and for LoKr with both factors full)."""
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else float(self.alpha) / rank

    def diff(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """ΔW in `dtype` (float32 unless a float64 weight asks for more) on `device` (the parts' own by default),
        shaped like the layer's weight."""
        p = {k: v.to(device=device, dtype=dtype) for k, v in self.parts.items()}
        get = p.get
        if self.algo == "locon":
            out = locon.diff_weight(get("lora_down.weight"), get("lora_up.weight"), get("lora_mid.weight"),
                                    gamma=self.scale, backend=BACKEND)
        elif self.algo == "loha":
            out = loha.diff_weight(get("hada_w1_b"), get("hada_w1_a"), get("hada_w2_b"), get("hada_w2_a"),
                                   get("hada_t1"), get("hada_t2"), gamma=self.scale, backend=BACKEND)
        else:  # kron_weight with the scale given: lokr.diff_weight's own scale is wrong for the Tucker layout
            out = lokr.kron_weight(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"),
                                   get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2"), scale=self.scale,
                                   backend=BACKEND)
        if out.numel() != torch.Size(shape).numel():
            raise ValueError(f"its change has {out.numel()} values, the layer {tuple(shape)}")
        return out.reshape(shape)

    def dora_axis(self, shape: tuple[int, ...]) -> str | None:
        """'output' for a (out, 1[, 1, 1]) or 1-D (out,) `dora_scale`, 'input' for (1, in[, 1, 1]); None without."""
        if self.dora_scale is None:
            return None
        s = tuple(self.dora_scale.shape)
        if s[0] == shape[0] and all(d == 1 for d in s[1:]):
            return "output"
        if len(s) >= 2 and s[0] == 1 and s[1] == shape[1] and all(d == 1 for d in s[2:]):
            return "input"
        raise ValueError(f"dora_scale has shape {s}, the layer {tuple(shape)} takes (out, 1) or (1, in)")

    def merged(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The layer's weight with this change at `strength`, computed in float32 (float64 for a float64 weight),
        returned in the weight's dtype."""
        w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        diff = self.diff(tuple(w.shape), w.dtype, w.device)  # computed where the weight is (the GPU in a session)
        axis = self.dora_axis(tuple(w.shape))
        if axis is None:
            return (w + strength * diff).to(weight.dtype)
        m = self.dora_scale.to(w.device, w.dtype)
        m = m.reshape(w.shape[0], *[1] * (w.dim() - 1)) if axis == "output" else m.reshape(1, w.shape[1], *[1] * (w.dim() - 2))
        full = general.weight_decompose(w + diff, m, 1, wd_on_out=axis == "output", backend=BACKEND)
        return (w + strength * (full - w)).to(weight.dtype)

    def parameters(self) -> int:
        """Values the file stores for this layer (what the memory plan counts)."""
        extra = 0 if self.dora_scale is None else self.dora_scale.numel()
        return sum(t.numel() for t in self.parts.values()) + extra


def algorithm(parts: set[str]) -> str | None:
    """The algorithm of a layer's stored parts (None: no adapter of a kind customgen merges)."""
    for algo, names in PARTS.items():
        if parts & set(names):
            return algo
    return None
