"""SD v1.5 scale (slow tier): every recipe trains one step on `sd15-random` (the real architecture and module
names, random weights) at 256 px with gradient checkpointing (the subject recipe two, with a snapshot after the
first), each artifact is loaded back through the stock diffusers loaders and stylizes an image, the subject LoRA's
names equal SD v1.5's (written out below from the architecture, not read from the installed libraries), its
snapshot loads through stock `load_lora_weights` and `customgen evaluate` scores it and the final step, and a DreamBooth style exported as a single file reads back
through diffusers' from_single_file with the same pixels; a local ControlNet (.pth, lllyasviel's layout) and IP-Adapter
(h94's layout) at SD v1.5 shapes give stock diffusers' pixels. Random weights: plumbing, not quality.

Training runs in bf16 autocast (frozen weights bf16, trainables fp32) where the CPU computes bf16 natively
(AVX512-BF16 or AMX, as the 2-core machines here do: the tier is faster in bf16 than in fp32 there). Without
it (AVX2 only) bf16 convolutions take a slow fallback path — one 128-channel 3×3 convolution at 256² took 94.7 s
in bf16 and 0.34 s in fp32 on such a machine, so one SD v1.5 step would take hours — and the tier trains in fp32,
with a warning saying so. The bf16 and fp16 (GradScaler) paths run for every recipe on `tiny` either way
(tests/test_train.py).
"""
from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from customgen import kinds
from customgen.cli import main
from customgen.config import load_config
from customgen.inference import clear_sessions, generate, get_session, stylize
from customgen.inference.session import make_scheduler
from customgen.kinds import lora
from customgen.models import load_pipeline
from customgen.models.loading import sd15_config_dir
from customgen.train import train
from customgen.train.captions import read_captions
from tests.artifact_fixtures import content_image
from tests.image_fixtures import make_instance_folder, make_kohya_tree, make_wikiart_tree, save, textured_image
from tests.tolerance import gamma, unit_roundoff

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX tiles), from /proc/cpuinfo's flags."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo.read_text()) is not None


PRECISION = "bf16" if native_bf16() else "no"
if PRECISION == "no":
    warnings.warn("SD v1.5 tier trains in fp32: this CPU has no native bf16 (bf16 convolutions would take hours)")
SD15 = ["model.ref=sd15-random", "data.resolution=256", "data.min_size=32", "data.max_images=1", "train.steps=1",
        "train.batch_size=1", f"train.mixed_precision={PRECISION}", "train.gradient_checkpointing=true",
        "train.checkpoint_every=0", "train.validate_every=0", "validation.steps=1", "validation.num_images=1",
        "prompt.num_class_images=2", "prompt.class_steps=1", "loss.perceptual_every=1",
        "loss.perceptual_max_timestep=1000", "loss.decode_crop=8", "train.log_every=1"]
SNAPSHOT = ["train.steps=2", "train.snapshot_every=1"]  # the subject recipe: one snapshot (step 1), then step 2
DATA = {"lora_style": ("wikiart", ["data.style=Cubism"]), "dreambooth_style": ("wikiart", ["data.style=Cubism"]),
        "textual_inversion": ("wikiart", ["data.style=Cubism"]), "dreambooth_lora_subject": ("photos", SNAPSHOT),
        "lora_anime_kohya": ("kohya", [])}
# SD v1.5, written out: 16 transformer blocks (down 0-2 × 2, mid, up 1-3 × 3), each attn1 + attn2 × q/k/v/out
UNET_BLOCKS = ([f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)] + ["mid_block.attentions.0"]
               + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)])
SD15_UNET_MODULES = [f"{b}.transformer_blocks.0.{a}.{p}" for b in UNET_BLOCKS for a in ("attn1", "attn2")
                     for p in ("to_q", "to_k", "to_v", "to_out.0")]
