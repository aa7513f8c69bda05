"""Files from elsewhere (customgen.formats): every layout's merged weights against the formulas of the tools users
compare with, written in tests/community_files.py (ComfyUI's LoraLoader math, LyCORIS's output-axis DoRA), and
against stock diffusers (`load_lora_weights` + `fuse_lora`) and peft wherever they load the file."""
from __future__ import annotations

import warnings

import pytest
import torch

from customgen.errors import Notice
from customgen.formats import read_adapter
from customgen.models import load_components
from tests import community_files as cf
from tests.tolerance import gamma

VARIANTS = {  # name → (algo, kohya_state options)
    "lora": ("locon", {"conv": False}),
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"tucker": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"tucker": True}),
    "lokr-full": ("lokr", {"decompose": (False, False)}),
    "lokr": ("lokr", {}),
    "lokr-both": ("lokr", {"decompose": (True, True), "rank": 2}),
    "lokr-tucker": ("lokr", {"tucker": True, "rank": 2}),
    "lokr-no-alpha": ("lokr", {"alpha": None}),
    "dora-input": ("locon", {"dora": "input"}),
    "dora-output": ("locon", {"dora": "output"}),
    "loha-dora-input": ("loha", {"dora": "input", "conv": False}),
}


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


def _parts(state: dict, component: str, path: str) -> tuple[dict, float | None, torch.Tensor | None]:
    name = cf.kohya_key(component, path)
    parts = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    alpha = parts.pop("alpha", None)
    return parts, None if alpha is None else float(alpha), parts.pop("dora_scale", None)


def dora_bound(w, algo, parts, alpha, strength, dora, n) -> torch.Tensor:
    """How far two float64 DoRA merges may differ: W+sΔW within e1 = γ_n·(|W| + |s|M); its row/column norm then
    within ‖e1‖ + γ_{L+2}·norm; the rescale and the strength blend add a few roundings (Higham 2002, §3.1)."""
    u64 = torch.float64
    diff, scale = cf.comfy_diff(algo, parts, alpha, w.shape)
    calc = w.double() + scale * diff
    e1 = gamma(n, u64) * cf.merge_magnitude(w, algo, parts, alpha, 1.0)
    out_axis = dora.shape[0] == w.shape[0]
    flat = (lambda t: t.reshape(t.shape[0], -1)) if out_axis else (lambda t: t.transpose(0, 1).reshape(t.shape[1], -1))
    norm, enorm = flat(calc).norm(dim=1), flat(e1).norm(dim=1)
    shape = (-1, *[1] * (w.dim() - 1)) if out_axis else (1, -1, *[1] * (w.dim() - 2))
    length = flat(calc).shape[1]
    q = dora.double().reshape(shape) / norm.reshape(shape)
    rel_q = (enorm / norm).reshape(shape) + gamma(length + 4, u64)
    scaled = (calc * q).abs()
    return abs(strength) * (q.abs() * e1 + scaled * (rel_q + gamma(2, u64))) + gamma(3, u64) * (
        w.double().abs() * (1 + abs(strength)) + abs(strength) * scaled)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merged_weight_equals_comfyui_formula(variant, strength, tiny, tmp_path):
    """Every layer's merged weight (float64 weights, so the comparison is at float64 rounding) equals ComfyUI's
    LoraLoader formula for the same file and strength; output-axis DoRA follows LyCORIS's ‖W+ΔW‖."""
    algo, options = VARIANTS[variant]
    options = dict(options)
    state = cf.kohya_state(tiny, algo, seed=3, alpha=options.pop("alpha", 3.0), **options)
    adapter = read_adapter(cf.write(tmp_path / f"{variant}.safetensors", state, cf.kohya_metadata(variant)))
    layers = cf.target_layers(tiny, conv=options.get("conv", True))
    assert set(adapter.deltas) == {(c, p) for c, p, _ in layers}
    for component, path, layer in layers:
        parts, alpha, dora = _parts(state, component, path)
        w = layer.weight.detach().double()
        ours = adapter.deltas[(component, path)].merged(w, strength)
        ref = cf.comfy_merge(w, algo, parts, alpha, strength, dora)
        n = cf.chain_length(algo, parts)
        bound = (gamma(n, torch.float64) * cf.merge_magnitude(w, algo, parts, alpha, strength) if dora is None
                 else dora_bound(w, algo, parts, alpha, strength, dora, n))
        assert ours.dtype == torch.float64 and torch.all((ours - ref).abs() <= bound), (variant, path)


