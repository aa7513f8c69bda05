"""Files from elsewhere (customgen.formats): every layout's merged weights against the formulas of the tools users
compare with, written in tests/community_files.py (ComfyUI's LoraLoader math, LyCORIS's output-axis DoRA), and
against stock diffusers (`load_lora_weights` + `fuse_lora`) and peft wherever they load the file."""
from __future__ import annotations

import hashlib
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from customgen.cli import main
from customgen.demo import DemoState, triggers
from customgen.errors import Notice, UserError
from customgen.formats import examine, read_adapter
from customgen.inference.library import StyleLibrary, load_file_style
from customgen.inference import stylize
from customgen.inference.session import Session, make_scheduler
from customgen.kinds import KINDS
from customgen.formats.names import layer_paths
from customgen.models import build_pipeline, load_components
from customgen.models.loading import config_dir
from tests import community_files as cf
from tests.artifact_fixtures import content_image, make_contents, make_lora, stock_reads_kohya_text_encoder
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
                 else cf.dora_bound(w, algo, parts, alpha, strength, dora, n))
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
    with pytest.raises(UserError, match="none of its 7 keys matches an SD v1.5 layer"):
        read_adapter(cf.write(tmp_path / "nothing.safetensors", stray))


# --- stock diffusers and peft, wherever they load the file -------------------------------------------------
def _stock_fused(path, strength: float, **load):
    """A fresh tiny pipeline with the file loaded by stock `load_lora_weights` and fused at `strength`."""
    comps = load_components("tiny", device="cpu")
    pipe = build_pipeline(comps, kind="txt2img")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="stock", **load)  # offline: by name
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=strength)
    return comps


def _compare_fp32(adapter, comps, tiny, strength, bound_of) -> int:
    """Each layer's fp32 merge against the stock one: both within γ_n·M of exact, so within twice that."""
    checked = 0
    for (component, path), delta in adapter.deltas.items():
        stock = layer_paths(getattr(comps, component), component)[path].weight
        base = layer_paths(getattr(tiny, component), component)[path].weight
        ours = delta.merged(base, strength)
        assert torch.all((ours.double() - stock.double()).abs() <= 2 * bound_of(component, path, base)), path
        checked += 1
    return checked


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_kohya_lora_and_locon_equal_stock_load_lora_weights_and_fuse_lora(conv, tiny, tmp_path):
    te = stock_reads_kohya_text_encoder(tiny.text_encoder)  # not Colab's diffusers 0.39 + transformers 5.15 (interop.md)
    state = cf.kohya_state(tiny, "locon", conv=conv, seed=5, alpha=3.0, text_encoder=te)
    path = cf.write(tmp_path / "kohya.safetensors", state)
    adapter = read_adapter(path)

    def bound(component, layer_path, base):
        parts, alpha, _ = _parts(state, component, layer_path)
        return gamma(cf.chain_length("locon", parts), torch.float32) * cf.merge_magnitude(base, "locon", parts, alpha, 0.7)

    assert _compare_fp32(adapter, _stock_fused(path, 0.7), tiny, 0.7, bound) == len(
        cf.target_layers(tiny, conv=conv, text_encoder=te))


def _diffusers_bound(state, prefix_of, rank, alpha, strength):
    def bound(component, path, base):
        head = prefix_of(component)
        parts = {"lora_down.weight": state[f"{head}{path}.lora_A.weight"], "lora_up.weight": state[f"{head}{path}.lora_B.weight"]}
        return gamma(rank + 4, torch.float32) * cf.merge_magnitude(base, "locon", parts, alpha, strength)
    return bound


