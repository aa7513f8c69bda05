"""Write ci/stacks/*.txt: pip constraint files for the stacks users run, from the images' own package lists.

    python scripts/make_stack_constraints.py ../shared/stacks

Sources (copied into ../shared/stacks with their origins; see its README.md):
- Kaggle's GPU image = Colab's runtime of 2026-05-14 (googlecolab/backend-info pip-freeze.gpu.txt at 6f38803) plus
  Kaggle's own layer (Kaggle/docker-python kaggle_requirements.txt at 78aaa43), which pins a few packages over it.
- Colab's GPU runtime of 2026-08-19 (googlecolab/backend-info at a724079).

A freeze becomes a constraint file by three changes, each noted in the file's header: direct-URL lines (`name @ ...`,
packages built inside the image) are dropped; local version labels are stripped (`torch==2.10.0+cu128` →
`torch==2.10.0`: PyPI's Linux wheel of that release is the same CUDA 12.8 build without the label); and for Kaggle
its layer's pins replace the base's, with the packages those pins force to move left to pip (nbconvert 6.4.5 needs
nbclient < 0.6 and mistune < 2, ipywidgets 8.1.5 widgetsnbextension 4: the image holds whatever pip resolved then).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
STACKS = {  # output file → (python minor, freeze file, extra pin file or None, source line, CUDA libraries pinned)
    "kaggle-2026-05.txt": ("3.12", "colab-gpu-2026-05-14.freeze.txt", "kaggle-requirements-2026-08-12.txt",
                           "Kaggle GPU image: googlecolab/backend-info 6f38803 (Colab 2026-05-14, the image's base) "
                           "+ Kaggle/docker-python 78aaa43 kaggle_requirements.txt pins", True),
    # PyPI's torch 2.11.0 for Linux is the CUDA 13 build (it requires cuda-toolkit 13.0.2); Colab's is the cu128 build
    # from PyTorch's own index, which the registries here do not serve: same torch release, other CUDA libraries
    # (which a CPU run does not load), so the CUDA library pins are left to pip.
    "colab-2026-08.txt": ("3.13", "colab-gpu-2026-08-19.freeze.txt", None,
                          "Colab GPU runtime: googlecolab/backend-info a724079 (2026-08-19)", False),
}
CUDA = re.compile(r"^(cuda-|nvidia-|triton$)")  # torch's CUDA runtime packages
# What Kaggle's layer pins force to move (nbconvert 6.4.5 needs nbclient < 0.6 and mistune < 2; ipywidgets 8.1.5
# needs widgetsnbextension 4): left to pip in the Kaggle tier, as in the image's own build.
KAGGLE_RELEASED = ("nbclient", "mistune", "widgetsnbextension")


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze_pins(text: str) -> tuple[dict[str, str], list[str]]:
    """`name==version` lines of a pip freeze (local labels stripped) → {normalised name: line}; dropped lines."""
    pins, dropped = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if " @ " in line or "==" not in line:
            dropped.append(line.split(" @ ")[0].strip())
            continue
        name, version = line.split("==", 1)
        pins[norm(name)] = f"{name}=={version.split('+')[0]}"
    return pins, dropped


def layer_pins(text: str) -> dict[str, str]:
    """Pinned lines (==, <, >=) of a requirements file such as kaggle_requirements.txt; unpinned names are skipped."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith(("git+", "-")) or not re.search(r"[<>=]", line):
            continue
        name = NAME.match(line)[1].split("[")[0]
        pins[norm(name)] = re.sub(r"\[.*?\]", "", line)
    return pins


def satisfied(pin: str | None, requirement: str) -> bool:
    """Whether the freeze's `name==version` already satisfies a layer requirement (then pip left it as it was)."""
    if pin is None:
        return False
    version = pin.split("==", 1)[1]
    return SpecifierSet(requirement[NAME.match(requirement).end():]).contains(version, prereleases=True)


def build(src: Path, out_name: str) -> str:
    python, freeze, layer, source, cuda_pinned = STACKS[out_name]
    pins, dropped = freeze_pins((src / freeze).read_text())
    header = [f"# {source}", f"# Python {python}. Written by scripts/make_stack_constraints.py from ../shared/stacks/{freeze}"
              + (f" and {layer}" if layer else "") + "; do not edit by hand.",
              "# Changes from the freeze: local version labels stripped (+cu128: PyPI's Linux wheels of that torch are "
              "that build);" if cuda_pinned else "# Changes from the freeze: local version labels stripped; torch's "
              "CUDA library pins (cuda-*, nvidia-*, triton) left to pip: PyPI's wheel of this torch is its CUDA 13 build,"
              " the image's is cu128 (a CPU run loads neither);",
              f"# direct-URL packages dropped ({len(dropped)}: built inside the image, not on PyPI)."]
    if not cuda_pinned:
        pins = {k: v for k, v in pins.items() if not CUDA.match(k)}
    if layer:
        over = layer_pins((src / layer).read_text())
        for key in KAGGLE_RELEASED:
            pins.pop(key, None)
        applied = {k: v for k, v in over.items() if not satisfied(pins.get(k), v)}  # pip keeps what satisfies a pin
        pins.update(applied)
        header.append(f"# Kaggle's layer pins that change the base: {', '.join(sorted(applied.values()))}; released for pip to resolve "
                      f"as the image's build did: {', '.join(KAGGLE_RELEASED)} (nbconvert 6.4.5 needs nbclient<0.6 and mistune<2, "
                      "ipywidgets 8.1.5 widgetsnbextension 4).")
    return "\n".join(header + [pins[k] for k in sorted(pins)]) + "\n"


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else ROOT.parent / "shared" / "stacks"
    out = ROOT / "ci" / "stacks"
    out.mkdir(parents=True, exist_ok=True)
    for name in STACKS:
        (out / name).write_text(build(src, name))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
