"""Local ControlNet and IP-Adapter files on `tiny` (CPU, offline), written by the tests in their published layouts
(tests/addon_fixtures.py): pixels equal stock diffusers on the same files, every bad file is one line before the base
model loads, and nothing in a pickle runs. The few-step schedulers (lcm, tcd) equal stock pipelines too."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)

import customgen.models as models
from customgen.cli import main
from customgen.errors import UserError
from customgen.inference import adapters, clear_sessions, generate, read_settings, stylize
from customgen.inference.images import canny_edges
from customgen.inference.session import make_scheduler
from customgen.models.builders import CONFIGS
from tests.addon_fixtures import (seeded_controlnet, write_controlnet, write_ip_adapter, write_payload)
from tests.artifact_fixtures import content_image

STEPS = 10  # DPM-Solver++ at strength 0.6 → 6 denoising steps
RUN = dict(model="tiny", steps=STEPS, seed=7, prompt="")
STYLE_BLOCKS = {"up": {"block_1": 1.0}}  # InstantStyle: the image only into up_blocks.1 (what customgen sets)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every layout once: ControlNet .pth / .safetensors / folder; IP-Adapter .safetensors / .bin (h94's layout)."""
    clear_sessions()
    root = tmp_path_factory.mktemp("addons")
    net = seeded_controlnet("tiny", seed=3)
    out = {name: write_controlnet(root / name, net) for name in ("canny.pth", "canny.safetensors", "canny_folder")}
    out["ip"] = write_ip_adapter(root / "h94", "tiny", seed=5)
    out["ip_bin"] = write_ip_adapter(root / "h94_bin", "tiny", suffix=".bin", seed=5, encoder_bin=True)
    return out


def px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def stock_components():
    return models.load_components("tiny", device="cpu")  # separately loaded: stock shares nothing with the session


def stock_call(pipe, content, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="", image=content, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(RUN["seed"]), **kw).images[0]


# --- ControlNet -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["canny.pth", "canny.safetensors", "canny_folder"])
def test_local_controlnet_equals_stock_controlnet_img2img(files, name):
    content = content_image(0)  # 80x64: tiny's working size already
    ours = stylize(content, None, structure="canny", controlnet=str(files[name]), **RUN)
    path = files[name]
    net = (ControlNetModel.from_pretrained(str(path)) if path.is_dir()
           else ControlNetModel.from_single_file(str(path), config=str(CONFIGS / "tiny" / "controlnet")))
    c = stock_components()
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=net,
        scheduler=make_scheduler("dpm++", c.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref = stock_call(pipe, content, control_image=canny_edges(content), controlnet_conditioning_scale=1.0)
    assert np.array_equal(px(ours), px(ref))
    hub_stand_in = stylize(content, None, structure="canny", **RUN)  # tiny's own seeded ControlNet
    assert np.abs(px(ours) - px(hub_stand_in)).mean() > 0.5  # the file's weights were used
    assert read_settings(ours)["controlnet"] == str(path)


def test_local_controlnet_layouts_give_the_same_pixels(files):
    outs = [px(stylize(content_image(1), None, structure="canny", controlnet=str(files[n]), **RUN))
            for n in ("canny.pth", "canny.safetensors", "canny_folder")]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


# --- IP-Adapter -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ip", "ip_bin"])
def test_local_ip_adapter_equals_stock_load_ip_adapter(files, name):
    content, style = content_image(0), content_image(9)
    path = files[name]
    ours = stylize(content, None, style_image=style, style_image_mode="ip-adapter", ip_adapter=str(path), **RUN)
    c = stock_components()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=make_scheduler("dpm++", c.scheduler.config), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(path.parents[1]), subfolder="models", weight_name=path.name)  # + models/image_encoder
    pipe.set_ip_adapter_scale(STYLE_BLOCKS)
    ref = stock_call(pipe, content, ip_adapter_image=style)
    assert np.array_equal(px(ours), px(ref))
    plain = stylize(content, None, **RUN)
    assert np.abs(px(ours) - px(plain)).mean() > 0.5
    assert read_settings(ours)["ip_adapter"] == str(path)
    assert np.array_equal(px(stylize(content, None, **RUN)), px(plain))  # unloaded after the call


