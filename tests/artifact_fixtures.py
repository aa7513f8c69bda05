"""Artifacts made with stock tools on the `tiny` model, for inference tests and notebook smoke runs.

Training code is not needed: LoRA = peft adapter with random lora_B; Textual Inversion = a random embedding
row for a new token; DreamBooth = perturbed attention weights. Each is saved with customgen.kinds and a
style.json, exactly the folder layout `customgen train` writes.
"""
from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import torch
from packaging.version import Version
from PIL import Image

from customgen import kinds
from customgen.kinds import dreambooth, lora, textual_inversion
from customgen.kinds.adapter_types import add_adapter
from customgen.kinds import Manifest
from customgen.config import TEXT_ENCODER_TARGETS
from customgen.models import load_components
from peft.tuners.tuners_utils import BaseTunerLayer
from tests.tolerance import gamma

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def stock_reads_kohya_text_encoder(text_encoder) -> bool:
    """Whether this diffusers' `load_lora_weights` reads an SD1 kohya file's `lora_te_` keys into this text encoder:
    before 0.42 its converter needs CLIPTextModel's `text_model.` level, which transformers 5.15 and later removed
    (IndexError in utils/peft_utils.py on Colab's diffusers 0.39 + transformers 5.15; docs/interop.md)."""
    return Version(diffusers.__version__) >= Version("0.42") or hasattr(text_encoder, "text_model")


def facts(name: str, **changes) -> dict:
    """Training facts as train/run.py passes them to a kind's save (kohya metadata of LoRA exports)."""
    return {"name": name, "method": "lora_style", "base_model": "tiny", "resolution": 64, "steps": 0, "lr": 1e-4,
            "text_encoder_lr": 5e-5, "batch_size": 1, "seed": 0, "mixed_precision": "no", "optimizer": "adamw",
            "lr_scheduler": "constant", "num_images": 0, "tag_frequency": {}, "started_at": 0, "finished_at": 0,
            **changes}


def _tiny():
    return load_components("tiny", device="cpu")


def _samples(folder: Path, color) -> None:
    """Reference images in samples/ (what training writes), a solid colour per style for nearest-style tests."""
    if color is not None:
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), tuple(color)).save(folder / "samples" / "sample_0.png")


def _manifest(folder: Path, **fields) -> Path:
    kinds.write_manifest(folder, Manifest(**fields))
    return folder


def make_lora(folder: str | Path, *, name: str | None = None, seed: int = 1, rank: int = 4, alpha: float = 4,
              text_encoder: bool = False, cross_attention_dim: int | None = None, method: str = "lora_style",
              prompt: str = "", token: str = "", base_model: str = "tiny", color=None, std: float = 0.5) -> Path:
    """A LoRA style/subject on tiny (or on a tiny variant with another cross-attention width)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # peft's gaussian init draws from the global RNG
        torch.manual_seed(seed)
        export = _lora_weights(folder, seed, rank, alpha, text_encoder, cross_attention_dim, std)
    _samples(folder, color)
    return _manifest(folder, name=name or folder.name, method=method, kind="lora", base_model=base_model,
                     weights=lora.WEIGHTS, exports=[export], prompt=prompt, token=token, rank=rank, alpha=alpha,
                     text_encoder=text_encoder, resolution=64)


def _lora_weights(folder: Path, seed: int, rank: int, alpha: float, text_encoder: bool,
                  cross_attention_dim: int | None, std: float) -> str:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    comps = _tiny()
    unet = comps.unet
    if cross_attention_dim is not None:  # "another base model": same blocks, different text width
        unet = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": cross_attention_dim})
    add_adapter(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    te = comps.text_encoder if text_encoder else None
    if te is not None:
        add_adapter(te, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TEXT_ENCODER_TARGETS),
                                     init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    for model in filter(None, (unet, te)):
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero (no effect): randomise it so the style changes outputs
                p.data = torch.randn(p.shape, generator=gen) * std
    return lora.save_lora(folder, unet, te, facts=facts(folder.name))


def make_textual_inversion(folder: str | Path, *, name: str | None = None, token: str = "<tiny-style>",
                           seed: int = 2, n_vectors: int = 1, prompt: str | None = None, dim: int | None = None,
                           base_model: str = "tiny", color=None) -> Path:
    """A Textual Inversion style: a new token with random vector(s) (width `dim` to fake another base model)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comps = _tiny()
    gen = torch.Generator().manual_seed(seed)
    exports = []
    if dim is not None:
        save_file({token: torch.randn(n_vectors, dim, generator=gen)}, str(folder / textual_inversion.WEIGHTS))
    else:
        tokens = [token] + [f"{token}_{i}" for i in range(1, n_vectors)]
        comps.tokenizer.add_tokens(tokens)
        comps.text_encoder.resize_token_embeddings(len(comps.tokenizer))
        ids = comps.tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            weight = comps.text_encoder.get_input_embeddings().weight
            weight[ids] = torch.randn(len(ids), weight.shape[1], generator=gen) * 2.0
        exports.append(textual_inversion.save_textual_inversion(folder, comps.text_encoder, ids, token=token,
                                                                 name=folder.name))
    _samples(folder, color)
    return _manifest(folder, name=name or folder.name, method="textual_inversion", kind="textual_inversion",
                     base_model=base_model, weights=textual_inversion.WEIGHTS, exports=exports, token=token,
                     prompt=f"a painting in the style of {token}" if prompt is None else prompt, resolution=64)


