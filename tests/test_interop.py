"""Artifacts as other tools see them (tiny, CPU): canonical SD1 names whatever transformers is installed,
kohya metadata, exports that share a flat folder, legacy files, and full checkpoints from `customgen export`
read back through diffusers' own single-file (LDM) reader with the same pixels.

The SD v1.5-scale checks (72 text-encoder and 128 UNet module names written out literally) are in
tests/test_sd15.py (slow tier)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from customgen import kinds
from customgen.cli import main
from customgen.inference import clear_sessions, generate
from customgen.inference.session import make_scheduler
from customgen.kinds import lora, textual_inversion
from customgen.models import build_pipeline, load_components
from customgen.models.loading import config_dir
from tests.artifact_fixtures import (assert_same_lora, lora_deltas, make_dreambooth, make_lora,
                                    make_textual_inversion, stock_reads_kohya_text_encoder)

# What the tiny model's structure gives, written out (tiny: 2 text-encoder layers; one transformer block in
# down_blocks.0, mid_block and each of up_blocks.1's two attentions).
TINY_TE_MODULES = [f"text_model.encoder.layers.{i}.{m}" for i in range(2) for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
TINY_UNET_BLOCKS = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                    "up_blocks.1.attentions.1"]
TINY_UNET_MODULES = [f"{b}.transformer_blocks.0.{a}.{p}" for b in TINY_UNET_BLOCKS for a in ("attn1", "attn2")
                     for p in ("to_q", "to_k", "to_v", "to_out.0")]
KOHYA_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_resolution", "ss_network_dim", "ss_network_alpha",
              "ss_network_module", "ss_steps", "ss_tag_frequency", "ss_base_model_version")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    clear_sessions()
    root = tmp_path_factory.mktemp("interop")
    return {"subject": make_lora(root / "subject", seed=21, text_encoder=True, method="dreambooth_lora_subject",
                                 token="sks", prompt="a photo of sks person"),
            "style": make_lora(root / "style", seed=22),
            "ti": make_textual_inversion(root / "qzembed", seed=23, token="<tiny-ti>"),  # stems no word contains
            "other_ti": make_textual_inversion(root / "qxembed", seed=24, token="<tiny-ti>"),
            "dreambooth": make_dreambooth(root / "dreambooth", seed=25)}


def modules_of(keys, prefix: str, suffixes: tuple[str, ...]) -> set[str]:
    """Module names of a LoRA file's keys under `prefix` (prefix and per-module suffix removed)."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            for s in suffixes:
                if k.endswith(s):
                    out.add(k[len(prefix):-len(s)])
    return out


def pixels(pipe, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]


def test_subject_lora_files_carry_the_canonical_sd1_names(lib):
    folder = lib["subject"]
    diffusers_keys = load_file(str(folder / lora.WEIGHTS)).keys()
    te = modules_of(diffusers_keys, "text_encoder.", (".lora.down.weight", ".lora_A.weight", ".lora.up.weight",
                                                      ".lora_B.weight"))
    unet = modules_of(diffusers_keys, "unet.", (".lora.down.weight", ".lora_A.weight", ".lora.up.weight",
                                               ".lora_B.weight"))
    assert te == set(TINY_TE_MODULES) and unet == set(TINY_UNET_MODULES)
    (export,) = kinds.read_manifest(folder).exports
    kohya = load_file(str(folder / export))
    assert not [k for k in kohya if k.startswith("lora_te1_")]
    assert modules_of(kohya, "lora_te_", (".lora_down.weight",)) == {m.replace(".", "_") for m in TINY_TE_MODULES}
    assert modules_of(kohya, "lora_unet_", (".alpha",)) == {m.replace(".", "_") for m in TINY_UNET_MODULES}


