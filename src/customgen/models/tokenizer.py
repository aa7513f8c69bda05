"""CLIP tokenizers built offline: the tiny byte-level one shipped here, and SD v1.5's real one.

SD v1.5's tokenizer is OpenAI CLIP's BPE. open_clip ships its merges file
(`bpe_simple_vocab_16e6.txt.gz`); CLIP's vocabulary is derived from it exactly as OpenAI's
SimpleTokenizer does (256 byte symbols, the same with `</w>`, one token per merge, two specials),
which gives the 49,408-token vocabulary of `openai/clip-vit-large-patch14`.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_MERGES = 49152 - 256 - 2  # merges used by CLIP (OpenAI SimpleTokenizer)
TINY_TOKENIZER = Path(__file__).parent / "configs" / "tiny" / "tokenizer"


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
    """SD v1.5's CLIP tokenizer (49,408 tokens, max length 77), rebuilt from open_clip's BPE file into a cached
    folder of vocab.json + merges.txt (the files transformers 4 and 5 both read), then loaded from it."""
    folder = Path.home() / ".cache" / "customgen" / "sd15-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        vocab, merges = _clip_vocab_and_merges()
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]) + "\n",
                                        encoding="utf-8")
        shutil.copy(TINY_TOKENIZER / "tokenizer_config.json", tmp)  # the same special tokens and max length
        shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)  # atomic: a half-written folder is never read
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """The tiny model's byte-level CLIP tokenizer (no merges: each character is a token)."""
    return CLIPTokenizer.from_pretrained(str(folder))


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`save_pretrained`, plus the files transformers 4 reads (vocab.json, merges.txt, added_tokens.json) when the
    installed transformers wrote only tokenizer.json (transformers 5 does; transformers 4's CLIPTokenizer then
    cannot load the folder)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if (folder / "vocab.json").is_file():
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    added = {t: i for t, i in tokenizer.get_vocab().items() if t not in model["vocab"]}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False))
