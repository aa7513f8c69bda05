"""Parameter counts of a model reference, so README/docs tables come from a command, not guesses."""
from __future__ import annotations

import torch.nn as nn

from customgen.config import LORA_TARGETS
from customgen.models.builders import Components


def _count(named) -> int:
    return sum(p.numel() for _, p in named)


def _attn_projection_params(unet, attn: tuple[str, ...]) -> int:
    """Parameters of the q/k/v/out projections inside the given attention layers (attn1 / attn2)."""
    total = 0
    for name, p in unet.named_parameters():
        parts = name.split(".")
        if any(a in parts for a in attn) and any(f".{t}." in f".{name}" for t in LORA_TARGETS):
            total += p.numel()
    return total


def lora_parameter_count(unet, *, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """LoRA parameters for `rank` on every Linear named in `targets`: r·(in + out) per layer."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def unet_breakdown(unet, *, rank: int = 4) -> dict:
    """UNet counts: total, attention projections (attn1+attn2), cross-attention only, transformer blocks, LoRA."""
    blocks = [p for n, p in unet.named_parameters() if ".transformer_blocks." in n]
    return {
        "total": _count(unet.named_parameters()),
        "attention_projections": _attn_projection_params(unet, ("attn1", "attn2")),
        "cross_attention_projections": _attn_projection_params(unet, ("attn2",)),
        "transformer_blocks": sum(p.numel() for p in blocks),
        "lora_rank": rank,
        "lora": lora_parameter_count(unet, rank=rank),
        "lora_bytes_fp32": 4 * lora_parameter_count(unet, rank=rank),
        "lora_bytes_fp16": 2 * lora_parameter_count(unet, rank=rank),
    }


def inspect_components(comps: Components, *, rank: int = 4) -> dict:
    """Components, classes and parameter counts (the `customgen inspect` report)."""
    te = comps.text_encoder
    return {
        "ref": comps.ref,
        "kind": comps.kind,
        "unet": {"class": type(comps.unet).__name__, **unet_breakdown(comps.unet, rank=rank)},
        "vae": {"class": type(comps.vae).__name__, "total": _count(comps.vae.named_parameters()),
                "scaling_factor": comps.vae.config.scaling_factor},
        "text_encoder": {"class": type(te).__name__, "total": _count(te.named_parameters()),
                         "token_embedding": te.get_input_embeddings().weight.numel()},
        "tokenizer": {"class": type(comps.tokenizer).__name__, "vocab_size": len(comps.tokenizer),
                      "max_length": comps.tokenizer.model_max_length},
        "noise_scheduler": type(comps.noise_scheduler).__name__,
        "scheduler": type(comps.scheduler).__name__,
    }


def format_report(report: dict) -> str:
    """Human-readable lines for `customgen inspect`."""
    u, v, t = report["unet"], report["vae"], report["text_encoder"]
    r = u["lora_rank"]
    rows = [
        f"model {report['ref']} ({report['kind']})",
        f"unet          {u['class']:<26} {u['total']:>14,} params",
        f"  attention projections (attn1+attn2 q/k/v/out) {u['attention_projections']:>14,}",
        f"  cross-attention projections (attn2)           {u['cross_attention_projections']:>14,}",
        f"  transformer blocks                            {u['transformer_blocks']:>14,}",
        f"  LoRA rank {r} on to_q/to_k/to_v/to_out.0       {u['lora']:>14,}  "
        f"({u['lora_bytes_fp16'] / 2**20:.2f} MiB fp16, {u['lora_bytes_fp32'] / 2**20:.2f} MiB fp32)",
        f"vae           {v['class']:<26} {v['total']:>14,} params (scaling factor {v['scaling_factor']})",
        f"text_encoder  {t['class']:<26} {t['total']:>14,} params",
        f"tokenizer     {report['tokenizer']['class']:<26} {report['tokenizer']['vocab_size']:>14,} tokens",
        f"schedulers    train {report['noise_scheduler']}, inference {report['scheduler']}",
    ]
    return "\n".join(rows)
