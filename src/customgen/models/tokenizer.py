"""CLIP tokenizers built offline: the tiny byte-level one shipped here, and SD v1.5's real one.

SD v1.5's tokenizer is OpenAI CLIP's BPE. open_clip ships its merges file
(`bpe_simple_vocab_16e6.txt.gz`); CLIP's vocabulary is derived from it exactly as OpenAI's
SimpleTokenizer does (256 byte symbols, the same with `</w>`, one token per merge, two specials),
which gives the 49,408-token vocabulary of `openai/clip-vit-large-patch14`.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_MERGES = 49152 - 256 - 2  # merges used by CLIP (OpenAI SimpleTokenizer)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip.tokenizer as oct  # lazy: open_clip (and its BPE file) only for SD v1.5's tokenizer

    bpe = Path(oct.default_bpe())
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1 : CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def sd15_tokenizer() -> CLIPTokenizer:
    """SD v1.5's CLIP tokenizer (49,408 tokens, max length 77), rebuilt from open_clip's BPE file."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """The tiny model's byte-level CLIP tokenizer (no merges: each character is a token)."""
    return CLIPTokenizer.from_pretrained(str(folder))