SD15_TE_MODULES = [f"text_model.encoder.layers.{i}.{m}" for i in range(12) for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                    "mlp.fc2")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """recipe → its artifact, trained one step on sd15-random the first time a test asks for it."""
    root = tmp_path_factory.mktemp("sd15")
    data = {"wikiart": make_wikiart_tree(root / "wikiart", styles={"Cubism": 2}, size=(96, 80)),
            "photos": make_instance_folder(root / "photos", n=2, size=(80, 80)),
            "kohya": make_kohya_tree(root / "kohya", folders={"2_sks girl": 2})}
    made = {}

    def artifact(recipe: str) -> Path:
        if recipe not in made:
            source, extra = DATA[recipe]
            cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", SD15 + [f"data.root={data[source]}"] + extra)
            made[recipe] = train(cfg, output=root / recipe, progress=False)
            gc.collect()
        return made[recipe]
    return artifact


def release() -> None:
    """Give freed SD v1.5-sized buffers back to the system: glibc keeps freed heap pages in its arenas, so the tier's
    resident memory (what scripts/guard.py limits) would hold every model a test built and dropped."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True)
def _released():
    """After every test of this tier, its SD v1.5-sized garbage is returned (a cached session stays)."""
    yield
    release()


def test_sd15_module_lists_are_sd15s():
    assert len(SD15_UNET_MODULES) == 128 and len(SD15_TE_MODULES) == 72


@pytest.fixture(scope="module")
def base_image():
    """The stylize reference without a style (one sd15-random session serves the whole module)."""
    return np.asarray(stylize(content_image(0, (256, 256)), None, model="sd15-random", steps=2, strength=0.5,
                              size=256, seed=0), dtype=np.int16)


@pytest.mark.parametrize("recipe", list(DATA))
def test_each_recipe_trains_one_step_and_stylizes_through_stock_loaders(trained, base_image, recipe):
    folder = trained(recipe)
    manifest = kinds.read_manifest(folder)
    steps = 2 if SNAPSHOT[0] in DATA[recipe][1] else 1
    assert manifest.steps == manifest.step == steps and manifest.resolution == 256
    if manifest.kind == "lora":  # the precision the run really had (kohya metadata: the plan, not the request)
        with safe_open(str(folder / manifest.exports[0]), "pt") as f:
            assert f.metadata()["ss_mixed_precision"] == PRECISION
    loss = np.loadtxt(folder / "logs" / "loss.csv", delimiter=",", skiprows=1, usecols=1, ndmin=1)
    assert np.isfinite(loss).all()
    # the session loads LoRA with load_lora_weights, TI with load_textual_inversion, DreamBooth by checked swap
    img = stylize(content_image(0, (256, 256)), [str(folder)], model="sd15-random", steps=2, strength=0.5,
                  size=256, seed=0)
    out = np.asarray(img, dtype=np.int16)
    assert out.std() > 0 and img.size == (256, 256)
    assert np.abs(out - base_image).max() > 0  # the style did something


def test_subject_lora_names_equal_sd15s_canonical_names(trained):
    folder = trained("dreambooth_lora_subject")
    keys = load_file(str(folder / lora.WEIGHTS)).keys()
    te = {k[len("text_encoder."):].rsplit(".lora_", 1)[0] for k in keys if k.startswith("text_encoder.")}
    unet = {k[len("unet."):].rsplit(".lora_", 1)[0] for k in keys if k.startswith("unet.")}
    assert te == set(SD15_TE_MODULES) and unet == set(SD15_UNET_MODULES)
    kohya = load_file(str(folder / kinds.read_manifest(folder).exports[0])).keys()
    assert {k.split(".")[0] for k in kohya} == ({"lora_te_" + m.replace(".", "_") for m in SD15_TE_MODULES}
                                                | {"lora_unet_" + m.replace(".", "_") for m in SD15_UNET_MODULES})


def test_subject_snapshot_loads_through_stock_load_lora_weights(trained):
    """The snapshot of step 1 is a whole artifact: stock diffusers loads it into a fresh SD v1.5 pipeline, and every
    adapter matrix the pipeline then holds is the snapshot's (not the final step's)."""
    folder = trained("dreambooth_lora_subject")
    (snap,) = kinds.list_snapshots(folder)
    manifest = kinds.read_manifest(snap)
    assert (snap.name, manifest.step, manifest.steps, manifest.text_encoder) == ("step-000001", 1, 2, True)
    saved, final = (load_file(str(f / lora.WEIGHTS)) for f in (snap, folder))
    assert saved.keys() == final.keys() and any(not torch.equal(saved[k], final[k]) for k in saved)
    clear_sessions()  # the stylize session of the other tests: one SD v1.5 in memory at a time
    gc.collect()
    pipe = load_pipeline("sd15-random", kind="txt2img", device="cpu")
    pipe.load_lora_weights(str(snap), weight_name=lora.WEIGHTS)
    (adapter,) = pipe.get_list_adapters()["unet"]
    loaded = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=adapter).items()}
    loaded |= {f"text_encoder.{k}": v for k, v in lora.canonical_text_encoder(
        get_peft_model_state_dict(pipe.text_encoder, adapter_name=adapter)).items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    del pipe
    gc.collect()


def test_dreambooth_single_file_export_reads_back_with_the_same_pixels(trained, tmp_path):
    folder = trained("dreambooth_style")
    prompt = kinds.read_manifest(folder).prompt
    ours = np.asarray(generate(prompt, [str(folder)], model="sd15-random", steps=2, seed=3, size=256))
    clear_sessions()
    gc.collect()
    out = tmp_path / "db.safetensors"
    assert main(["export", str(folder), "--out", str(out), "--dtype", "fp32"]) == 0
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(sd15_config_dir()), safety_checker=None,
                                                    requires_safety_checker=False, dtype=torch.float32)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, height=256, width=256,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(theirs), ours)


def test_subject_and_its_snapshot_are_evaluated(trained, tmp_path, capsys):
    """`customgen evaluate` on the SD v1.5 subject: a row for the base model, the snapshot (step 1) and the final
    artifact (step 2), every subject metric finite (smoke networks: plumbing), and the best step printed."""
    import pandas as pd

    folder = trained("dreambooth_lora_subject")
    clear_sessions()
    gc.collect()
    out = tmp_path / "eval"
    sets = [f"eval.styles={folder}", f"eval.output={out}", "eval.size=64", "eval.steps=2", "eval.smoke=true",
            "eval.samples_per_prompt=2", "eval.min_size=32", 'eval.prompts=["a {token} {noun} on the beach"]']
    assert main(["evaluate", "configs/eval_subject.yaml", "--model", "sd15-random",
                 *[a for kv in sets for a in ("--set", kv)]]) == 0
    rows = pd.read_csv(out / "subject_metrics.csv")
    assert sorted(rows["step"]) == [0, 1, 2]  # the base model is step 0
    assert np.isfinite(rows[["dino", "clip_i", "clip_t", "div", "pres"]].to_numpy()).all()
    assert "best step" in capsys.readouterr().out
    clear_sessions()
    gc.collect()


# --- LoRA types: LoCon, LoHa, LoKr, DoRA at SD v1.5 scale ---------------------------------------------------------------
# SD v1.5's ResNet blocks, written out: 2 per down block, 2 in the mid block, 3 per up block; a 1×1 conv_shortcut where
# the channels change (down 1 and 2, every up block's concatenated input); a 3×3 sampler conv in down 0-2 and up 0-2
SD15_RESNETS = ([f"down_blocks.{i}.resnets.{j}" for i in range(4) for j in range(2)] + ["mid_block.resnets.0",
                "mid_block.resnets.1"] + [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)])
SD15_CONV_MODULES = ([f"{r}.{m}" for r in SD15_RESNETS for m in ("conv1", "conv2", "time_emb_proj")]
                     + ["down_blocks.1.resnets.0.conv_shortcut", "down_blocks.2.resnets.0.conv_shortcut"]
                     + [f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i in range(4) for j in range(3)]
                     + [f"down_blocks.{i}.downsamplers.0.conv" for i in range(3)]
                     + [f"up_blocks.{i}.upsamplers.0.conv" for i in range(3)])
ADAPTERS = {  # name → (recipe, data, settings): every type and DoRA, the subject one with its text encoder
    "lora+dora": ("dreambooth_lora_subject", "photos", ["lora.dora=true", "prompt.prior=false"]),
    "locon": ("lora_style", "wikiart", ["lora.type=locon", "lora.conv_rank=2", "data.style=Cubism"]),
    "loha": ("lora_style", "wikiart", ["lora.type=loha", "data.style=Cubism"]),
    "lokr": ("lora_style", "wikiart", ["lora.type=lokr", "data.style=Cubism"]),
}


def test_adapter_types_train_one_step_and_name_exactly_sd15s_layers(tmp_path):
    """Each setting trains one step on sd15-random at 64 px; its kohya/LyCORIS file names exactly the layers the
    type adapts in SD v1.5 (the 128 attention projections, LoCon/LoHa/LoKr adding the 86 ResNet-block and sampler
    layers, the subject's 72 text-encoder layers), each change fitting its SD v1.5 layer; the DoRA file's magnitudes
    are (out, 1) and the diffusers file holds the same layers; LoHa and LoKr artifacts are merged from that file."""
    from customgen.formats import read_adapter
    from customgen.formats.names import sd1_layers

    data = {"wikiart": make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 1}, size=(72, 72)),
            "photos": make_instance_folder(tmp_path / "photos", n=1, size=(72, 72))}
    layers = sd1_layers()
    for name, (recipe, source, sets) in ADAPTERS.items():
        cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", SD15 + [
            "data.resolution=64", "data.min_bucket=64", "lora.rank=2", f"data.root={data[source]}", *sets])
        folder = train(cfg, output=tmp_path / name.replace("+", "_"), progress=False)
        gc.collect()
        manifest = kinds.read_manifest(folder)
        kohya = folder / (manifest.exports[0] if manifest.kind == "lora" else manifest.weights)
        assert manifest.kind == ("lora" if name in ("lora+dora", "locon") else "merged") and manifest.step == 1
        adapter = read_adapter(kohya)
        assert "unmatched" not in adapter.report
        unet = set(SD15_UNET_MODULES) | (set(SD15_CONV_MODULES) if name != "lora+dora" else set())
        te = set(SD15_TE_MODULES) if recipe == "dreambooth_lora_subject" else set()
        assert set(adapter.deltas) == {("unet", m) for m in unet} | {("text_encoder", m) for m in te}, name
        for (component, path), delta in adapter.deltas.items():
            i, o, k = layers[component][path]
            delta.diff((o, i, *k))  # raises unless its change has the layer's shape
            assert delta.dora_scale is None or tuple(delta.dora_scale.shape) == (o, 1)
        if manifest.kind == "lora":
            keys = load_file(str(folder / lora.WEIGHTS)).keys()
            assert {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in keys} == unet | te


# --- peak memory: the fake-CUDA prediction at SD v1.5 scale (customgen.train.estimate) ---------------------------------
@pytest.mark.parametrize("recipe", ["lora_style", "dreambooth_lora_subject"])
def test_memory_prediction_matches_a_real_cpu_run_of_the_same_step(recipe):
    """The LoRA and subject recipes at 256 px, fp32, text encoder and VAE kept on the device (as on a CPU), perceptual
    terms on every sample: the byte counter on fake CUDA tensors and on a real CPU run of the same step agree within
    5% for the step, the validation call and the setup (the real run holds ~9 GB: run under the heavy lock)."""
    from customgen.memory import MemoryPlan
    from customgen.train.estimate import estimate_training

    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", ["model.ref=sd15-random", "data.resolution=256",
                                                             "loss.perceptual_max_timestep=1000", "validation.num_images=1"])
    plan = MemoryPlan("no", False, "adamw", offload=False)
    fake = estimate_training(cfg, plan)
    gc.collect()
    real = estimate_training(cfg, plan, fake=False)
    gc.collect()
    parts = ["step_peak", "validation_peak", "setup_peak"] + ([] if cfg.loss.lpips or cfg.loss.gram else ["assembly_peak"])
    for part in parts:  # loss networks are built on a CPU device itself, on a GPU before they move (test_plan.py)
        assert getattr(fake, part) == pytest.approx(getattr(real, part), rel=0.05), part
    assert fake.weights == real.weights and fake.gradients == real.gradients


def test_plan_answers_for_every_recipe_on_a_t4_within_a_minute(capsys):
    """`customgen plan` on sd15-random for a T4, every recipe: a verdict, each estimated in under a minute."""
    for recipe in DATA:
        code = main(["plan", str(ROOT / "configs" / f"{recipe}.yaml"), "--model", "sd15-random", "--gpu", "t4", "--json"])
        rep = json.loads(capsys.readouterr().out)
        assert code == (0 if rep["fits"] else 2) and rep["gpu"]["name"] == "Tesla T4"
        assert rep["settings"]["resolution"] == 512 and rep["seconds"] < 60, (recipe, rep["seconds"])


# --- files from elsewhere at SD v1.5 scale: each format stylizes, blends, is listed, scores and bakes -----------------
FILES = {"lora": ("locon", {"conv": False}), "locon": ("locon", {}), "loha": ("loha", {}), "lokr": ("lokr", {}),
         "dora": ("locon", {"conv": False, "dora": "output"})}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """One file of each format written at SD v1.5's names and shapes (seeded, small values), and an A1111 embedding
    of each kind (.pt and .safetensors), in one styles folder."""
    from tests import community_files as cf

    root = tmp_path_factory.mktemp("downloads")
    comps = get_session("sd15-random").comps  # the stylize session's modules (a DoRA scale needs their weights)
    files = {name: cf.write(root / f"{name}_style.safetensors",
                            cf.kohya_state(comps, algo, seed=i, alpha=2.0, rank=4, std=0.02, **opts),
                            cf.kohya_metadata(f"{name}_v1"))
             for i, (name, (algo, opts)) in enumerate(FILES.items())}
    width = comps.text_encoder.get_input_embeddings().weight.shape[1]
    files["embedding_pt"] = cf.write_embedding(root / "ink_pt.pt", cf.embedding(width, 2, seed=1), "a1111-pt")
    files["embedding_st"] = cf.write_embedding(root / "ink_st.safetensors", cf.embedding(width, 1, seed=2), "emb_params")
    return root, files


def test_files_from_elsewhere_stylize_blend_and_are_listed(trained, downloads):
    """Each file stylizes (its pixels differ from the base's) and blends with a trained LoRA style (differ from the
    file alone); the library and the demo list every file with its trigger words."""
    from customgen.demo import DemoState
    from customgen.inference.library import StyleLibrary

    root, files = downloads
    own = trained("lora_style")
    run = dict(model="sd15-random", steps=2, strength=0.6, size=64, seed=0)
    image = content_image(0, (64, 64))
    base = np.asarray(stylize(image, None, **run), dtype=np.int16)
    for name, path in files.items():
        styles = [str(path)]
        alone = np.asarray(stylize(image, styles, **run, **({"prompt": "ink_pt"} if name == "embedding_pt" else {})),
                           dtype=np.int16)
        blend = np.asarray(stylize(image, styles + [str(own)], scales=[1.0, 0.8], **run), dtype=np.int16)
        assert np.abs(alone - base).max() > 0 and np.abs(blend - alone).max() > 0, name
    assert {s.name for s in StyleLibrary(root).styles()} == {p.stem for p in files.values()}
    table = {row[0]: row for row in DemoState("sd15-random", root, None, None, 10**7).table()}
    assert table["ink_pt"][5] == "ink_pt" and table["lokr_style"][5].startswith("lokr_v1, paper cut")


def test_files_from_elsewhere_score_in_evaluate(downloads, tmp_path):
    """`customgen evaluate` with the downloads folder as eval.styles: a row per file (the LoCon against a reference
    style eval.references names), each naming its file and sha256, every content metric finite (smoke networks)."""
    import pandas as pd

    root, files = downloads
    wikiart = make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 2}, size=(96, 80))
    contents = make_wikiart_tree(tmp_path / "contents", styles={"photos": 1}, size=(96, 80)) / "photos"
    out = tmp_path / "eval"
    sets = [f"eval.styles={root}", f"eval.output={out}", f"eval.style_root={wikiart}", f"eval.content_root={contents}",
            "eval.size=64", "eval.steps=2", "eval.smoke=true", "eval.min_size=32", "eval.max_contents=1",
            "eval.references={locon_style: Cubism}"]
    assert main(["evaluate", "configs/eval.yaml", "--model", "sd15-random", *[a for kv in sets for a in ("--set", kv)]]) == 0
    rows = pd.read_csv(out / "metrics.csv").set_index("model")
    assert set(rows.index) == {p.stem for p in files.values()} | {"baseline"}
    assert rows.loc["locon_style", "style"] == "Cubism" and np.isfinite(rows.loc["locon_style", "clip_style"])
    assert np.isfinite(rows.loc[[p.stem for p in files.values()], "clip_content"]).all()
    assert all(len(str(rows.loc[p.stem, "sha256"])) == 64 for p in files.values())


@pytest.mark.parametrize("name", ["lora", "loha"])
def test_files_from_elsewhere_bake_through_export(downloads, tmp_path, name):
    """`customgen export FILE` at SD v1.5 scale, through the stock loader (the kohya LoRA) and through customgen's
    merge (the LoHa): the single file's layers hold the base plus the file's change (fp16)."""
    from tests import community_files as cf

    root, files = downloads
    clear_sessions()
    gc.collect()
    out = tmp_path / f"{name}.safetensors"
    assert main(["export", str(files[name]), "--model", "sd15-random", "--out", str(out), "--scale", "0.8"]) == 0
    algo, opts = FILES[name]
    state = load_file(str(files[name]))
    base = load_pipeline("sd15-random", kind="txt2img", device="cpu").unet
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    key = "lora_unet_" + layer.replace(".", "_")
    parts = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".") and not k.endswith(".alpha")}
    want = cf.comfy_merge(base.get_submodule(layer).weight.detach(), algo, parts, float(state[f"{key}.alpha"]), 0.8)
    with safe_open(str(out), "pt") as f:
        got = f.get_tensor("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight").double()
    # the fp32 merge within γ_n·M of exact, then one rounding to fp16: relative u16 = 2^-11, or half the subnormal
    # spacing (u16 · the smallest normal) below the normal range
    merge = gamma(cf.chain_length(algo, parts), torch.float32) * cf.merge_magnitude(
        base.get_submodule(layer).weight.detach(), algo, parts, float(state[f"{key}.alpha"]), 0.8)
    u16 = unit_roundoff(torch.float16)
    bound = u16 * (want.abs() + merge) + u16 * torch.finfo(torch.float16).smallest_normal + merge
    excess = ((got - want).abs() - bound).max()
    assert excess <= 0, (float(excess), float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()))
    del base


# --- local ControlNet and IP-Adapter files at SD v1.5 shapes (tests/addon_fixtures.py) ---------------------------------
def test_local_controlnet_and_ip_adapter_at_sd15_shapes_equal_stock(tmp_path):
    """lllyasviel's original layout (.pth, fp16, weights-only read) and h94's ip-adapter_sd15 layout at SD v1.5's
    shapes (a small image encoder projecting to ViT-H's 1024): one denoising step at 64 px through customgen equals
    the stock pipelines on the same files and modules; the ControlNet's weights are in the memory prediction."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline

    from customgen.inference import get_session
    from customgen.inference.images import canny_edges
    from customgen.models.builders import CONFIGS
    from customgen.models.footprint import addon_shapes, sampling_peak
    from tests.addon_fixtures import seeded_controlnet, write_controlnet, write_ip_adapter

    clear_sessions()
    gc.collect()
    net = seeded_controlnet("sd15", seed=1)
    n_params = sum(p.numel() for p in net.parameters())
    cn = write_controlnet(tmp_path / "control_v11p_sd15_canny.pth", net, dtype=torch.float16)
    del net
    gc.collect()
    ip = write_ip_adapter(tmp_path / "h94", "sd15", seed=2)
    content, style = content_image(0, (64, 64)), content_image(9, (64, 64))
    run = dict(model="sd15-random", steps=2, strength=0.5, size=64, seed=0, prompt="")
    ours_cn = stylize(content, None, structure="canny", controlnet=str(cn), **run)
    ours_ip = stylize(content, None, style_image=style, style_image_mode="ip-adapter", ip_adapter=str(ip), **run)
    c = get_session("sd15-random").comps  # the stock pipelines share the session's base modules
    common = dict(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    call = dict(prompt="", image=content, strength=0.5, num_inference_steps=2, guidance_scale=7.5)
    stock = ControlNetModel.from_single_file(str(cn), config=str(CONFIGS / "sd15" / "controlnet")).to(torch.float32)
    pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=stock,
                                                    scheduler=make_scheduler("dpm++", c.scheduler.config), **common)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**call, control_image=canny_edges(content), controlnet_conditioning_scale=1.0,  # its default is 0.8
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(ours_cn), np.asarray(ref))
    plain = sampling_peak(c, kind="img2img", size=(512, 512), batch=1, dtype=torch.float16)
    guided = sampling_peak(c, kind="img2img", size=(512, 512), batch=1, dtype=torch.float16, addons=addon_shapes(stock))
    assert guided - plain >= 2 * n_params  # fp16 weights, at least
    del pipe, stock
    gc.collect()
    pipe = StableDiffusionImg2ImgPipeline(scheduler=make_scheduler("dpm++", c.scheduler.config), image_encoder=None,
                                          **common)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip.parents[1]), subfolder="models", weight_name=ip.name)
    pipe.set_ip_adapter_scale({"up": {"block_1": 1.0}})
    ref = pipe(**call, ip_adapter_image=style, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    pipe.unload_ip_adapter()
    assert np.array_equal(np.asarray(ours_ip), np.asarray(ref))
    assert np.abs(np.asarray(ours_ip, dtype=np.int16) - np.asarray(ours_cn, dtype=np.int16)).max() > 0
    clear_sessions()
    gc.collect()


def test_lcm_lora_stylizes_in_4_steps_with_stock_pixels(tmp_path):
    """An LCM-LoRA (published as a kohya LoCon over the UNet's attention, ResNet and sampler layers) at SD v1.5's
    names and shapes stylizes in 4 steps with --scheduler lcm, pixel for pixel as a stock pipeline with the same
    file and LCMScheduler."""
    from diffusers import LCMScheduler
    from tests import community_files as cf

    state = cf.kohya_state(get_session("sd15-random").comps, "locon", seed=41, alpha=8.0, rank=8, std=0.02,
                           text_encoder=False)
    path = cf.write(tmp_path / "lcm-lora-sdv1-5.safetensors", state)
    del state
    image = content_image(1, (64, 64))
    ours = stylize(image, [str(path)], model="sd15-random", scheduler="lcm", steps=4, strength=0.8, guidance=1.0,
                   seed=2, size=64)
    clear_sessions()  # one SD v1.5 in memory at a time: ours (with its fused layers' copies), then the stock one
    release()
    pipe = load_pipeline("sd15-random", kind="img2img", device="cpu")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="lcm")  # offline: by name
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    theirs = pipe("", image=image, strength=0.8, num_inference_steps=4, guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(2)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    del pipe
    gc.collect()


def test_a_bucketed_style_trains_on_sd15_at_two_aspect_ratios(tmp_path):
    """Aspect-ratio buckets at SD v1.5 scale: 128 px (data.min_bucket 64), a 3:1 and a 1:3 painting, two steps of
    batch 1, each in its own bucket (192×64, then 64×192 or the other way round: the seeded order), style.json's
    table counts the images."""
    folder = tmp_path / "wikiart" / "Cubism"
    for i, size in enumerate([(300, 100), (100, 300)]):
        save(textured_image(60 + i, size), folder / f"p{i}.png")
    cfg = load_config(ROOT / "configs" / "lora_style.yaml", SD15 + [
        f"data.root={folder.parent}", "data.style=Cubism", "data.resolution=128", "data.min_bucket=64",
        "data.max_images=2", "train.steps=2", "loss.lpips=0", "loss.gram=0"])
    out = train(cfg, output=tmp_path / "out", progress=False)
    training = kinds.read_manifest(out).training
    assert training["buckets"] == [{"bucket": [64, 192], "count": 1}, {"bucket": [192, 64], "count": 1}]
    rows = read_captions(out)
    assert [r["step"] for r in rows] == [1, 2] and {Path(r["image"]).name for r in rows} == {"p0.png", "p1.png"}
    loss = np.loadtxt(out / "logs" / "loss.csv", delimiter=",", skiprows=1, usecols=1, ndmin=1)
    assert len(loss) == 2 and np.isfinite(loss).all()


def test_a_pivotal_subject_trains_one_step_at_64px_and_its_tokens_load_in_stock_diffusers(tmp_path):
    """Pivotal tuning at SD v1.5 scale (fast: 64 px, no class images): two new rows of the 49,408-token table, saved
    as the advanced script's `clip_l` (2, 768) and loaded by stock load_lora_weights + load_textual_inversion under
    <s0> and <s1>, the rows it trained."""
    photos = make_instance_folder(tmp_path / "photos", n=1, size=(72, 72))
    sets = [s for s in SD15 if not s.startswith("data.resolution")] + [
        "data.resolution=64", f"data.root={photos}", "prompt.prior=false", "pivotal.tokens=2",
        "prompt.instance=a photo of TOK person", "validation.prompts=[a TOK person]", "pivotal.lr=0.05"]
    out = train(load_config(ROOT / "configs" / "dreambooth_lora_subject.yaml", sets), output=tmp_path / "pti",
                progress=False)
    m = kinds.read_manifest(out)
    clip_l = load_file(str(out / m.embeddings))["clip_l"]
    assert clip_l.shape == (2, 768) and m.tokens == ["<s0>", "<s1>"] and m.training["mixed_precision"] == PRECISION
    clear_sessions()
    release()  # the run's SD v1.5 before the stock one
    pipe = load_pipeline("sd15-random", kind="txt2img", device="cpu")
    sigma = pipe.text_encoder.get_input_embeddings().weight.detach().float().std()
    pipe.load_lora_weights(str(out), weight_name=lora.WEIGHTS)
    pipe.load_textual_inversion(clip_l, token=m.tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ids = pipe.tokenizer.convert_tokens_to_ids(m.tokens)
    assert ids == [49408, 49409] and torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), clip_l)
    # the rows start at N(0, σ²) (train.seed's generator, σ the table's std); Adam's first step moves each value by
    # lr·g/(|g| + ε) ≤ lr (Kingma & Ba 2015, no weight decay in the tokens' group), up to fp32 rounding
    init = torch.randn(2, 768, generator=torch.Generator().manual_seed(0)) * sigma
    moved, u = (clip_l - init).abs(), unit_roundoff(torch.float32)
    assert 0 < moved.max() <= 0.05 * (1 + 4 * u) + 4 * u * init.abs().max()
    del pipe
    gc.collect()


