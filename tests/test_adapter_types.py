"""LoRA settings beyond plain LoRA (`lora.type` locon | loha | lokr, `lora.dora`, `lora.conv_rank` / `conv_alpha`) on
`tiny`: refused in one line when they do not go together, trained through peft for the style and subject recipes,
resumed bit for bit after a kill in bf16, and exported key by key in the kohya/LyCORIS layout ComfyUI, the WebUI and
kohya read (every key consumed by ComfyUI's adapters, written out in tests/community_files.py), with merged weights
equal to peft's own merge of the trained model; lora/locon/DoRA files also through stock diffusers."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoHaConfig, LoKrConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from customgen import kinds
from customgen.cli import main
from customgen.config import load_config
from customgen.formats import read_adapter
from customgen.formats.writing import kohya_state
from customgen.kinds import lora
from customgen.kinds.adapter_types import add_adapter, trained_layers
from customgen.models import load_components, load_pipeline
from customgen.train import build_run, finish, loop, prepare_output, train
from customgen.train.checkpoint import checkpoints
from tests import community_files as cf
from tests.image_fixtures import make_instance_folder, make_wikiart_tree
from tests.interrupt import killed_at
from tests.t4_step import fp16_scaled_step
from tests.tolerance import gamma

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.ref=tiny", "data.resolution=64", "data.min_bucket=64", "data.min_size=32", "train.steps=2", "train.batch_size=1",
         "validation.steps=2", "validation.num_images=1", "train.checkpoint_every=0", "train.validate_every=0",
         "loss.lpips=0", "loss.gram=0", "train.lr=0.02", "lora.text_encoder_lr=0.02", "train.lr_scheduler=constant"]
SETTINGS = {  # name → (recipe, --set lines): every type and DoRA, alpha ≠ rank, conv rank/alpha of their own
    "lora+dora": ("lora_style", ["lora.dora=true", "lora.alpha=2"]),
    "locon": ("lora_style", ["lora.type=locon", "lora.conv_rank=2", "lora.conv_alpha=1"]),
    "locon+dora": ("dreambooth_lora_subject", ["lora.type=locon", "lora.dora=true", "lora.rank=2"]),
    "loha": ("lora_style", ["lora.type=loha", "lora.conv_rank=2", "lora.alpha=2"]),
    "loha-subject": ("dreambooth_lora_subject", ["lora.type=loha", "lora.conv_rank=0"]),
    "lokr": ("lora_style", ["lora.type=lokr", "lora.alpha=2", "lora.conv_rank=2", "lora.conv_alpha=3"]),
}
DORA = {"dora_wd": "True", "wd_on_output": "True"}
NETWORK = {  # kohya's ss_network_module and ss_network_args: its own networks.lora for LoCon, LyCORIS's for the rest
    "lora+dora": ("lycoris.kohya", {"algo": "locon"} | DORA),
    "locon": ("networks.lora", {"conv_dim": "2", "conv_alpha": "1.0"}),
    "locon+dora": ("lycoris.kohya", {"algo": "locon", "conv_dim": "2", "conv_alpha": "2"} | DORA),
    "loha": ("lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "2.0"}),
    "loha-subject": ("lycoris.kohya", {"algo": "loha"}),
    "lokr": ("lycoris.kohya", {"algo": "lokr", "conv_dim": "2", "conv_alpha": "3.0"}),
}
DIFFUSERS_TYPES = ("lora+dora", "locon", "locon+dora")  # stock diffusers loads their file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"lora_style": [f"data.root={make_wikiart_tree(root / 'wikiart', styles={'Cubism': 2}, size=(72, 72))}",
                           "data.style=Cubism"],
            "dreambooth_lora_subject": [f"data.root={make_instance_folder(root / 'photos', n=2, size=(72, 72))}",
                                        "prompt.prior=false"]}


def cfg_for(name: str, data, *extra):
    recipe, sets = SETTINGS[name]
    return load_config(ROOT / "configs" / f"{recipe}.yaml", SMALL + data[recipe] + sets + list(extra))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """name → (artifact folder, the trained components): 2 fp32 steps, a snapshot after the first."""
    out = {}
    for name in SETTINGS:
        folder = tmp_path_factory.mktemp("art") / name.replace("+", "_")
        prepare_output(folder, resume="never", overwrite=False)
        run = build_run(cfg_for(name, data, "train.snapshot_every=1"), folder)
        stats = loop.run_loop(run, start=0, progress=False)
        finish(run, stats["seconds"], 0)
        out[name] = (folder, run.comps)
    return out


# --- bad settings --------------------------------------------------------------------------------------------------
BAD = [
    (["lora.type=boft"], "config key lora.type: 'boft' is not one of lora, locon, loha, lokr"),
    (["lora.type=loha", "lora.dora=true"], "peft has no DoRA for loha"),
    (["lora.type=lokr", "lora.dora=true"], "peft has no DoRA for lokr"),
    (["lora.conv_rank=4"], "lora.conv_rank applies to lora.type locon, loha or lokr"),
    (["lora.type=loha", "lora.rank=0"], "config key lora.rank must be >= 1"),
    (["lora.type=locon", "lora.dora=true", "lora.alpha=0"], "config key lora.alpha must be > 0"),
    (["lora.type=lokr", "lora.conv_rank=2000"], "config key lora.conv_rank must be >= 0 and <= 1024"),
    (["lora.type=loha", "lora.conv_alpha=-1"], "config key lora.conv_alpha must be > 0"),
]


@pytest.mark.parametrize("sets,match", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_settings_are_one_line_before_any_weight_loads(sets, match, data, tmp_path, monkeypatch, capsys):
    """`customgen train` and `customgen plan` with settings that do not go together: exit 2, one `error:` line, no
    weights loaded, no output folder."""
    import customgen.train.build as build

    monkeypatch.setattr(build, "load_components", lambda *a, **k: pytest.fail("weights loaded before the check"))
    out = tmp_path / "never"
    for command in (["train", "--output", str(out)], ["plan", "--gpu", "t4"]):
        argv = [command[0], str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", *command[1:]]
        code = main(argv + sum((["--set", s] for s in data["lora_style"] + sets), []))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


# --- training and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora+dora", "locon", "locon+dora", "loha", "lokr"])
def test_each_setting_trains_in_bf16_and_resumes_bit_identically_after_a_kill(name, data, tmp_path, monkeypatch):
    """2 bf16 steps (frozen weights bf16, trainables fp32), the second killed and resumed from the checkpoint of
    the first: the artifact's main weights file holds the same tensors as the uninterrupted run's."""
    extra = ("train.mixed_precision=bf16", "train.checkpoint_every=1")
    whole = train(cfg_for(name, data, *extra), output=tmp_path / "whole", progress=False)
    with killed_at(monkeypatch, 1):
        train(cfg_for(name, data, *extra), output=tmp_path / "cut", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step-000001"]
    resumed = train(cfg_for(name, data, *extra), output=tmp_path / "cut", resume="auto", progress=False)
    manifest = kinds.read_manifest(whole)
    settings = cfg_for(name, data).lora
    assert manifest.training["mixed_precision"] == "bf16"
    assert (manifest.training["type"], manifest.training["dora"]) == (settings.type, settings.dora)
    a, b = (load_file(str(p / kinds.read_manifest(p).weights)) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "alpha" not in k)


@pytest.mark.parametrize("name", ["lora+dora", "locon+dora", "loha-subject", "lokr"])
def test_fp16_path_of_a_t4_with_grad_scaler_steps_each_setting(name, data, tmp_path):
    """The T4 recipe on CPU: frozen weights fp16, the adapter's tensors fp32 (DoRA magnitudes, LoHa/LoKr factors
    included), fp16 autocast, GradScaler unscale + step."""
    fp16_scaled_step(cfg_for(name, data), tmp_path / "fp16")


# --- exports -------------------------------------------------------------------------------------------------------
def model_layers(comps) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """kohya name → (component, canonical path, base layer) of every Linear/Conv2d (peft's wrappers seen through)."""
    out = {}
    for component in ("unet", "text_encoder"):
        for name, m in getattr(comps, component).named_modules():
            if isinstance(m, BaseTunerLayer):
                path = cf.canonical_te(name) if component == "text_encoder" else name
                out[cf.kohya_key(component, path)] = (component, path, m.get_base_layer())
    return out


def peft_merged(comps) -> dict[str, torch.Tensor]:
    """kohya name → the layer's weight after peft's own merge (`merge()` of each adapted layer, on a copy)."""
    out = {}
    for component in ("unet", "text_encoder"):
        model = copy.deepcopy(getattr(comps, component))
        for name, m in model.named_modules():
            if isinstance(m, BaseTunerLayer):
                m.merge(adapter_names=["default"])
                path = cf.canonical_te(name) if component == "text_encoder" else name
                out[cf.kohya_key(component, path)] = m.get_base_layer().weight.detach()
    return out


def file_layers(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    layers = {}
    for key, value in load_file(str(path)).items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value
    return layers


def check_layout(path: Path, comps) -> None:
    """Every key of the file belongs to an adapted layer of the model and is a part ComfyUI's adapter for that layer
    reads (no key left over); the required parts are there; dora_scale is (out, 1[, 1, 1])."""
    targets = model_layers(comps)
    layers = file_layers(path)
    assert set(layers) == set(targets)
    for name, parts in layers.items():
        algo = cf.comfy_algo(parts)
        assert set(parts) <= cf.COMFY_PARTS[algo] | cf.COMFY_SHARED, (name, sorted(parts))
        assert cf.COMFY_REQUIRED[algo] <= set(parts) and "alpha" in parts, (name, sorted(parts))
        weight = targets[name][2].weight
        if "dora_scale" in parts:
            assert tuple(parts["dora_scale"].shape) == (weight.shape[0], *[1] * (weight.dim() - 1)), name


def merged_bound(w, algo, parts, alpha, dora) -> torch.Tensor:
    """How far peft's fp32 merge may lie from the float64 formula on the file's tensors: the formula's chain of
    roundings in fp32 (one more for LoKr's folded scale) plus the float64 reference's own (Higham 2002, §3.1)."""
    n = cf.chain_length(algo, parts) + 1
    if dora is not None:
        return cf.dora_bound(w, algo, parts, alpha, 1.0, dora, n, torch.float32)
    return (gamma(n, torch.float32) + gamma(n, torch.float64)) * cf.merge_magnitude(w, algo, parts, alpha, 1.0)


def check_merges(path: Path, comps) -> None:
    """Per layer: the file through the published formula (ComfyUI's, LyCORIS's ‖W+ΔW‖ for output-axis DoRA) equals
    peft's merge of the trained model within the rounding bound; and customgen's own reading of the file (what the
    `merged` kind applies) equals the formula at float64 rounding."""
    targets, merged, adapter = model_layers(comps), peft_merged(comps), read_adapter(path)
    for name, parts in file_layers(path).items():
        component, layer_path, layer = targets[name]
        alpha, dora = float(parts.pop("alpha")), parts.pop("dora_scale", None)
        algo = cf.comfy_algo(parts)
        w = layer.weight.detach().double()
        ref = cf.comfy_merge(w, algo, parts, alpha, 1.0, dora)
        assert torch.all((merged[name].double() - ref).abs() <= merged_bound(w, algo, parts, alpha, dora)), name
        ours = adapter.deltas[(component, layer_path)].merged(w, 1.0)
        n = cf.chain_length(algo, parts)
        bound = (gamma(n, torch.float64) * cf.merge_magnitude(w, algo, parts, alpha, 1.0) if dora is None
                 else cf.dora_bound(w, algo, parts, alpha, 1.0, dora, n))
        assert torch.all((ours - ref).abs() <= bound), name


@pytest.mark.parametrize("name", list(SETTINGS))
def test_export_is_the_kohya_layout_with_no_key_left_over_and_merges_to_pefts_weights(name, trained):
    folder, comps = trained[name]
    manifest = kinds.read_manifest(folder)
    diffusers_loads = name in DIFFUSERS_TYPES
    assert manifest.kind == ("lora" if diffusers_loads else "merged")
    kohya = folder / (manifest.exports[0] if diffusers_loads else manifest.weights)
    assert (folder / lora.WEIGHTS).is_file() == diffusers_loads
    check_layout(kohya, comps)
    check_merges(kohya, comps)
    with safe_open(str(kohya), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])) == NETWORK[name]
    assert any(k.startswith("lora_te_") for k in keys) == (SETTINGS[name][0] == "dreambooth_lora_subject")