def test_ip_adapter_encoder_folder_option_and_auto_mode(files, tmp_path):
    import shutil

    path = files["ip"]
    moved = tmp_path / "encoder_elsewhere"
    shutil.copytree(path.parent / "image_encoder", moved)
    lone = tmp_path / "lone" / path.name
    lone.parent.mkdir()
    shutil.copy(path, lone)
    with pytest.raises(UserError, match="image_encoder/ beside ip-adapter_sd15.safetensors"):
        stylize(content_image(0), None, style_image=content_image(9), ip_adapter=str(lone), **RUN)
    kw = dict(style_image=content_image(9), **RUN)
    auto = stylize(content_image(0), None, ip_adapter=str(lone), image_encoder=str(moved), **kw)  # mode auto
    assert np.array_equal(px(auto), px(stylize(content_image(0), None, ip_adapter=str(path), **kw)))


# --- bad files: one line, before the base model loads --------------------------------------------------------------
@pytest.fixture()
def no_base_load(monkeypatch):
    """Fail the test if any base model loads (clear the cache so a load would be needed)."""
    clear_sessions()

    def refuse(*a, **k):
        raise AssertionError("the base model loaded before the add-on file was refused")
    monkeypatch.setattr(models, "load_components", refuse)


def _bad_files(root):
    """name → (request fields, message pattern)."""
    (root / "notes.txt").write_text("hello")
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    sdxl = write_controlnet(root / "sdxl_cn.safetensors", seeded_controlnet("tiny", cross_attention_dim=2048))
    sdxl_folder = write_controlnet(root / "sdxl_cn", seeded_controlnet("tiny", cross_attention_dim=2048))
    sd15 = write_ip_adapter(root / "sd15ip", "sd15")  # an SD v1.5 adapter on the tiny model: wrong widths
    sdxl_ip = write_ip_adapter(root / "sdxlip", "tiny", width=2048)
    cn, ip = dict(structure="canny"), dict(style_image=content_image(9))
    return {
        "missing": ({**cn, "controlnet": str(root / "nope.pth")}, "ControlNet .*nope.pth does not exist"),
        "empty": ({**cn, "controlnet": ""}, "empty ControlNet path"),
        "suffix": ({**cn, "controlnet": str(root / "notes.txt")}, "must be .safetensors or .pth"),
        "corrupt": ({**cn, "controlnet": str(root / "junk.safetensors")}, "not a readable weights file"),
        "sdxl": ({**cn, "controlnet": str(sdxl)}, "ControlNet for SDXL \\(cross-attention width 2048\\)"),
        "sdxl_folder": ({**cn, "controlnet": str(sdxl_folder)}, "ControlNet for SDXL"),
        "no_structure": ({"controlnet": str(sdxl)}, "needs a structure"),
        "ip_missing": ({**ip, "ip_adapter": str(root / "nope.bin")}, "IP-Adapter .*nope.bin does not exist"),
        "ip_sdxl": ({**ip, "ip_adapter": str(sdxl_ip)}, "IP-Adapter for SDXL \\(cross-attention width 2048\\)"),
        "ip_sd15_on_tiny": ({**ip, "ip_adapter": str(sd15)}, "IP-Adapter for SD v1.x .* tiny test model"),
        "ip_not_adapter": ({**ip, "ip_adapter": str(sdxl)}, "not an IP-Adapter"),
        "ip_no_image": ({"ip_adapter": str(sd15)}, "needs a style image"),
    }


def test_bad_addon_files_are_one_line_before_the_base_loads(tmp_path, no_base_load):
    for name, (fields, match) in _bad_files(tmp_path).items():
        with pytest.raises(UserError, match=match) as err:
            stylize(content_image(0), None, **{**RUN, **fields})
        assert "\n" not in str(err.value), name


@pytest.mark.parametrize("option,suffix", [("--controlnet", ".pth"), ("--ip-adapter", ".bin")])
def test_a_pickle_payload_never_runs_and_is_refused_in_one_line(tmp_path, capsys, no_base_load, option, suffix):
    marker = tmp_path / "ran.txt"
    evil = write_payload(tmp_path / f"evil{suffix}", marker)
    src = tmp_path / "c.png"
    content_image(0).save(src)
    style = ["--style-image", str(src)] if option == "--ip-adapter" else ["--structure", "canny"]
    code = main(["stylize", "--content", str(src), "--model", "tiny", "--out", str(tmp_path / "o"), option, str(evil),
                 *style])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "weights-only unpickler refuses" in err[0]
    assert not marker.exists()


