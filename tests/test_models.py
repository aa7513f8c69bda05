"""Model references: tiny / sd15-random built offline, stock pipelines, loaders up to the network boundary."""
import pickle
import time
import warnings

import pytest
import torch
from PIL import Image

from customgen.errors import Notice, UserError
from customgen.memory import P100_FIX, check_cuda_arch, probe
from customgen.models import build_reserved, load_components, load_pipeline, resolve_ref
from customgen.models import loading
from customgen.models.inspect import LORA_TARGETS, inspect_components, lora_parameter_count


def test_tiny_is_sd15_shaped():
    c = build_reserved("tiny")
    names = [n for n, _ in c.unet.named_modules()]
    for proj in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k"):
        assert any(n.endswith(proj) for n in names), proj
    assert type(c.unet.down_blocks[0]).__name__ == "CrossAttnDownBlock2D"
    assert type(c.unet.up_blocks[-1]).__name__ == "CrossAttnUpBlock2D"
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    assert c.vae.config.scaling_factor == 0.18215  # the config value itself
    assert 2 ** (len(c.vae.config.block_out_channels) - 1) == 8  # SD's VAE downsampling factor
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    assert c.noise_scheduler.config.num_train_timesteps == 1000


def test_tiny_is_deterministic_and_leaves_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_reserved("tiny")
    after = torch.rand(1)
    b = build_reserved("tiny")
    assert torch.equal(before, after)
    for (n, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), n
    assert torch.equal(a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight)


def test_tiny_tokenizer_takes_new_tokens():
    c = build_reserved("tiny")
    n = len(c.tokenizer)
    assert c.tokenizer.add_tokens(["<cubism>"]) == 1
    ids = c.tokenizer("a <cubism> painting").input_ids
    assert n in ids and ids[0] == c.tokenizer.bos_token_id and ids[-1] == c.tokenizer.eos_token_id
    c.text_encoder.resize_token_embeddings(len(c.tokenizer))
    out = c.text_encoder(torch.tensor([ids]))[0]
    assert out.shape == (1, len(ids), 32)