@pytest.mark.parametrize("style", ["peft-keys", "old-lora-down", "attn-processor"])
def test_diffusers_lora_files_equal_stock_load_lora_weights(style, tiny, tmp_path):
    """diffusers' own file layouts (today's peft keys with rank/alpha metadata, the older `lora.down` names, which
    diffusers' converters map, and the oldest attention-processor names): weights equal stock load + fuse. Today's
    diffusers loads nothing from the oldest layout (it warns that no UNet key has the `unet` prefix), so there the
    stock reference is the same values written with today's keys."""
    # diffusers < 0.42 converts the older text-encoder names only where CLIPTextModel has `text_model.` (IndexError
    # on Colab's diffusers 0.39 + transformers 5.15, as for kohya files): the stock side cannot read them there
    te = style == "peft-keys" or (style == "old-lora-down" and stock_reads_kohya_text_encoder(tiny.text_encoder))
    state = cf.diffusers_state(tiny, rank=4, seed=6, text_encoder=te)
    if style == "old-lora-down":
        state = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") if k.startswith("unet.") else
                 k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                 for k, v in state.items()}
    if style == "attn-processor":
        state = {k[len("unet."):].replace(".to_out.0.lora_A.", ".processor.to_out_lora.down.")
                 .replace(".to_out.0.lora_B.", ".processor.to_out_lora.up.")
                 .replace(".lora_A.", "_lora.down.").replace(".lora_B.", "_lora.up.")
                 .replace(".to_q_lora", ".processor.to_q_lora").replace(".to_k_lora", ".processor.to_k_lora")
                 .replace(".to_v_lora", ".processor.to_v_lora"): v for k, v in state.items()
                 if any(t in k for t in (".to_q.", ".to_k.", ".to_v.", ".to_out.0."))}
    meta = cf.diffusers_metadata(state, rank=4, alpha=2.0) if style == "peft-keys" else None
    path = cf.write(tmp_path / "pytorch_lora_weights.safetensors", state, meta)
    adapter = read_adapter(path)
    alpha = 2.0 if style == "peft-keys" else 4.0  # no alpha written: scale 1 (α = r)
    reference = cf.diffusers_state(tiny, rank=4, seed=6, text_encoder=te)
    stock_file = path if style != "attn-processor" else cf.write(tmp_path / "today" / "pytorch_lora_weights.safetensors", {
        k: v for k, v in reference.items() if any(t in k for t in (".to_q.", ".to_k.", ".to_v.", ".to_out.0."))})
    n = _compare_fp32(adapter, _stock_fused(stock_file, 0.8), tiny, 0.8,
                      _diffusers_bound(reference, lambda c: f"{c}.", 4, alpha, 0.8))
    assert n == len(adapter.deltas) > 0 and adapter.report["format"] == "diffusers-lora"
    if style == "attn-processor":
        assert n == sum(1 for _, p, _ in cf.target_layers(tiny, conv=False, text_encoder=False)
                        if p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0"))


def test_peft_adapter_file_equals_peft_merge_and_unload(tiny, tmp_path):
    """PEFT's own save (adapter_model.safetensors + adapter_config.json, `base_model.model.` keys) gives the
    weights peft's merge_and_unload gives."""
    from peft import LoraConfig, PeftModel, get_peft_model

    unet = load_components("tiny", device="cpu").unet
    model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(str(tmp_path / "peft"))
    adapter = read_adapter(tmp_path / "peft" / "adapter_model.safetensors")
    merged = PeftModel.from_pretrained(load_components("tiny", device="cpu").unet, str(tmp_path / "peft")).merge_and_unload()
    assert adapter.report["alpha"] == [6.0, 6.0] and len(adapter.deltas) > 0
    for (component, path), delta in adapter.deltas.items():
        base = layer_paths(tiny.unet, "unet")[path].weight
        stock = layer_paths(merged, "unet")[path].weight
        parts = delta.parts
        bound = gamma(4 + 4, torch.float32) * cf.merge_magnitude(base, "locon", parts, 6.0, 1.0)
        assert torch.all((delta.merged(base, 1.0).double() - stock.double()).abs() <= 2 * bound), path


# --- embeddings: each layout gives the vectors stock load_textual_inversion gives ----------------------------
EMBEDDINGS = [("a1111-pt", ".pt"), ("emb_params", ".safetensors"), ("string_to_param", ".safetensors"),
              ("diffusers", ".safetensors"), ("clip_l", ".safetensors")]


@pytest.mark.parametrize("layout,suffix", EMBEDDINGS, ids=[e[0] for e in EMBEDDINGS])
@pytest.mark.parametrize("vectors", [1, 3])
def test_embedding_files_encode_prompts_as_stock_load_textual_inversion(layout, suffix, vectors, tiny, tmp_path):
    """The trigger is the file stem (the WebUI's rule); several vectors load as word, word_1, ...; a prompt with
    the word encodes exactly as stock `load_textual_inversion(FILE, token=stem)` encodes it (clip_l, which stock
    diffusers does not read for SD1, against the vectors themselves)."""
    width = tiny.text_encoder.get_input_embeddings().weight.shape[1]
    vecs = cf.embedding(width, vectors, seed=vectors)
    path = cf.write_embedding(tmp_path / f"paper-cut{suffix}", vecs, layout)
    report, _ = examine(path)
    assert report["format"] == "embedding" and report["triggers"] == ["paper-cut"] and report["usable"]
    assert report["embeddings"] == {"paper-cut": vectors}
    session = Session(load_components("tiny", device="cpu"))
    style = load_file_style(path)
    session.activate([(style, 1.0)])
    pipe = session.pipeline("txt2img")
    tokens = ["paper-cut"] + [f"paper-cut_{i}" for i in range(1, vectors)]
    rows = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(tokens)]
    assert torch.equal(rows, vecs)
    if layout == "clip_l":
        return
    stock = build_pipeline(load_components("tiny", device="cpu"), kind="txt2img")
    stock.load_textual_inversion(str(path), token="paper-cut")
    encode = lambda p: p.encode_prompt("a photo, paper-cut style", "cpu", 1, False)[0]  # noqa: E731
    assert torch.equal(encode(pipe), encode(stock))


