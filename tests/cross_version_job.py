"""One side of the cross-version round trip (tests/test_cross_version.py runs it under the newest and the
oldest supported transformers/diffusers/peft/accelerate):

    python tests/cross_version_job.py base  BASE            save the tiny model as a diffusers folder
    python tests/cross_version_job.py write BASE ARTIFACTS  write LoRA (UNet + text encoder), TI, DreamBooth
    python tests/cross_version_job.py render BASE OUT.npz ARTIFACTS...   pixels of each artifact, applied by customgen

The artifacts' weights come from seeded generators in sorted-name order, not from any library's initialiser,
so both versions write the same numbers and only the writing code differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from safetensors import safe_open

from customgen import kinds
from customgen.config import LORA_TARGETS, TEXT_ENCODER_TARGETS
from customgen.inference import clear_sessions, generate, get_session
from customgen.kinds import Manifest, dreambooth, lora, textual_inversion
from customgen.kinds.adapter_types import add_adapter
from customgen.models import load_components, save_pipeline

FACTS = {"name": "", "method": "dreambooth_lora_subject", "base_model": "", "resolution": 64, "steps": 1, "lr": 1e-4,
         "text_encoder_lr": 5e-5, "batch_size": 1, "seed": 0, "mixed_precision": "no", "optimizer": "adamw",
         "lr_scheduler": "constant", "num_images": 1, "tag_frequency": {}, "started_at": 0, "finished_at": 0}
PROMPTS = {"subject": "a photo of sks person", "ti": "a painting in the style of <xv-ti>", "dreambooth": "a painting"}


def fill(params: dict, seed: int, std: float) -> None:
    """Seeded values for `params` in sorted-name order (the same numbers whatever library built them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params):
            params[name].copy_(torch.randn(params[name].shape, generator=gen) * std)


def write(base: str, out: Path) -> None:
    c = load_components(base, device="cpu", dtype=torch.float32)
    add_adapter(c.unet, LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGETS)))
    add_adapter(c.text_encoder, LoraConfig(r=4, lora_alpha=4, target_modules=list(TEXT_ENCODER_TARGETS)))
    for model, seed in ((c.unet, 1), (c.text_encoder, 2)):
        names = {n.replace("text_model.", ""): p for n, p in model.named_parameters() if "lora_" in n}
        fill(names, seed, 0.3)
    (out / "subject").mkdir(parents=True)
    export = lora.save_lora(out / "subject", c.unet, c.text_encoder, facts={**FACTS, "name": "subject", "base_model": base})
    kinds.write_manifest(out / "subject", Manifest("subject", "dreambooth_lora_subject", "lora", base, lora.WEIGHTS,
                                                   prompt=PROMPTS["subject"], token="sks", rank=4, alpha=4.0,
                                                   text_encoder=True, exports=[export]))
    c = load_components(base, device="cpu", dtype=torch.float32)
    c.tokenizer.add_tokens(["<xv-ti>"])
    c.text_encoder.resize_token_embeddings(len(c.tokenizer))
    row = c.tokenizer.convert_tokens_to_ids(["<xv-ti>"])
    emb = c.text_encoder.get_input_embeddings().weight
    fill({"v": emb[row[0]]}, 3, 2.0)
    (out / "ti").mkdir()
    export = textual_inversion.save_textual_inversion(out / "ti", c.text_encoder, row, token="<xv-ti>", name="ti")
    kinds.write_manifest(out / "ti", Manifest("ti", "textual_inversion", "textual_inversion", base,
                                              textual_inversion.WEIGHTS, prompt=PROMPTS["ti"], token="<xv-ti>",
                                              exports=[export]))
    c = load_components(base, device="cpu", dtype=torch.float32)
    names = sorted(n for n, _ in c.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n)
    fill({n: dict(c.unet.named_parameters())[n] for n in names}, 4, 0.3)
    (out / "dreambooth").mkdir()
    dreambooth.save_dreambooth(out / "dreambooth", c.unet, names, scope="cross_attention")
    kinds.write_manifest(out / "dreambooth", Manifest("dreambooth", "dreambooth_style", "dreambooth", base,
                                                      dreambooth.WEIGHTS, prompt=PROMPTS["dreambooth"],
                                                      scope="cross_attention"))


def render(base: str, out: Path, folders: list[str]) -> None:
    arrays, names = {}, {}
    for folder in map(Path, folders):
        clear_sessions()  # TI styles share a token: a fresh base for each artifact set
        get_session(base, device="cpu")
        for style in ("subject", "ti", "dreambooth"):
            image = generate(PROMPTS[style], [str(folder / style)], model=base, steps=3, seed=7, size=64,
                             device="cpu")
            arrays[f"{folder.name}/{style}"] = np.asarray(image)
            manifest = kinds.read_manifest(folder / style)
            names[f"{folder.name}/{style}"] = {f: keys(folder / style / f) for f in [manifest.weights, *manifest.exports]}
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(names))


def keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "base":
        save_pipeline(load_components("tiny", device="cpu"), args[0])
    elif mode == "write":
        write(args[0], Path(args[1]))
    else:
        render(args[0], Path(args[1]), args[2:])