def test_output_axis_dora_differs_from_comfyui_by_the_norm_it_uses(tiny, tmp_path):
    """ComfyUI normalises an output-axis DoRA by ‖W‖ instead of ‖W+ΔW‖: on these layers its weight differs from
    the formula's by the ratio of the two norms, far beyond rounding (docs/interop.md states the size)."""
    state = cf.kohya_state(tiny, "locon", seed=4, dora="output", conv=False, text_encoder=False)
    adapter = read_adapter(cf.write(tmp_path / "dora.safetensors", state))
    (component, path, layer), = [t for t in cf.target_layers(tiny, conv=False, text_encoder=False)
                                 if t[1].endswith("attn2.to_q")][:1]
    parts, alpha, dora = _parts(state, component, path)
    w = layer.weight.detach().double()
    ours = adapter.deltas[(component, path)].merged(w, 1.0)
    comfy = cf.comfy_merge(w, "locon", parts, alpha, 1.0, dora, comfy_output_norm=True)
    lycoris = cf.comfy_merge(w, "locon", parts, alpha, 1.0, dora)
    assert torch.allclose(ours, lycoris, rtol=0, atol=1e-12)
    assert (ours - comfy).abs().max() > 1e-3 * w.abs().max()


def test_lycoris_lokr_diff_weight_scales_tucker_by_the_wrong_dimension(tiny):
    """lycoris-lora 4.1.3's own `lokr.diff_weight` divides α by a Tucker layout's output factor, not its rank (the
    reason customgen passes the scale itself); this pins the library behaviour the workaround depends on."""
    from lycoris.functional import lokr

    layer = next(m for n, m in tiny.unet.named_modules() if n.endswith("resnets.0.conv1"))
    parts = cf.layer_parts("lokr", layer, rank=2, g=torch.Generator().manual_seed(0), tucker=True)
    diff, _ = cf.comfy_diff("lokr", parts, None, layer.weight.shape)
    lib = lokr.diff_weight(parts["lokr_w1"], None, None, None, parts["lokr_w2_a"], parts["lokr_w2_b"],
                           parts["lokr_t2"], gamma=4.0, backend="torch")
    wrong = 4.0 / parts["lokr_w2_a"].shape[1]  # the output factor, where ComfyUI and LyCORIS's module use the rank
    assert parts["lokr_w2_a"].shape[1] != 2
    assert torch.allclose(lib.double().reshape(diff.shape), wrong * diff, rtol=1e-5, atol=1e-6)


def test_unmatched_keys_are_one_warning_and_a_file_matching_nothing_is_refused(tiny, tmp_path):
    state = cf.kohya_state(tiny, "locon", conv=False, text_encoder=False)
    stray = {f"lora_unet_not_a_layer_{i}.lora_down.weight": torch.zeros(2, 2) for i in range(7)}
    path = cf.write(tmp_path / "some_stray.safetensors", state | stray)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter = read_adapter(path)
    notes = [str(w.message) for w in seen if issubclass(w.category, Notice)]
    assert len(notes) == 1 and "7 key(s) match no SD v1.5 layer" in notes[0] and "not_a_layer_0" in notes[0]
    assert adapter.report["unmatched"]["count"] == 7 and len(adapter.report["unmatched"]["first"]) == 5
    from customgen.errors import UserError
    with pytest.raises(UserError, match="none of its 7 keys matches an SD v1.5 layer"):
        read_adapter(cf.write(tmp_path / "nothing.safetensors", stray))