# --- inspect: what a file is, before anything loads --------------------------------------------------------
def test_inspect_reports_format_family_layers_and_triggers(tiny, tmp_path, capsys):
    state = cf.kohya_state(tiny, "loha", rank=4, alpha=2.0) | {
        "bundle_emb.ink_style.string_to_param.*": cf.embedding(32, 2, seed=1)}
    path = cf.write(tmp_path / "ink.safetensors", state, cf.kohya_metadata("ink_v2", ss_network_dim="4"))
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    n_unet = len([1 for c, _, _ in cf.target_layers(tiny, conv=True) if c == "unet"])
    assert report["format"] == "loha" and report["base"] == "sd1" and report["usable"] and report["use"] == "--style"
    assert report["modules"] == {"unet": n_unet, "text_encoder": len(cf.target_layers(tiny, conv=False)) - len(
        cf.target_layers(tiny, conv=False, text_encoder=False))}
    assert report["rank"] == [4, 4] and report["alpha"] == [2.0, 2.0] and report["embeddings"] == {"ink_style": 2}
    assert report["triggers"] == ["ink_style", "ink_v2", "paper cut", "bird", "red"]
    assert report["metadata"]["ss_network_dim"] == "4" and report["reason"] is None
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["inspect", str(path)]) == 0 and "format    loha (for sd1)" in capsys.readouterr().out


def test_inspect_answers_refused_files_with_usable_false_and_the_refusal(tiny, tmp_path, capsys):
    """`inspect` is how a user asks: exit 0, usable false, and the reason every command would refuse it with."""
    files = cf.refused_files(tmp_path / "dl", tiny, tmp_path / "PAYLOAD_RAN")
    for case, (path, match) in files.items():
        assert main(["inspect", str(path), "--json"]) == 0, case
        report = json.loads(capsys.readouterr().out)
        if case == "checkpoint as a style":
            assert report["format"] == "checkpoint" and report["use"] == "--model"
            continue
        assert report["usable"] is False and re.search(match, report["reason"]), (case, report["reason"])
        with pytest.raises(UserError) as refused:
            read_adapter(path)
        assert str(refused.value) == report["reason"]
    assert not (tmp_path / "PAYLOAD_RAN").exists()