def test_sd15_random_counts_are_exact():
    c = build_reserved("sd15-random", meta=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(c.unet) == 859_520_964
    assert count(c.vae) == 83_653_863
    assert count(c.text_encoder) == 123_060_480
    assert len(c.tokenizer) == 49408


def test_sd15_tokenizer_matches_open_clip():
    import open_clip

    tok = build_reserved("sd15-random", meta=True).tokenizer
    for text in ["a photo of sks person", "Analytical Cubism, oil on canvas!", "naïve café 123"]:
        ref = [t for t in open_clip.tokenize([text])[0].tolist() if t != 0]
        assert tok(text).input_ids == ref


def _timed(fn, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_tiny_is_fast_enough_for_cpu_tests():
    c = load_components("tiny", device="cpu")
    pipe = load_pipeline(c, kind="img2img")
    img = Image.new("RGB", (64, 64), (120, 80, 40))
    run = lambda: pipe(prompt="", image=img, strength=1.0, num_inference_steps=4, guidance_scale=7.5)  # noqa: E731
    assert _timed(run) < 1.0
    params = [p for n, p in c.unet.named_parameters() if "to_q" in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = c.tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids

    def step():
        with torch.no_grad():
            latents = c.vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.sample() * c.vae.config.scaling_factor
            cond = c.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        pred = c.unet(c.noise_scheduler.add_noise(latents, noise, t), t, cond).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad()

    assert _timed(step) < 1.0


@pytest.mark.parametrize("kind,cls", [("txt2img", "StableDiffusionPipeline"),
                                      ("img2img", "StableDiffusionImg2ImgPipeline"),
                                      ("inpaint", "StableDiffusionInpaintPipeline")])
def test_load_pipeline_gives_stock_pipelines_without_safety_checker(kind, cls):
    pipe = load_pipeline("tiny", kind=kind, device="cpu")
    assert type(pipe).__name__ == cls
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32  # fp32 on CPU


def test_unknown_pipeline_kind():
    with pytest.raises(UserError, match="choose from"):
        load_pipeline("tiny", kind="video")


def test_local_folder_roundtrip(tmp_path):
    pipe = load_pipeline("tiny", kind="txt2img", device="cpu")
    pipe.save_pretrained(tmp_path / "model")
    assert resolve_ref(tmp_path / "model").kind == "local"
    c = load_components(str(tmp_path / "model"), device="cpu")
    for (n, p), q in zip(pipe.unet.state_dict().items(), c.unet.state_dict().values()):
        assert torch.equal(p, q), n
    assert len(c.tokenizer) == len(pipe.tokenizer)
    meta = load_components(str(tmp_path / "model"), meta=True)  # architecture only, as `inspect` does
    assert sum(p.numel() for p in meta.unet.parameters()) == sum(p.numel() for p in c.unet.parameters())


def test_hub_offline_fails_fast_with_one_actionable_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_components("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    assert time.perf_counter() - t < 10
    msg = str(err.value)
    assert "\n" not in msg and "Internet" in msg and "/kaggle/input" in msg


def test_runwayml_alias_warns_once_and_maps():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = resolve_ref("runwayml/stable-diffusion-v1-5")
    assert ref == loading.ModelRef("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    notices = [w for w in caught if issubclass(w.category, Notice)]
    assert len(notices) == 1 and "deleted" in str(notices[0].message)


@pytest.mark.parametrize("ref,match", [("/no/such/model.safetensors", "does not exist"),
                                       ("not a hub id", "neither"),
                                       ("a/b/c", "neither")])
def test_bad_references(ref, match):
    with pytest.raises(UserError, match=match):
        resolve_ref(ref)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_ref(tmp_path)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_ckpt_goes_through_a_safe_loader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(UserError):
        load_components(str(path), device="cpu")
    assert not (tmp_path / "PWNED").exists()


def test_single_file_uses_stock_loader_with_offline_sd15_config(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return load_pipeline("tiny", kind="txt2img", device="cpu")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"0")
    c = load_components(str(f), device="cpu")
    assert c.kind == "single-file" and seen["path"] == str(f)
    assert seen["safety_checker"] is None
    cfg = loading.sd15_config_dir()
    assert seen["config"] == str(cfg)
    assert (cfg / "model_index.json").is_file()
    from transformers import CLIPTokenizer

    assert len(CLIPTokenizer.from_pretrained(str(cfg), subfolder="tokenizer")) == 49408


def test_probe_cpu_is_fp32():
    info = probe("cpu")
    assert info.dtype == torch.float32 and info.device == "cpu"
    assert probe("cpu", "fp16").dtype == torch.float16
    with pytest.raises(UserError, match="unknown dtype"):
        probe("cpu", "fp8")


def test_p100_without_sm60_kernels_gets_the_fix():
    kaggle_default = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    with pytest.raises(UserError) as err:
        check_cuda_arch((6, 0), kaggle_default)
    assert str(err.value) == P100_FIX and "T4" in P100_FIX
    check_cuda_arch((7, 5), kaggle_default)  # T4 fine
    check_cuda_arch((6, 0), ["sm_50", "sm_60", "sm_70"])  # an older build with sm_60 is fine


def test_inspect_lora_count_matches_peft():
    from peft import LoraConfig

    c = build_reserved("tiny")
    report = inspect_components(c, rank=4)
    c.unet.requires_grad_(False)
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGETS)))
    trainable = sum(p.numel() for p in c.unet.parameters() if p.requires_grad)
    assert report["unet"]["lora"] == trainable == lora_parameter_count(build_reserved("tiny").unet, rank=4)
    assert report["unet"]["cross_attention_projections"] < report["unet"]["attention_projections"]
    assert report["unet"]["attention_projections"] < report["unet"]["transformer_blocks"] < report["unet"]["total"]


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_offline_config_folder_holds_the_tokenizer_files_transformers_4_reads(name, tmp_path, monkeypatch):
    """The weightless folder single files load through is cached in ~/.cache and shared by every venv of the
    machine: written under transformers 5 (tokenizer.json only), transformers 4's CLIPTokenizer could not read
    it. A folder an older customgen left without vocab.json/merges.txt is rebuilt."""
    monkeypatch.setenv("HOME", str(tmp_path))
    out = loading.config_dir(name)
    assert out.is_relative_to(tmp_path)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / "tokenizer" / f).is_file(), f
    (out / "tokenizer" / "vocab.json").unlink()  # what a transformers-5 save left before the fix
    assert (loading.config_dir(name) / "tokenizer" / "vocab.json").is_file()