def test_kohya_export_has_kohya_metadata_and_loads_like_the_diffusers_file(lib):
    folder, manifest = lib["subject"], kinds.read_manifest(lib["subject"])
    with safe_open(str(folder / manifest.exports[0]), "pt") as f:
        meta = f.metadata()
    assert set(KOHYA_KEYS) <= set(meta) and meta["ss_output_name"] == "subject"
    assert meta["ss_network_dim"] == str(manifest.rank) and float(meta["ss_network_alpha"]) == manifest.alpha
    assert meta["ss_network_module"] == "networks.lora" and isinstance(json.loads(meta["ss_tag_frequency"]), dict)
    a = load_components("tiny", device="cpu")
    pipe_a = build_pipeline(a, kind="txt2img")
    pipe_b = build_pipeline(load_components("tiny", device="cpu"), kind="txt2img")
    pipe_b.load_lora_weights(str(folder), weight_name=lora.WEIGHTS)  # what customgen itself loads
    if not stock_reads_kohya_text_encoder(a.text_encoder):
        # diffusers < 0.42 under transformers >= 5.15 (Colab 2026-08): its kohya converter looks for a `text_model.`
        # level the text encoder no longer has (docs/interop.md). The file is right (kohya/A1111/ComfyUI read it).
        with pytest.raises(IndexError):
            pipe_a.load_lora_weights(str(folder), weight_name=manifest.exports[0])
        return
    pipe_a.load_lora_weights(str(folder), weight_name=manifest.exports[0])  # diffusers' kohya reader (lora_te_ / lora_unet_)
    # Pixels are not compared: 4 steps of tiny's random UNet amplify a loader's rounding by a CPU-dependent amount.
    assert_same_lora(pipe_a, pipe_b)
    assert len(lora_deltas(pipe_a)) == len(TINY_TE_MODULES) + len(TINY_UNET_MODULES)


def test_two_styles_exported_into_one_flat_folder_do_not_collide(lib, tmp_path):
    """A1111/ComfyUI keep LoRAs and embeddings in flat folders named after the file: `<lora:NAME:1>`."""
    loras, embeddings = tmp_path / "Lora", tmp_path / "embeddings"
    for folder, names in ((loras, ("subject", "style")), (embeddings, ("ti", "other_ti"))):
        folder.mkdir()
        for name in names:
            (export,) = kinds.read_manifest(lib[name]).exports
            assert not (folder / export).exists(), f"{export} collides"
            shutil.copy(lib[name] / export, folder / export)
        assert sorted(p.stem for p in folder.iterdir()) == sorted(lib[n].name for n in names)
    # the WebUI embedding (emb_params) gives the artifact's pixels with its file stem as the trigger word
    ti = kinds.read_manifest(lib["ti"])
    webui = build_pipeline(load_components("tiny", device="cpu"), kind="txt2img")
    webui.load_textual_inversion(str(embeddings / "qzembed.safetensors"), token="qzembed")
    own = build_pipeline(load_components("tiny", device="cpu"), kind="txt2img")
    own.load_textual_inversion(str(lib["ti"] / textual_inversion.WEIGHTS), token=ti.token)
    assert np.array_equal(pixels(webui, "a painting in the style of qzembed"),
                          pixels(own, f"a painting in the style of {ti.token}"))


def test_a_lora_file_without_the_text_model_level_still_loads(lib, tmp_path):
    """customgen under transformers 5 wrote `text_encoder.encoder.layers...` before: it loads, same pixels."""
    legacy = tmp_path / "legacy"
    shutil.copytree(lib["subject"], legacy)
    path = legacy / lora.WEIGHTS
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata=meta)
    run = dict(model="tiny", steps=4, seed=3, prompt="a photo of sks person")
    assert np.array_equal(np.asarray(generate(styles=[str(legacy)], **run)),
                          np.asarray(generate(styles=[str(lib["subject"])], **run)))


def single_file_pipe(path):
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir("tiny")), safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)  # what customgen samples with
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name,scale", [("dreambooth", 1.0), ("dreambooth", 0.5), ("style", 0.7), ("subject", 1.0)])
def test_single_file_export_loads_through_diffusers_with_the_styles_pixels(lib, tmp_path, name, scale):
    """The exported original-layout checkpoint, read by diffusers' from_single_file, draws what customgen draws
    with the style applied, pixel for pixel: both fuse with stock `fuse_lora` at the scale (or swap the same
    DreamBooth weights), and the layout conversion moves tensors without arithmetic."""
    out = tmp_path / f"{name}.safetensors"
    assert main(["export", str(lib[name]), "--out", str(out), "--scale", str(scale), "--dtype", "fp32"]) == 0
    with safe_open(str(out), "pt") as f:
        assert any(k.startswith("model.diffusion_model.input_blocks.") for k in f.keys())
        assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in f.keys())
    prompt = kinds.read_manifest(lib[name]).prompt or "a painting"
    exported = single_file_pipe(out)(prompt, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                                     generator=torch.Generator("cpu").manual_seed(5)).images[0]
    ours = generate(prompt, [str(lib[name])], scales=scale, model="tiny", steps=4, seed=5, size=64)
    assert np.array_equal(np.asarray(exported), np.asarray(ours))