# --- in a session: blends with own artifacts, scale changes, exact restore ------------------------------------
@pytest.mark.parametrize("algo", ["loha", "locon"])
def test_file_blends_with_an_own_lora_and_restores_the_base_exactly(algo, tiny, tmp_path):
    """A file at 0.7 beside an own LoRA artifact at 0.5. A LoHa file is merged into the weights (after the LoRA is
    fused, as a second LoRA is merged in ComfyUI); a kohya LoCon file is a stock-loaded peft adapter, so the two
    LoRAs run unfused through set_adapters. Either way the shared layer computes W + 0.7·ΔW_file + 0.5·s·B·A
    (peft's scaling holds each style's scale) within a derived bound of float64; switching the styles off gives
    every weight back bit for bit (a kohya file with text-encoder layers is merged too where stock diffusers cannot
    read them: Colab's diffusers 0.39 with transformers 5.15)."""
    kind = "lora" if algo == "locon" and stock_reads_kohya_text_encoder(tiny.text_encoder) else "merged"
    state = cf.kohya_state(tiny, algo, seed=12, alpha=2.0)
    path = cf.write(tmp_path / f"{algo}.safetensors", state)
    make_lora(tmp_path / "own", seed=13)
    session = Session(load_components("tiny", device="cpu"))
    library = StyleLibrary(tmp_path)
    file_style = library.resolve(str(path))
    assert file_style.manifest.kind == kind
    before = {k: v.clone() for k, v in session.comps.unet.state_dict().items()}
    for scale in (0.7, 0.3, 0.7):  # a scale change restores, then applies again
        session.activate([(file_style, scale), (library.resolve("own"), 0.5)])
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = session.comps.unet.get_submodule(name)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    w0 = before[f"{name}.weight"].double()
    parts, alpha, _ = _parts(state, "unet", name)
    own = next(a for a in layer.lora_A if a.startswith("own"))
    own_b, own_a, own_s = layer.lora_B[own].weight.double(), layer.lora_A[own].weight.double(), layer.scaling[own]
    if kind == "lora":  # the file is a peft adapter too: its scaling holds 0.7·α/r
        mine = next(a for a in layer.lora_A if not a.startswith("own"))
        assert layer.scaling[mine] == pytest.approx(0.7 * alpha / parts["lora_down.weight"].shape[0], rel=1e-12)
    want = x.double() @ (cf.comfy_merge(w0, algo, parts, alpha, 0.7) + own_s * own_b @ own_a).T
    with torch.no_grad():
        got = layer(x).double()
    magnitude = cf.merge_magnitude(w0, algo, parts, alpha, 0.7) + abs(own_s) * own_b.abs() @ own_a.abs()
    bound = gamma(layer.in_features + cf.chain_length(algo, parts) + 8, torch.float32) * (x.double().abs() @ magnitude.T)
    assert torch.all((got - want).abs() <= bound)
    session.activate([])
    after = session.comps.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