def test_a_payload_in_the_image_encoder_folder_never_runs(files, tmp_path, no_base_load):
    import shutil

    folder = tmp_path / "enc"
    shutil.copytree(files["ip"].parent / "image_encoder", folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran.txt"
    write_payload(folder / "pytorch_model.bin", marker)
    with pytest.raises(UserError, match="weights-only unpickler refuses"):
        stylize(content_image(0), None, style_image=content_image(9), ip_adapter=str(files["ip"]),
                image_encoder=str(folder), **RUN)
    assert not marker.exists()


# --- few-step schedulers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
def test_few_step_schedulers_equal_stock_pipelines(name, cls):
    import diffusers

    content = content_image(0)
    c = stock_components()
    sched = getattr(diffusers, cls).from_config(c.scheduler.config)  # as diffusers' LCM/TCD docs build it
    common = dict(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=sched,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = stylize(content, None, **{**RUN, "steps": 4, "scheduler": name})
    img2img = StableDiffusionImg2ImgPipeline(**common)
    img2img.set_progress_bar_config(disable=True)
    ref = img2img(prompt="", image=content, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                  generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(px(ours), px(ref))
    ours = generate("a red house", None, model="tiny", steps=4, seed=3, scheduler=name, size=64)
    txt2img = StableDiffusionPipeline(**common)
    txt2img.set_progress_bar_config(disable=True)
    ref = txt2img("a red house", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(px(ours), px(ref))
    assert read_settings(ours)["scheduler"] == name


def test_few_step_schedulers_refuse_more_steps_than_their_schedule():
    with pytest.raises(UserError, match="at most 50 steps"):
        stylize(content_image(0), None, model="tiny", scheduler="lcm", steps=51)


# --- memory prediction -------------------------------------------------------------------------------------------
def test_addons_count_in_the_sampling_prediction_as_a_real_cpu_run_counts_them(files):
    """The fake-CUDA peak of one ControlNet + IP-Adapter img2img call: above the plain call's by at least the
    add-ons' weights, and within 5% of the same call counted on real CPU tensors (customgen.peak)."""
    from customgen.inference import get_session
    from customgen.models.addons import controlnet_file, ip_adapter_file
    from customgen.models.footprint import addon_shapes, sample_once, sampling_peak
    from customgen.peak import LiveBytes

    session = get_session("tiny")
    net = adapters.load_controlnet(session, "canny", controlnet_file(files["canny.pth"], "tiny"))
    ip = adapters.ip_adapter_weights(session, ip_adapter_file(files["ip"], None, "tiny"))
    kw = dict(kind="img2img", size=(64, 80), batch=2, dtype=torch.float32)
    plain = sampling_peak(session.comps, **kw)
    fake = sampling_peak(session.comps, **kw, addons=addon_shapes(net, ip))
    weights = sum(p.numel() * 4 for m in (net, ip[1]) for p in m.parameters())
    weights += sum(t.numel() * 4 for d in ip[0].values() for t in d.values())
    assert fake - plain >= weights
    comps = stock_components()
    with LiveBytes("cpu") as live, torch.no_grad():
        live.add_all(comps.unet, comps.vae, comps.text_encoder, net, ip[1])
        for t in (t for d in ip[0].values() for t in d.values()):
            live.add(t)
        sample_once(comps, kind="img2img", size=(64, 80), batch=2, controlnet=net, ip_adapter=ip)
    assert fake == pytest.approx(live.peak, rel=0.05)
    assert sampling_peak(session.comps, **kw, addons=addon_shapes(net, None)) < fake  # each part counts


# --- demo -------------------------------------------------------------------------------------------------------------
def test_demo_uses_the_local_files_as_stylize_does(files, tmp_path):
    from customgen import demo

    content, style = tmp_path / "c.png", tmp_path / "s.png"
    content_image(0).save(content)
    content_image(9).save(style)
    local = demo.LocalAddons(str(files["canny.safetensors"]), "canny", str(files["ip"]))
    state = demo.DemoState("tiny", str(tmp_path), "cpu", None, demo.MAX_PIXELS, addons=local)
    assert "ControlNet (canny)" in state.addons.describe() and "IP-Adapter" in state.addons.describe()
    path, _, settings = demo.stylize_handler(state, str(content), demo.NONE, None, "auto", None, 0.7, 4, 7, "canny")
    assert settings["controlnet"] == str(files["canny.safetensors"]) and settings["ip_adapter"] is None
    same = stylize(str(content), None, model="tiny", stylization=0.7, steps=4, seed=7, structure="canny",
                   controlnet=str(files["canny.safetensors"]))
    assert np.array_equal(px(demo.load_content(path)), px(same))
    path, _, settings = demo.stylize_handler(state, str(content), demo.NONE, str(style), "auto", None, 0.7, 4, 7, "none")
    assert settings["ip_adapter"] == str(files["ip"]) and settings["style_image"] == "ip-adapter"
    same = stylize(str(content), None, model="tiny", stylization=0.7, steps=4, seed=7, style_image=str(style),
                   ip_adapter=str(files["ip"]))
    assert np.array_equal(px(demo.load_content(path)), px(same))


def test_demo_refuses_a_bad_file_in_one_line_before_loading(tmp_path, capsys, no_base_load):
    sdxl = write_controlnet(tmp_path / "sdxl.safetensors", seeded_controlnet("tiny", cross_attention_dim=2048))
    for extra, match in ((["--controlnet", str(sdxl)], "for SDXL"),
                         (["--ip-adapter", str(tmp_path / "none.bin")], "does not exist"),
                         (["--image-encoder", str(tmp_path)], "only with --ip-adapter")):
        assert main(["demo", "--model", "tiny", "--styles", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


# --- evaluate -----------------------------------------------------------------------------------------------------
def eval_argv(env, out, *extra):
    sets = {"eval.styles": env["styles"], "eval.content_root": env["coco"], "eval.style_root": env["wikiart"],
            "eval.output": out, "eval.steps": 2, "eval.size": 64, "eval.strength": 0.5, "eval.min_size": 32,
            "eval.methods": "[lora_style]", "eval.max_contents": 2}
    return ["evaluate", "configs/eval.yaml", "--model", "tiny",
            *[a for kv in [f"{k}={v}" for k, v in sets.items()] + list(extra) for a in ("--set", kv)]]


def test_evaluate_takes_the_local_files_from_its_config(files, tmp_path_factory):
    """eval.structure + eval.controlnet guide every point (the baseline too); eval.ip_adapter adds an ip-adapter row
    per reference style (its style image: the style's first reference image), scored like the others."""
    import pandas as pd

    from tests.eval_fixtures import shared_eval_env

    env, out = shared_eval_env(tmp_path_factory), tmp_path_factory.mktemp("eval_addons") / "results"
    cn, ip = files["canny_folder"], files["ip"]
    assert main(eval_argv(env, out, "eval.structure=canny", f"eval.controlnet={cn}", f"eval.ip_adapter={ip}")) == 0
    rows = pd.read_csv(out / "metrics.csv")
    assert sorted(rows["model"]) == ["baseline", "ip-adapter@Impressionism", "lora_impressionism"]
    ip_row = rows[rows["method"] == "ip-adapter"].iloc[0]
    assert ip_row["style"] == "Impressionism" and ip_row["n_images"] == 2 and np.isfinite(ip_row["clip_style"])
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        s = read_settings(png)
        assert (s["structure"], s["controlnet"]) == ("canny", str(cn))
        assert s["ip_adapter"] == (str(ip) if "ip-adapter@" in str(png) else None)
    # an IP-Adapter image is stylize with the style's first reference image, the evaluation's settings otherwise
    from customgen.cli import build_parser, load_cli_config
    from customgen.evaluate.generate import output_names
    from customgen.evaluate.inputs import load_styles, resolve_inputs

    cfg = load_cli_config(build_parser().parse_args(eval_argv(env, out, "eval.structure=canny",
                                                              f"eval.controlnet={cn}", f"eval.ip_adapter={ip}")))
    inputs = resolve_inputs(cfg, load_styles(cfg.eval.styles, cfg.eval.methods))
    content = inputs.contents[0]
    png = next((out / "images" / "ip-adapter@Impressionism").rglob(output_names(inputs.contents)[content]))
    req = cfg.eval.request("tiny").replace(style_image=str(inputs.references["Impressionism"][0]),
                                           style_image_mode="ip-adapter", ip_adapter=str(ip))
    assert np.array_equal(px(Image.open(png).convert("RGB")), px(stylize(str(content), None, req)))


def test_evaluate_refuses_a_bad_local_file_before_anything_loads(files, tmp_path, capsys, no_base_load,
                                                                 tmp_path_factory):
    from tests.eval_fixtures import shared_eval_env

    env = shared_eval_env(tmp_path_factory)
    cases = ((["eval.structure=canny", f"eval.controlnet={tmp_path / 'nope.pth'}"], "eval.controlnet: ControlNet"),
             ([f"eval.controlnet={files['canny.pth']}"], "eval.controlnet needs eval.structure"),
             ([f"eval.ip_adapter={files['canny.pth']}"], "eval.ip_adapter: "),
             ([f"eval.image_encoder={tmp_path}"], "only with eval.ip_adapter"))
    for extra, match in cases:
        assert main(eval_argv(env, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not (tmp_path / "out" / "images").exists()