def test_lokr_scale_is_folded_so_tools_that_skip_it_merge_the_same(trained):
    """peft scales every LoKr layer by α/r; ComfyUI and LyCORIS only where a factor is decomposed. In the file the
    scale sits inside lokr_w1 and alpha = r, so ComfyUI's rule and 'always α/r' give the same weight."""
    folder, comps = trained["lokr"]
    layers = file_layers(folder / kinds.read_manifest(folder).weights)
    full = [n for n, p in layers.items() if "lokr_w2" in p and "lokr_w1" in p]
    decomposed = [n for n, p in layers.items() if "lokr_w2_a" in p]
    assert full and decomposed  # tiny's Linear layers keep both factors full, its 3×3 convolutions (rank 2) do not
    rank = {cf.kohya_key(t.component, t.path): t.rank for t in trained_layers(comps.unet, "unet")}
    assert all(float(layers[n]["alpha"]) == rank[n] for n in full + decomposed)


def stock_fused(folder: Path, weights: str) -> dict[str, torch.Tensor]:
    """kohya name → weight of each adapted layer after stock `load_lora_weights` + `fuse_lora` of `weights`."""
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")
    pipe.load_lora_weights(str(folder), weight_name=weights)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    loaded = {}
    for component in ("unet", "text_encoder"):
        for n, m in getattr(pipe, component).named_modules():
            if isinstance(m, BaseTunerLayer):
                path = cf.canonical_te(n) if component == "text_encoder" else n
                loaded[cf.kohya_key(component, path)] = m.get_base_layer().weight.detach()
    return loaded