def test_stock_loadable_files_draw_stock_diffusers_pixels(tiny, tmp_path):
    """A kohya LoCon file (customgen loads it with stock `load_lora_weights` and fuses it as `fuse_lora` does) draws
    exactly the pixels of a stock pipeline given the same file, scale, scheduler and seed."""
    path = cf.write(tmp_path / "locon.safetensors", cf.kohya_state(tiny, "locon", seed=21, alpha=2.0,
                                                                   text_encoder=stock_reads_kohya_text_encoder(
                                                                       tiny.text_encoder)))
    assert read_adapter(path).stock_loadable
    image = content_image(3, (64, 64))
    ours = stylize(image, [str(path)], model="tiny", steps=4, strength=0.6, scales=0.8, seed=5, size=64)
    theirs = stock_img2img(path, image, scheduler="dpm++", scale=0.8, steps=4, strength=0.6, guidance=7.5, seed=5)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def stock_img2img(path, image, *, scheduler: str, scale: float, steps: int, strength: float, guidance: float,
                  seed: int):
    """A stock img2img pipeline on a fresh tiny with the file loaded by `load_lora_weights` and fused at `scale`."""
    pipe = build_pipeline(load_components("tiny", device="cpu"), kind="img2img")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)  # diffusers' X.from_config(model config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="stock")  # offline: by name
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale)
    return pipe("", image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_stylize_with_a_file_blends_on_the_command_line(tiny, tmp_path, capsys):
    """`customgen stylize --style FILE --style ARTIFACT --style-scale ...` runs, and the file changes the pixels."""
    path = cf.write(tmp_path / "lib" / "ink.safetensors", cf.kohya_state(tiny, "lokr", seed=2, alpha=2.0))
    make_lora(tmp_path / "lib" / "own", seed=3)
    content = make_contents(tmp_path / "c", n=1)
    argv = ["stylize", "--model", "tiny", "--styles", str(tmp_path / "lib"), "--content", str(content), "--steps", "3",
            "--size", "64", "--seed", "1"]
    outs = {}
    for label, extra in (("base", []), ("file", ["--style", str(path)]),
                         ("blend", ["--style", "ink", "--style", "own", "--style-scale", "0.8", "--style-scale", "0.5"])):
        assert main(argv + extra + ["--out", str(tmp_path / f"{label}.png")]) == 0, capsys.readouterr().err
        outs[label] = np.asarray(Image.open(tmp_path / f"{label}.png"), dtype=int)
    assert np.abs(outs["file"] - outs["base"]).max() > 1 and np.abs(outs["blend"] - outs["file"]).max() > 1


def test_library_lists_loose_files_with_their_triggers(tiny, tmp_path):
    cf.write_embedding(tmp_path / "watercolor.pt", cf.embedding(32, 2, seed=4), "a1111-pt")
    cf.write(tmp_path / "ink.safetensors", cf.kohya_state(tiny, "locon", conv=False), cf.kohya_metadata("ink_v1"))
    make_lora(tmp_path / "own", seed=3)
    styles = {s.name: s for s in StyleLibrary(tmp_path).styles()}
    assert set(styles) == {"own", "ink", "watercolor"}
    assert styles["watercolor"].default_prompt == "watercolor" and triggers(styles["watercolor"]) == "watercolor"
    assert triggers(styles["ink"]).startswith("ink_v1, paper cut") and styles["ink"].manifest.method == "file"
    rows = {r[0]: r for r in DemoState("tiny", tmp_path, None, None, 10**6).table()}  # the demo's library tab
    assert rows["watercolor"][1:3] == ["file", "merged"] and rows["watercolor"][5] == "watercolor"
    assert rows["own"][1] == "lora_style" and rows["ink"][5].startswith("ink_v1")


# --- export: a file baked into a checkpoint; an embedding into a diffusers folder -------------------------------
def test_export_bakes_a_file_into_a_single_file_checkpoint(tiny, tmp_path):
    """`customgen export FILE --format single-file` = the base with the file merged at --scale (kohya's merge
    script and the WebUI's merger), read back by stock from_single_file."""
    from diffusers import StableDiffusionPipeline

    state = cf.kohya_state(tiny, "loha", seed=7, alpha=2.0)
    path = cf.write(tmp_path / "loha.safetensors", state)
    out = tmp_path / "baked.safetensors"
    assert main(["export", str(path), "--model", "tiny", "--out", str(out), "--dtype", "fp32", "--scale", "0.6"]) == 0
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(config_dir("tiny")), safety_checker=None,
                                                    requires_safety_checker=False)
    for component, name, layer in cf.target_layers(tiny, conv=True):
        parts, alpha, _ = _parts(state, component, name)
        got = layer_paths(getattr(pipe, component), component)[name].weight.double()
        want = cf.comfy_merge(layer.weight.detach(), "loha", parts, alpha, 0.6)
        bound = gamma(cf.chain_length("loha", parts), torch.float32) * cf.merge_magnitude(layer.weight, "loha", parts, alpha, 0.6)
        assert torch.all((got - want).abs() <= bound), name