def test_noise_offset_and_prodigy_train_one_step_at_64px(tmp_path):
    """Noise offset (with kohya's adaptive scale) and Prodigy at SD v1.5 scale: one step at 64 px trains, Prodigy's
    state (its d estimate among it) is the optimizer the run used, and the kohya export records both settings."""
    wikiart = make_wikiart_tree(tmp_path / "wikiart", styles={"Cubism": 1}, size=(96, 80))
    sets = [s for s in SD15 if not s.startswith("data.resolution")] + [
        "data.resolution=64", "data.min_bucket=64", f"data.root={wikiart}", "data.style=Cubism", "loss.lpips=0",
        "loss.gram=0", "loss.noise_offset=0.1", "loss.adaptive_noise_scale=0.01", "train.optimizer=prodigy",
        "train.lr=1.0"]
    out = train(load_config(ROOT / "configs" / "lora_style.yaml", sets), output=tmp_path / "run", progress=False)
    m = kinds.read_manifest(out)
    assert m.training["optimizer_used"] == "prodigy" and m.steps == m.step == 1
    loss = np.loadtxt(out / "logs" / "loss.csv", delimiter=",", skiprows=1, usecols=1, ndmin=1)
    assert np.isfinite(loss).all()
    with safe_open(str(out / m.exports[0]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_noise_offset"] == "0.1" and meta["ss_adaptive_noise_scale"] == "0.01"
    assert meta["ss_optimizer"] == "prodigy"
