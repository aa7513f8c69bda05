"""customgen.inference on `tiny` (CPU, offline): equality with stock diffusers, style switching without
reloading the base, blends, masks, style images, structure guidance, txt2img, metadata and bad inputs."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import customgen.models as models
from customgen import kinds
from customgen.kinds import dreambooth, lora, textual_inversion
from customgen.cli import main
from customgen.errors import Notice, UserError
from customgen.inference import (StyleLibrary, clear_sessions, generate, get_session, read_settings, save_image,
                                 stylization_knobs, stylize)
from customgen import request
from customgen.inference import adapters, commands, session as session_mod
from customgen.inference.images import feather_mask, load_mask
from tests.artifact_fixtures import content_image, make_dreambooth, make_library, make_lora, make_textual_inversion

STEPS = 10  # DPM-Solver++ at strength 0.6 → 6 denoising steps
RUN = dict(model="tiny", steps=STEPS, seed=7)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    clear_sessions()  # a session cached by another module may hold the same TI token (then loaded under an alias)
    root = tmp_path_factory.mktemp("styles")
    make_library(root)
    return root


@pytest.fixture()
def content():
    return content_image(0)  # 80x64: already at tiny's working size (short side 64)


def px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def differ(a, b) -> float:
    return float(np.abs(px(a) - px(b)).mean())


def run(content, lib, styles=None, **kw):
    return stylize(content, styles, styles_dir=lib, **{**RUN, **kw})


def stock_img2img(scheduler_cls, content, seed, **sched_kwargs):
    """Stock diffusers img2img on separately loaded tiny weights: the reference for the no-style path."""
    from diffusers import StableDiffusionImg2ImgPipeline

    c = models.load_components("tiny", device="cpu")
    pipe = StableDiffusionImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=scheduler_cls.from_config(c.scheduler.config, **sched_kwargs), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="", image=content, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


# --- equality and reproducibility -----------------------------------------------------------------------

def test_same_seed_same_pixels_other_seed_differs(content, lib):
    a, b = run(content, lib, "lora_a"), run(content, lib, "lora_a")
    assert np.array_equal(px(a), px(b))
    assert differ(a, run(content, lib, "lora_a", seed=8)) > 1.0


@pytest.mark.parametrize("name,cls,kwargs", [
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("ddim", "DDIMScheduler", {}), ("euler", "EulerDiscreteScheduler", {})])
def test_no_style_equals_stock_img2img_pixel_exact(content, lib, name, cls, kwargs):
    import diffusers

    run(content, lib, ["lora_a", "dreambooth"], scheduler=name)  # the cached session now carries styles
    ours = run(content, lib, None, scheduler=name, strength=0.6, guidance=7.5)
    ref = stock_img2img(getattr(diffusers, cls), content, RUN["seed"], **kwargs)
    assert np.array_equal(px(ours), px(ref))


def test_scale_zero_equals_no_style_and_a_style_changes_the_output(content, lib):
    base = run(content, lib)
    assert np.array_equal(px(run(content, lib, "lora_a", scales=0.0)), px(base))
    for name in ("lora_a", "ti", "dreambooth"):
        assert differ(run(content, lib, name), base) > 1.0, name


def test_blend_two_loras(content, lib):
    a, b = run(content, lib, "lora_a"), run(content, lib, "lora_b")
    mix = run(content, lib, ["lora_a", "lora_b"], scales=[0.5, 0.5])
    assert differ(mix, a) > 0.5 and differ(mix, b) > 0.5
    assert np.array_equal(px(run(content, lib, ["lora_a", "lora_b"], scales=[1.0, 0.0])), px(a))
    assert np.array_equal(px(run(content, lib, ["lora_a", "lora_b"], scales=[0.0, 1.0])), px(b))


def test_dreambooth_swapped_in_and_restored(content, lib):
    base = run(content, lib)
    styled = run(content, lib, "dreambooth", prompt="")
    assert differ(styled, base) > 1.0
    assert np.array_equal(px(run(content, lib, "dreambooth", prompt="", scales=0.0)), px(base))
    assert np.array_equal(px(run(content, lib, None)), px(base))  # restored after switching back
    unet = get_session("tiny").comps.unet
    fresh = dreambooth.unet_parameters(models.build_reserved("tiny").unet)
    assert all(torch.equal(p, fresh[k]) for k, p in dreambooth.unet_parameters(unet).items() if k in fresh)
    assert np.array_equal(px(run(content, lib, "dreambooth", prompt="")), px(styled))  # and again, exactly


def test_textual_inversion_scale_interpolates_prompt_embeddings(content, lib):
    base = run(content, lib)
    full = run(content, lib, "ti", prompt="<tiny-style>")
    assert np.array_equal(px(run(content, lib, "ti", prompt="<tiny-style>", scales=0.0)), px(base))
    half = run(content, lib, "ti", prompt="<tiny-style>", scales=0.5)
    assert differ(half, base) > 0.5 and differ(half, full) > 0.5
    assert read_settings(run(content, lib, "ti"))["prompt"] == "a painting in the style of <tiny-style>"


def test_switching_styles_never_reloads_the_base(content, lib, monkeypatch):
    calls = {"base": 0, "lora": 0, "ti": 0, "db": 0}
    counted = {"base": (models, "load_components"), "lora": (lora, "load_lora"),
               "ti": (textual_inversion, "load_textual_inversion"), "db": (dreambooth, "load_dreambooth")}
    for key, (mod, attr) in counted.items():
        original = getattr(mod, attr)

        def counting(*a, _key=key, _orig=original, **k):
            calls[_key] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(mod, attr, counting)
    clear_sessions()
    for _ in range(2):
        for styles in (["lora_a"], ["lora_b"], ["ti"], ["dreambooth"], None, ["lora_a", "lora_b"], ["dreambooth"]):
            run(content, lib, styles)
    assert calls == {"base": 1, "lora": 2, "ti": 1, "db": 1}


# --- geometry, batches, masks ---------------------------------------------------------------------------

def test_output_has_the_content_size_and_batches_match_single_calls(lib):
    odd, tall = content_image(1, (101, 75)), content_image(2, (64, 96))
    outs = run([odd, tall], lib, "lora_a", size=64)
    assert [o.size for o in outs] == [(101, 75), (64, 96)]
    assert read_settings(outs[0])["working_size"] == [88, 64]  # short side 64, long side 101·64/75 → 88
    assert np.array_equal(px(outs[1]), px(run(tall, lib, "lora_a", size=64)))


def test_mask_keeps_content_pixels_exactly_outside_the_feathered_edge(content, lib):
    mask = Image.new("L", content.size, 0)
    mask.paste(255, (20, 16, 60, 48))
    out = run(content, lib, "lora_a", mask=mask, feather=2)
    weights = feather_mask(load_mask(mask, content.size), 2)
    outside = weights == 0
    assert outside.mean() > 0.4
    assert np.array_equal(px(out)[outside], px(content)[outside])
    inside = weights == 1
    assert np.abs(px(out)[inside] - px(content)[inside]).mean() > 1.0


def test_mask_of_another_size_is_resized_with_a_notice(content, lib):
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (10, 8, 30, 24))
    with pytest.warns(Notice, match="mask resized"):
        out = run(content, lib, "lora_a", mask=mask)
    assert out.size == content.size and np.array_equal(px(out)[:4, :4], px(content)[:4, :4])


# --- style strength, metadata ---------------------------------------------------------------------------

def test_style_strength_rule(content, lib):
    assert stylization_knobs(0.0) == (0.2, 0.0)
    assert stylization_knobs(0.5) == (0.5, 1.0)
    assert stylization_knobs(1.0) == (0.8, 1.0)
    one = run(content, lib, "lora_a", stylization=0.25)
    assert np.array_equal(px(one), px(run(content, lib, "lora_a", strength=0.35, scales=0.5)))
    with pytest.raises(UserError, match="not both"):
        run(content, lib, "lora_a", stylization=0.5, strength=0.5)


def test_png_metadata_and_no_silent_overwrite(content, lib, tmp_path):
    out = run(content, lib, ["lora_a", "lora_b"], scales=[0.3, 0.7], strength=0.5, scheduler="ddim")
    path = save_image(out, tmp_path / "o.png")
    s = read_settings(path)
    assert [(x["name"], x["method"], x["scale"]) for x in s["styles"]] == [("lora_a", "lora_style", 0.3),
                                                                          ("lora_b", "lora_style", 0.7)]
    assert (s["strength"], s["seed"], s["steps"], s["scheduler"], s["model"]) == (0.5, 7, STEPS, "ddim", "tiny")
    assert "Seed: 7" in Image.open(path).text["parameters"]
    with pytest.raises(UserError, match="--overwrite"):
        save_image(out, path)
    save_image(out, path, overwrite=True)


# --- txt2img ---------------------------------------------------------------------------------------------

def test_generate_with_a_subject_lora(lib):
    imgs = generate(styles="subject", styles_dir=lib, num_images=2, **RUN)
    assert len(imgs) == 2 and imgs[0].size == (64, 64) and differ(imgs[0], imgs[1]) > 1.0
    s = read_settings(imgs[1])
    assert s["prompt"] == "a photo of sks person" and s["batch_index"] == 1 and s["styles"][0]["name"] == "subject"
    plain = generate("a photo of sks person", styles_dir=lib, **RUN)
    assert differ(plain, imgs[0]) > 1.0
    assert np.array_equal(px(generate(styles="subject", styles_dir=lib, num_images=2, **RUN)[0]), px(imgs[0]))
    with pytest.raises(UserError, match="needs a prompt"):
        generate(styles="lora_a", styles_dir=lib, **RUN)


# --- style image, structure ------------------------------------------------------------------------------

def mean_colour(images):
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for im in images])


def test_nearest_style_uses_the_given_embedder(content, lib):
    from customgen.inference import nearest_style

    styles = StyleLibrary(lib).styles()
    red, blue = Image.new("RGB", (16, 16), (200, 40, 40)), Image.new("RGB", (16, 16), (40, 40, 200))
    assert nearest_style(red, [s for s in styles if s.name.startswith("lora")], embedder=mean_colour)[0].name == "lora_a"
    assert nearest_style(blue, [s for s in styles if s.name.startswith("lora")], embedder=mean_colour)[0].name == "lora_b"
    with pytest.warns(Notice, match="nearest library style lora_a"):
        out = run(content, lib, style_image=red, style_image_mode="nearest", embedder=mean_colour)
    assert np.array_equal(px(out), px(run(content, lib, "lora_a")))
    assert read_settings(out)["style_image"] == "nearest:lora_a"


def test_ip_adapter_style_image_on_tiny_and_unloaded_after(content, lib):
    before = run(content, lib, "lora_a")
    out = run(content, lib, "lora_a", style_image=content_image(9), style_image_mode="ip-adapter")
    assert differ(out, before) > 1.0 and read_settings(out)["style_image"] == "ip-adapter"
    assert np.array_equal(px(run(content, lib, "lora_a", style_image=content_image(9), style_image_mode="ip-adapter")),
                          px(out))
    assert np.array_equal(px(run(content, lib, "lora_a")), px(before))


def fake_session(kind="hub", cross_attention_dim=768):
    unet = types.SimpleNamespace(config=types.SimpleNamespace(cross_attention_dim=cross_attention_dim), dtype=torch.float32,
                                 device=torch.device("cpu"))
    return types.SimpleNamespace(comps=types.SimpleNamespace(kind=kind, unet=unet), extra={})


def test_hub_addons_offline_are_one_actionable_line():
    for call in (lambda: adapters.load_controlnet(fake_session(), "canny"),
                 lambda: adapters.ip_adapter_weights(fake_session()),
                 lambda: adapters.depth_map(fake_session(), content_image())):
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value) and "Internet" in str(err.value)
    assert not adapters.ip_adapter_available(fake_session())
    with pytest.raises(UserError, match="SD v1.5"):
        adapters.ip_adapter_weights(fake_session(cross_attention_dim=1024))


def test_structure_canny_controlnet_on_tiny(content, lib):
    plain = run(content, lib, "lora_a")
    guided = run(content, lib, "lora_a", structure="canny")
    assert differ(guided, plain) > 0.5
    assert np.array_equal(px(run(content, lib, "lora_a", structure="canny")), px(guided))
    assert read_settings(guided)["structure"] == "canny"
    assert np.array_equal(px(run(content, lib, "lora_a")), px(plain))
    with pytest.raises(UserError, match="depth estimator"):
        run(content, lib, "lora_a", structure="depth")


# --- inputs ------------------------------------------------------------------------------------------------

def test_library_resolves_folder_name_manifest_name_and_path(lib, tmp_path):
    other = make_lora(tmp_path / "lib" / "folder_x", name="Fancy Name", seed=31)
    library = StyleLibrary(tmp_path / "lib")
    assert library.resolve("folder_x").folder == library.resolve("Fancy Name").folder == other.resolve()
    assert library.resolve(str(lib / "ti")).kind.name == "textual_inversion"
    assert StyleLibrary(lib).names() == ["dreambooth", "lora_a", "lora_b", "subject", "ti"]


def _exif_rotated(path):
    img = content_image(3, (80, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: 64x80
    img.save(path, exif=exif)
    return path


@pytest.mark.parametrize("kind", ["cmyk", "16bit", "rgba", "exif"])
def test_awkward_content_formats_work(kind, lib, tmp_path):
    path = tmp_path / f"c.{'jpg' if kind in ('cmyk', 'exif') else 'png'}"
    if kind == "cmyk":
        content_image(4).convert("CMYK").save(path)
    elif kind == "16bit":
        arr = (np.asarray(content_image(4).convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(arr).save(path)
    elif kind == "rgba":
        rgba = content_image(4).convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path)
    else:
        _exif_rotated(path)
    out = run(str(path), lib, "lora_a")
    assert out.mode == "RGB" and out.size == ((64, 80) if kind == "exif" else (80, 64))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    make_lora(root / "wide_lora", cross_attention_dim=48, base_model="other-model", seed=40)
    make_textual_inversion(root / "wide_ti", dim=48, base_model="other-model")
    db = make_dreambooth(root / "wrong_db", seed=41)
    from safetensors.torch import save_file
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 48)},
              str(db / dreambooth.WEIGHTS))
    corrupt = make_lora(root / "corrupt_lora", seed=42)
    (corrupt / lora.WEIGHTS).write_bytes(b"\x00" * 64)
    bad_json = make_lora(root / "bad_json", seed=43)
    (bad_json / kinds.MANIFEST).write_text("{not json")
    (root / "text.png").write_text("this is not an image")
    return root


@pytest.mark.parametrize("kwargs,match", [
    (dict(content="missing.png"), "does not exist"),
    (dict(content="text.png"), "cannot use image"),
    (dict(styles="nope"), "available in .*wide_lora"),
    (dict(strength=1.5), "between 0 and 1"),
    (dict(strength=-0.1), "between 0 and 1"),
    (dict(styles="wide_lora"), "another base model"),
    (dict(styles="wide_ti"), "another base model"),
    (dict(styles="wrong_db"), "another base model|has shape"),
    (dict(styles="corrupt_lora"), "not a readable safetensors"),
    (dict(styles="bad_json"), "corrupt"),
    (dict(size=60), "multiple of 8"),
    (dict(scheduler="heun"), "unknown scheduler"),
    (dict(strength=0.05), "no denoising step"),
    (dict(styles=["wide_lora"], scales=[1, 2]), "2 style scales for 1 styles"),
])
def test_bad_inputs_are_one_line_user_errors(broken, kwargs, match):
    kwargs = dict(kwargs)
    target = kwargs.pop("content", None)
    content = str(broken / target) if target else content_image()
    with pytest.raises(UserError, match=match) as err:
        stylize(content, kwargs.pop("styles", None), styles_dir=broken, **{**RUN, **kwargs})
    assert "\n" not in str(err.value)


# --- CLI -------------------------------------------------------------------------------------------------

def test_cli_stylize_and_generate_write_pngs_with_settings(lib, tmp_path, capsys):
    src = tmp_path / "photo.png"
    content_image(5).save(src)
    out = tmp_path / "out"
    argv = ["stylize", "--content", str(src), "--model", "tiny", "--styles", str(lib), "--style", "lora_a",
            "--style", "lora_b", "--style-scale", "0.5", "--style-scale", "1.0", "--seed", "3", "--steps", "4",
            "--out", str(out)]
    assert main(argv) == 0
    written = out / "photo_lora-a-lora-b_s3.png"
    assert read_settings(written)["styles"][1] == {"name": "lora_b", "method": "lora_style", "kind": "lora", "scale": 1.0}
    capsys.readouterr()
    assert main(argv) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main(argv + ["--overwrite"]) == 0
    assert main(["generate", "--model", "tiny", "--styles", str(lib), "--style", "subject", "--seed", "1",
                 "--steps", "3", "--num-images", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("subject*.png")) == ["subject_s1_0.png", "subject_s1_1.png"]


@pytest.mark.parametrize("extra", [
    ["--content", "nope.png"], ["--content", "{src}", "--style", "missing"], ["--content", "{src}", "--strength", "2"],
    ["--content", "{src}", "--strength", "abc"], ["--content", "{src}", "--scheduler", "x"],
    ["--content", "{src}", "--structure", "depth"], ["--content", "{src}", "{src}", "--out", "{tmp}/one.png"],
])
def test_cli_bad_input_exits_2_with_one_line(extra, lib, tmp_path, capsys):
    src = tmp_path / "c.png"
    content_image(6).save(src)
    argv = ["stylize", "--model", "tiny", "--styles", str(lib), "--steps", "4", "--out", str(tmp_path / "o")]
    argv += [a.format(src=src, tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_cli_scheduler_names_match_the_package():
    assert request.SCHEDULERS == tuple(session_mod.SCHEDULERS)
    assert json.loads(json.dumps(list(session_mod.SCHEDULERS))) == ["dpm++", "ddim", "euler", "pndm", "ddpm", "lcm",
                                                                    "tcd"]


def test_an_artifact_written_before_the_kinds_registry_still_loads(tmp_path, content, lib):
    """style.json as the pre-registry code wrote it (no `exports` key) loads and gives the same pixels."""
    import shutil

    old = tmp_path / "old_lora"
    shutil.copytree(lib / "lora_a", old)
    data = json.loads((old / kinds.MANIFEST).read_text())
    data.pop("exports")
    (old / kinds.MANIFEST).write_text(json.dumps(data))
    assert np.array_equal(px(run(content, lib, str(old))), px(run(content, lib, "lora_a")))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_inference_gives_finite_non_black_images(content, lib, dtype):
    """What a T4 (fp16) or an A100 (bf16) runs: every kind of style, img2img and txt2img."""
    for styles in (None, ["lora_a"], ["ti"], ["dreambooth"], ["subject"]):
        out = px(run(content, lib, styles, dtype=dtype, device="cpu"))
        assert out.max() > 5 and out.std() > 1, (dtype, styles)  # not black, not flat
    img = generate("a photo of sks person", ["subject"], styles_dir=lib, model="tiny", steps=4, seed=0,
                   dtype=dtype, device="cpu")
    assert px(img).max() > 5 and px(img).std() > 1
    clear_sessions()  # the next test wants the fp32 model