def make_dreambooth(folder: str | Path, *, name: str | None = None, seed: int = 3, scope: str = "attention",
                    std: float = 0.3, prompt: str = "a painting in sks style", base_model: str = "tiny",
                    color=None) -> Path:
    """A DreamBooth style: the tiny UNet's attention projections perturbed, saved as the trained subset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = _tiny().unet
    names = [n for n, _ in unet.named_parameters() if ".attn" in n and n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v")]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(unet.named_parameters())
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=gen) * std)
    dreambooth.save_dreambooth(folder, unet, names, scope=scope)
    _samples(folder, color)
    return _manifest(folder, name=name or folder.name, method="dreambooth_style", kind="dreambooth",
                     base_model=base_model, weights=dreambooth.WEIGHTS, prompt=prompt, token="sks",
                     scope=scope, resolution=64)


def make_library(root: str | Path) -> dict[str, Path]:
    """A style library on tiny: two LoRA styles, a TI style, a DreamBooth style and a subject LoRA."""
    root = Path(root)
    return {
        "lora_a": make_lora(root / "lora_a", seed=11, color=(220, 30, 30)),
        "lora_b": make_lora(root / "lora_b", seed=12, alpha=8, color=(30, 30, 220)),
        "ti": make_textual_inversion(root / "ti", seed=13),
        "dreambooth": make_dreambooth(root / "dreambooth", seed=14),
        "subject": make_lora(root / "subject", seed=15, method="dreambooth_lora_subject", token="sks",
                             prompt="a photo of sks person", text_encoder=True),
    }


def content_image(seed: int = 0, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """A smooth random colour field with an edge or two (canny has something to find)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((5, 5, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)).copy()
    img[size[1] // 3: size[1] // 2, size[0] // 4: size[0] // 2] = 255  # a white bar: sharp edges
    return Image.fromarray(img)


def make_contents(folder: str | Path, n: int = 2, size: tuple[int, int] = (80, 64)) -> Path:
    """n content PNGs in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        content_image(100 + i, size).save(folder / f"content_{i}.png")
    return folder


def lora_deltas(pipe) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """(scaling, B, A), the factors in float64, of every peft LoRA layer of a pipeline's UNet and text encoder."""
    out = {}
    for component in ("unet", "text_encoder"):
        for name, m in getattr(pipe, component).named_modules():
            if isinstance(m, BaseTunerLayer) and getattr(m, "lora_A", None):
                (adapter,) = m.lora_A.keys()
                out[f"{component}.{name}"] = (m.scaling[adapter], m.lora_B[adapter].weight.detach().double(),
                                              m.lora_A[adapter].weight.detach().double())
    return out


def assert_same_lora(pipe, reference) -> None:
    """The same LoRA layers, each ΔW = s·B·A equal to the reference's within the rounding a loader may add by
    folding alpha/rank into the factors: ≤ 2 roundings per factor and 1 for s, γ_5 a side (Higham 2002, §3.1)."""
    got, want = lora_deltas(pipe), lora_deltas(reference)
    assert got.keys() == want.keys() and want
    for name, (s, up, down) in want.items():
        g_s, g_up, g_down = got[name]
        size = abs(s) * (up.abs() @ down.abs())
        bound = (2 * gamma(5, torch.float32) + 2 * gamma(down.shape[0], torch.float64)) * size
        assert ((g_s * g_up @ g_down - s * up @ down).abs() <= bound).all(), name