def test_export_puts_an_embedding_into_a_diffusers_folder_with_stock_token_names(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    vecs = cf.embedding(32, 3, seed=5)
    path = cf.write_embedding(tmp_path / "ink-wash.pt", vecs, "a1111-pt")
    assert main(["export", str(path), "--model", "tiny", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "cannot carry" in capsys.readouterr().err
    assert main(["export", str(path), "--model", "tiny", "--format", "diffusers", "--out", str(tmp_path / "folder"),
                 "--dtype", "fp32"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder"), safety_checker=None)
    ids = pipe.tokenizer.convert_tokens_to_ids(["ink-wash", "ink-wash_1", "ink-wash_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vecs)


# --- few-step files: LCM-LoRA, TCD, Hyper-SD with their schedulers -------------------------------------------------
@pytest.mark.parametrize("name,scheduler", [("lcm-lora-sdv1-5", "lcm"), ("TCD-SD15-LoRA", "tcd")])
def test_few_step_lora_with_its_scheduler_draws_stock_pixels(name, scheduler, tiny, tmp_path, recwarn):
    """A few-step LoRA (published as a kohya LoCon over the attention, ResNet and sampler layers) stylizes in 4 steps
    with its scheduler, pixel for pixel as a stock pipeline given the same file and scheduler; `inspect` names its
    schedulers, and another scheduler is a note, not a refusal."""
    te = stock_reads_kohya_text_encoder(tiny.text_encoder)
    path = cf.write(tmp_path / f"{name}.safetensors", cf.kohya_state(tiny, "locon", seed=31, alpha=4.0, rank=4,
                                                                     std=0.1, text_encoder=te))
    report, _ = examine(path)
    assert report["sampler"]["schedulers"] == [scheduler] and report["sampler"]["steps"] == "4-8"
    image = content_image(4, (64, 64))
    run = dict(model="tiny", steps=4, strength=0.8, guidance=1.5, seed=7, size=64)
    ours = stylize(image, [str(path)], scheduler=scheduler, **run)
    assert not [w for w in recwarn if issubclass(w.category, Notice) and name in str(w.message)]
    theirs = stock_img2img(path, image, scheduler=scheduler, scale=1.0, steps=4, strength=0.8, guidance=1.5, seed=7)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    stylize(image, [str(path)], scheduler="dpm++", **run)
    notes = [str(w.message) for w in recwarn if issubclass(w.category, Notice) and name in str(w.message)]
    assert len(notes) == 1 and f"--scheduler {scheduler}" in notes[0] and "dpm++" in notes[0]


def test_styles_in_the_sampling_prediction_and_two_files_of_one_folder(tiny, tmp_path):
    """Two kohya LoRA files in one folder are two adapters; the sampling prediction adds exactly the active styles'
    own tensors (each LoRA adapter's lora_A/lora_B bytes, an embedding's rows; a merged LoHa nothing)."""
    from customgen.inference.fit import styles_bytes

    te = stock_reads_kohya_text_encoder(tiny.text_encoder)
    a = cf.write(tmp_path / "a.safetensors", cf.kohya_state(tiny, "locon", conv=False, seed=1, rank=4, text_encoder=te))
    b = cf.write(tmp_path / "b.safetensors", cf.kohya_state(tiny, "locon", conv=False, seed=2, rank=2, text_encoder=te))
    h = cf.write(tmp_path / "h.safetensors", cf.kohya_state(tiny, "loha", seed=3, rank=2))
    e = cf.write_embedding(tmp_path / "e.pt", cf.embedding(32, 3, seed=4), "a1111-pt")
    session = Session(load_components("tiny", device="cpu"))
    styles = [load_file_style(p) for p in (a, b, h, e)]
    session.activate([(s, 0.5) for s in styles])
    adapters = session.state(KINDS["lora"]).adapters
    assert len(set(adapters.values())) == 2 and set(adapters) == {a.resolve(), b.resolve()}
    layers = [(c, p) for c, p, _ in cf.target_layers(tiny, conv=False, text_encoder=te)]
    lora_bytes = {r: 4 * r * sum(sum(cf.dims(m)[:2]) for _, _, m in cf.target_layers(tiny, conv=False, text_encoder=te))
                  for r in (4, 2)}  # fp32 lora_A (r × in) and lora_B (out × r) per layer (1×1 convs likewise)
    assert len(layers) > 0 and styles_bytes(session) == lora_bytes[4] + lora_bytes[2] + 3 * 32 * 4


def test_a_layer_stock_diffusers_skips_is_an_error(tiny, tmp_path, monkeypatch):
    """Stock `load_lora_weights` drops keys it cannot map without a word; customgen counts the layers it applied
    against the layers the file names, and a shortfall is one line, not a silent skip."""
    from customgen.kinds import lora

    te = stock_reads_kohya_text_encoder(tiny.text_encoder)
    path = cf.write(tmp_path / "k.safetensors", cf.kohya_state(tiny, "locon", conv=False, seed=1, text_encoder=te))
    real = lora.lora_layers
    monkeypatch.setattr(lora, "lora_layers", lambda pipe, name: real(pipe, name)[1:])  # as if one key were dropped
    n = len(read_adapter(path).deltas)
    with pytest.raises(UserError, match=f"names {n} layers and {n - 1} were applied"):
        Session(load_components("tiny", device="cpu")).activate([(load_file_style(path), 1.0)])