@pytest.mark.parametrize("name,scale", [("dreambooth", 1.0), ("style", 0.7), ("subject", 1.0)])
def test_diffusers_export_loads_with_from_pretrained(lib, tmp_path, name, scale):
    """A DreamBooth or a LoRA (fused at `scale`, text encoder too for the subject) as a diffusers folder: the
    same fused weights customgen draws with, so the same pixels."""
    out = tmp_path / f"{name}_folder"
    assert main(["export", str(lib[name]), "--format", "diffusers", "--out", str(out), "--scale", str(scale),
                 "--dtype", "fp32"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    prompt = kinds.read_manifest(lib[name]).prompt or "a painting"
    exported = pipe(prompt, num_inference_steps=4, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(5)).images[0]
    ours = generate(prompt, [str(lib[name])], scales=scale, model="tiny", steps=4, seed=5, size=64)
    assert np.array_equal(np.asarray(exported), np.asarray(ours))


def test_default_export_is_fp16_and_draws_like_the_fp32_one(lib, tmp_path):
    """Without --dtype the checkpoint is fp16 (half the size, what A1111/ComfyUI users download) and, read back
    in fp32, is the fp32 export with every weight rounded to fp16: exactly that, weight by weight (the pixels
    of two pipelines whose weights differ by fp16 rounding are not comparable on tiny's random UNet)."""
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    assert main(["export", str(lib["dreambooth"]), "--out", str(half)]) == 0
    assert main(["export", str(lib["dreambooth"]), "--out", str(full), "--dtype", "fp32"]) == 0
    with safe_open(str(half), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}, dtypes
    assert half.stat().st_size < 0.6 * full.stat().st_size
    a, b = single_file_pipe(half), single_file_pipe(full)
    for component in ("unet", "vae", "text_encoder"):
        got, want = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert got.keys() == want.keys()
        for k, w in want.items():
            rounded = w.half().float() if w.is_floating_point() else w
            assert got[k].dtype == w.dtype and torch.equal(got[k], rounded), f"{component}.{k}"


def test_export_refuses_what_it_cannot_write_in_one_line(lib, tmp_path, capsys):
    cases = [["export", str(lib["ti"]), "--out", str(tmp_path / "ti.safetensors")],  # an embedding is no model
             ["export", str(lib["style"]), "--out", str(tmp_path / "x.ckpt")],  # pickles are never written
             ["export", str(lib["style"]), "--out", str(tmp_path / "taken.safetensors" / "x.safetensors")]]
    (tmp_path / "taken.safetensors").write_bytes(b"")  # a file: existing, and in the way of a folder
    cases.append(["export", str(lib["style"]), "--out", str(tmp_path / "taken.safetensors")])
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert (tmp_path / "taken.safetensors").read_bytes() == b""


def test_subject_diffusers_export_reloads_every_weight_as_stock_fuse_lora_merged_it(lib, tmp_path):
    """`customgen export --format diffusers` of a subject LoRA: every component reloads through from_pretrained with
    no missing or unexpected key, and its weights equal stock load_lora_weights + fuse_lora + unload (transformers
    5.0.0's own save_pretrained wrote the fused text encoder under `text_base_model.model.model.*`: random on reload)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = tmp_path / "subject_folder"
    assert main(["export", str(lib["subject"]), "--format", "diffusers", "--out", str(out), "--dtype", "fp32"]) == 0
    stock = build_pipeline(load_components("tiny", device="cpu"), kind="txt2img")
    stock.load_lora_weights(str(lib["subject"]), weight_name=lora.WEIGHTS, adapter_name="s")
    stock.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["s"])
    stock.unload_lora_weights()
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model, info = cls.from_pretrained(str(out / name), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        want = getattr(stock, name).state_dict()
        got = model.state_dict()
        assert set(got) == set(want), name
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name


def test_a_written_folder_that_would_not_reload_is_refused(tmp_path):
    """save_pipeline re-reads what it wrote: a renamed or altered weight stops the export with one line."""
    from customgen.errors import UserError
    from customgen.models.pipelines import check_saved, save_pipeline

    comps = load_components("tiny", device="cpu")
    folder = save_pipeline(comps, tmp_path / "model")
    path = folder / "text_encoder" / "model.safetensors"
    good = {k: v.clone() for k, v in load_file(str(path)).items()}  # copies: the file is overwritten below
    n = len(good)
    renamed = {k.replace("text_model.", "text_base_model.model.model.", 1): v for k, v in good.items()}
    altered = {k: v + 1 if k.endswith("final_layer_norm.weight") else v for k, v in good.items()}
    for broken, words in ((renamed, f"{n} weights missing, {n} unexpected, 0 different"),
                          (altered, "0 weights missing, 0 unexpected, 1 different")):
        save_file(broken, str(path))
        with pytest.raises(UserError, match=words) as err:
            check_saved(comps, folder)
        assert "\n" not in str(err.value)