@pytest.mark.parametrize("name", DIFFUSERS_TYPES)
def test_lora_locon_and_dora_files_load_through_stock_diffusers(name, trained):
    """`load_lora_weights` + `fuse_lora` of the diffusers file: every adapted layer's fused weight, the subject's
    text-encoder DoRA included (transformers 5's load_adapter misses `lora_magnitude_vector` without `.weight`), is
    peft's merge of the trained model, bit for bit (the same peft merge on the same tensors). LoCon's kohya file
    fuses to the same weights through diffusers' kohya reader."""
    folder, comps = trained[name]
    merged = peft_merged(comps)
    files = [lora.WEIGHTS] + (kinds.read_manifest(folder).exports if name == "locon" else [])
    for weights in files:
        loaded = stock_fused(folder, weights)
        assert loaded.keys() == merged.keys()
        bad = {k: (loaded[k] - merged[k]).abs().max().item() for k in merged if not torch.equal(loaded[k], merged[k])}
        assert not bad, (weights, bad)


@pytest.mark.parametrize("config", [LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=["conv1",
                                                                                                     "to_q"]),
                                    LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, decompose_both=True,
                                               target_modules=["conv1", "to_q", "conv_shortcut"])],
                         ids=["loha-tucker", "lokr-tucker-both"])
