"""The model family a file was made for, guessed from its key names and layer widths.

    SDXL   `lora_te1_`/`lora_te2_` (two text encoders), `text_encoder_2.`, `clip_g`, `conditioner.embedders.`,
           several transformer blocks per attention, 2048-wide cross-attention, a 1280-wide text encoder
    SD2    1024-wide cross-attention and text encoder (OpenCLIP ViT-H), `cond_stage_model.model.`
    SD3    MMDiT joint blocks (`joint_blocks`, `context_block`, `add_q_proj`)
    Flux   `double_blocks` / `single_blocks` / `single_transformer_blocks`
    SD1    768-wide cross-attention and text encoder (CLIP ViT-L/14): SD v1.x, the family customgen works with
A width that no family has (the `tiny` test model's 32) is no evidence: the layers' shapes are checked against the
model itself when the file is applied.
"""
from __future__ import annotations

import re

NAMES = {"sd1": "SD v1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}
KEY_MARKS = (  # (family, pattern on any key, what it is)
    ("flux", r"double_blocks|single_blocks|single_transformer_blocks", "Flux double/single blocks"),
    ("sd3", r"joint_blocks|context_block|add_q_proj", "SD3 joint blocks"),
    ("sdxl", r"^lora_te[12]_|^text_encoder_2\.|^conditioner\.embedders\.|^clip_g$", "SDXL's two text encoders"),
    ("sdxl", r"transformer_blocks[._][1-9]", "several transformer blocks per attention (SDXL)"),
    ("sdxl", r"(^|\.)(add_embedding|label_emb)[._]", "SDXL's added conditioning"),
    ("sd2", r"^cond_stage_model\.model\.", "SD2's OpenCLIP text encoder"),
)
CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 4096: "sd3"}  # cross-attention key/value input width
TEXT_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl"}  # text-encoder width (embeddings, text-encoder layers)


def guess(keys: list[str], *, cross_width: int | None = None, text_width: int | None = None) -> tuple[str, str]:
    """(family, the evidence): key names first, then widths; SD1 when nothing points elsewhere."""
    for family, pattern, what in KEY_MARKS:
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit is not None:
            return family, f"{what}: key {hit}"
    if cross_width in CROSS_WIDTH:
        return CROSS_WIDTH[cross_width], f"{cross_width}-wide cross-attention"
    if text_width in TEXT_WIDTH:
        return TEXT_WIDTH[text_width], f"{text_width}-wide text encoder"
    return "sd1", "SD v1 layer names"


def refusal(path, what: str, family: str, evidence: str) -> str | None:
    """One line refusing a file made for another family (None for SD1)."""
    if family == "sd1":
        return None
    return (f"{path}: {what} for {NAMES.get(family, family)} ({evidence}); customgen works with SD v1.x models "
            "(SD v1.5 and its fine-tunes): use a file made for SD 1.5")
