"""Files from elsewhere: community LoRA, LoCon, LyCORIS (LoHa, LoKr), DoRA and embedding files, read and merged
the way the tools that made them do. Every format name lives in this package; the rest of customgen asks an
`Adapter` what to change and never branches on a format.

    reading.py   open a file without running anything in it (safetensors; pickles only weights-only)
    layouts.py   which layout its keys follow (kohya/LyCORIS, diffusers/PEFT, embedding, or not a style at all)
    family.py    which model family it was made for (SD1, SD2, SDXL, SD3, Flux), from names and widths
    names.py     SD v1 layer names and the kohya names for them
    deltas.py    one layer's change and the weight it merges to (lycoris-lora's functional math)
    adapter.py   examine (the `customgen inspect` report) and read_adapter (an Adapter, or one line why not)
    writing.py   the kohya/LyCORIS file of what customgen trained (peft's LoRA, LoCon, LoHa, LoKr, DoRA tensors)
"""
from customgen.formats.adapter import Adapter, examine, find_layer, read_adapter, sha256
from customgen.formats.deltas import Delta
from customgen.formats.reading import PICKLES, SAFETENSORS, SUFFIXES

__all__ = ["Adapter", "Delta", "PICKLES", "SAFETENSORS", "SUFFIXES", "examine", "find_layer", "read_adapter", "sha256"]