def test_writer_takes_pefts_tucker_and_decomposed_layouts(config, tmp_path):
    """peft's Tucker form (hada_t1/t2, lokr_t2) and LoKr's decomposed left factor (lokr_w1_a/b), random values:
    written under LyCORIS's names, consumed by ComfyUI's adapters, merged to peft's weights."""
    comps = load_components("tiny", device="cpu")
    add_adapter(comps.unet, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in comps.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = cf.write(tmp_path / "t.safetensors", kohya_state(trained_layers(comps.unet, "unet")))
    parts = set().union(*(p.keys() for p in file_layers(path).values()))
    assert {"hada_t1", "hada_t2"} <= parts or {"lokr_t2", "lokr_w1_a", "lokr_w1_b"} <= parts
    check_layout(path, comps)
    check_merges(path, comps)


# --- everywhere customgen uses an artifact --------------------------------------------------------------------------
def test_artifacts_stylize_blend_snapshot_and_export_single_file(trained, tmp_path):
    """A LoHa (kind `merged`) and a LoCon+DoRA subject (kind `lora`): each changes the image, their blend differs
    from both, switching them off gives the base image again, a snapshot is an artifact of its own, and a single-file
    export read by diffusers' from_single_file draws what customgen draws."""
    from customgen.inference import clear_sessions, generate, stylize
    from customgen.kinds import list_snapshots, read_artifact
    from tests.artifact_fixtures import content_image
    from tests.test_interop import single_file_pipe

    loha, dora = str(trained["loha"][0]), str(trained["locon+dora"][0])
    content = tmp_path / "c.png"
    content_image(0).save(content)
    clear_sessions()
    run = dict(model="tiny", steps=3, seed=0, size=64)
    base = np.asarray(stylize(content, None, **run))
    one = np.asarray(stylize(content, [loha], **run))
    other = np.asarray(stylize(content, [dora], **run))
    blend = np.asarray(stylize(content, [loha, dora], scales=[0.5, 0.5], **run))
    assert not np.array_equal(one, base) and not np.array_equal(other, base)
    assert not np.array_equal(blend, one) and not np.array_equal(blend, other)
    assert np.array_equal(np.asarray(stylize(content, None, **run)), base)  # restored exactly
    (snap,) = list_snapshots(Path(loha))
    manifest, kind = read_artifact(snap)
    assert manifest.step == 1 and kind.name == "merged"
    early = np.asarray(stylize(content, [str(snap)], **run))
    assert not np.array_equal(early, base) and not np.array_equal(early, one)
    for name, folder in (("loha", loha), ("dora", dora)):
        out = tmp_path / f"{name}.safetensors"
        assert main(["export", folder, "--out", str(out), "--dtype", "fp32"]) == 0
        prompt = kinds.read_manifest(folder).prompt or "a painting"
        exported = single_file_pipe(out)(prompt, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                                         generator=torch.Generator("cpu").manual_seed(5)).images[0]
        ours = generate(prompt, [folder], model="tiny", steps=3, seed=5, size=64)
        assert np.array_equal(np.asarray(exported), np.asarray(ours)), name
    clear_sessions()


def test_overwrite_clears_a_merged_artifacts_files_and_nothing_else(trained, tmp_path):
    """`--overwrite` removes the files a run wrote, the LoHa's kohya/LyCORIS main file included (its name follows
    the artifact), and keeps what else the folder holds: no kind's empty `weights` name turns into the folder."""
    import shutil

    from customgen.train.run import owned_files

    out = tmp_path / "again"
    shutil.copytree(trained["loha"][0], out)
    (out / "notes.txt").write_text("mine")
    main_file = kinds.read_manifest(out).weights
    assert out not in owned_files(out) and out / main_file in owned_files(out)
    prepare_output(out, resume="never", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
