"""The sandbox the reliability battery (tests/test_reliability.py) runs in, and its checks.

One folder holds every input a case may touch: training images, content photos, a style library with good and
broken artifacts, a diffusers model folder with a pickled weights file, finished training runs whose
checkpoints cases copy and damage. Every case hashes the whole sandbox before and after the command and allows
changes only under the paths it names as the command's output.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from customgen.cli import main
from customgen.kinds import dreambooth, lora, textual_inversion
from customgen.models import load_pipeline
from tests.artifact_fixtures import content_image, make_contents, make_library, make_lora
from tests.image_fixtures import make_wikiart_tree

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SETS = ["data.resolution=64", "data.min_bucket=64", "data.min_size=32", "train.batch_size=1",
              "validation.steps=2", "validation.num_images=1", "train.validate_every=0", "loss.lpips=0", "loss.gram=0",
              "data.style=Cubism", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=3",
              "train.steps=6"]


# --- checks -------------------------------------------------------------------------------------------------
def snapshot(root: Path, allowed=()) -> dict[str, str]:
    """Relative path → content hash (files), link target (symlinks) or "dir", for everything under `root` except
    the `allowed` paths and what lies under them."""
    allowed = [Path(a).resolve() for a in allowed]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if any(path.resolve() == a or a in path.resolve().parents for a in allowed):
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_line(err: str, *, strict: bool) -> str:
    """The one `error: ` line of a failed command's stderr: the last line, no traceback, not cut mid-sentence;
    `strict`: the only line (the command failed before any progress output)."""
    lines = [ln for ln in re.split(r"[\r\n]+", err) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert not errors[0].rstrip().endswith((":", ",")), errors[0]
    if strict:
        assert lines == errors, err
    return errors[0]


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    line: str  # the error line ("" on success)


def cli(capfd, sandbox: Path, argv: list, *, code: int, match: str | None = None, changes=(),
        strict: bool = True) -> Outcome:
    """Run `customgen argv` in-process with the sandbox as the working folder; check the exit code, the message
    shape (one `error: ` line matching `match`) and that nothing outside `changes` changed."""
    before = snapshot(sandbox, changes)
    cwd = os.getcwd()
    os.chdir(sandbox / "cwd")
    try:
        rc = main([str(a) for a in argv])
    finally:
        os.chdir(cwd)
    out, err = capfd.readouterr()
    assert rc == code, f"exit {rc}, expected {code}\n{err[-2000:]}"
    line = error_line(err, strict=strict) if code else ""
    if match:
        assert re.search(match, line), line
    assert snapshot(sandbox, changes) == before, "files outside the command's output changed"
    return Outcome(rc, out, err, line)


def notes(recwarn) -> list[str]:
    """The Notices (`note: ...` lines of the CLI) raised so far in this test."""
    return [str(w.message) for w in recwarn if w.category.__name__ == "Notice"]


# --- building the sandbox -----------------------------------------------------------------------------------
def train_argv(sandbox: Path, out: Path, *sets: str, config: str = "lora_style", extra=()) -> list:
    args = ["train", ROOT / "configs" / f"{config}.yaml", "--model", "tiny", "--output", out]
    for s in TRAIN_SETS + [f"data.root={sandbox / 'data' / 'wikiart'}", *sets]:
        args += ["--set", s]
    return args + list(extra)  # last: extra --set values win


def rewrite(src: Path, dst: Path, weights: str, change) -> Path:
    """Copy artifact `src` to `dst`; rewrite its weights with change(tensors, metadata) → (tensors, metadata)."""
    shutil.copytree(src, dst)
    with safe_open(str(src / weights), "pt") as f:
        metadata = f.metadata()
    tensors, metadata = change(load_file(str(src / weights)), dict(metadata or {}))
    save_file(tensors, str(dst / weights), metadata=metadata)
    return dst


def _map(fn, pick=lambda k: True):
    return lambda sd, meta: ({k: fn(v) if pick(k) else v for k, v in sd.items()}, meta)


def _first(fn, pick):
    """Change only the first tensor whose key `pick` accepts."""
    def change(sd, meta):
        key = next(k for k in sorted(sd) if pick(k))
        return {**sd, key: fn(sd[key])}, meta
    return change


def _alpha_nan(sd, meta):
    data = json.loads(meta["lora_adapter_metadata"])
    data["unet.lora_alpha"] = float("nan")
    return sd, {**meta, "lora_adapter_metadata": json.dumps(data)}


DOWN = lambda k: k.endswith(("lora.down.weight", "lora_A.weight"))  # noqa: E731
UP = lambda k: k.endswith(("lora.up.weight", "lora_B.weight"))  # noqa: E731
BROKEN_LORAS = {  # library name → how its weights are damaged
    "lora_1d": _first(lambda t: t[0].contiguous(), DOWN),
    "lora_int": _map(lambda t: (t * 100).to(torch.int32)),
    "lora_bool": _map(lambda t: t > 0),
    "lora_nan": _map(lambda t: torch.full_like(t, float("nan"))),
    "lora_inf": _first(lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), UP),
    "lora_ranks": _first(lambda t: t[:2].contiguous(), DOWN),
    "lora_nokeys": lambda sd, meta: ({"something.else": torch.zeros(2)}, meta),
    "lora_alpha_nan": _alpha_nan,
}
GOOD_LORAS = {"lora_f16": _map(lambda t: t.half()), "lora_f64": _map(lambda t: t.double())}
BROKEN_TIS = {
    "ti_nan": _map(lambda t: torch.full_like(t, float("nan"))),
    "ti_int": _map(lambda t: t.to(torch.int64)),
    "ti_3d": _map(lambda t: t[None]),
}
BROKEN_DREAMBOOTHS = {
    "db_nan": _first(lambda t: torch.full_like(t, float("nan")), lambda k: True),
    "db_shape": _first(lambda t: t[:-1].contiguous(), lambda k: True),
    "db_key": lambda sd, meta: ({**sd, "no.such.layer.weight": torch.zeros(2)}, meta),
}


def manifest_variant(src: Path, dst: Path, **fields) -> Path:
    """Copy an artifact and change fields of its style.json (raw JSON values, so wrong types get through)."""
    shutil.copytree(src, dst)
    data = json.loads((src / "style.json").read_text())
    (dst / "style.json").write_text(json.dumps({**data, **fields}))
    return dst


def build_library(sandbox: Path) -> Path:
    """Good styles (make_library) plus every broken variant above and artifacts whose files leave the folder."""
    lib = sandbox / "styles"
    good = make_library(lib)
    variants = [(BROKEN_LORAS | GOOD_LORAS, good["lora_a"], lora.WEIGHTS), (BROKEN_TIS, good["ti"],
                textual_inversion.WEIGHTS), (BROKEN_DREAMBOOTHS, good["dreambooth"], dreambooth.WEIGHTS)]
    for table, src, weights in variants:
        for name, change in table.items():
            rewrite(src, lib / name, weights, change)
    make_lora(lib / "lora_wide", cross_attention_dim=48)  # "another base model": other text width
    for src, decoy, weights in ((good["lora_a"], lib / "lora_nan", lora.WEIGHTS),
                                (good["ti"], lib / "ti_nan", textual_inversion.WEIGHTS),
                                (good["dreambooth"], lib / "db_nan", dreambooth.WEIGHTS)):
        # style.json names a clean copy while the stock-named file beside it holds NaN: the file checked on
        # load must be the file loaded
        named = manifest_variant(decoy, lib / f"{decoy.name}_decoy", weights="clean.safetensors")
        shutil.copy(src / weights, named / "clean.safetensors")
    outside = sandbox / "outside"
    shutil.copytree(good["lora_a"], outside / "stolen")  # a valid LoRA: if it were read, the command would succeed
    manifest_variant(good["lora_a"], lib / "escape_dotdot", weights="../../outside/stolen/" + lora.WEIGHTS)
    manifest_variant(good["lora_a"], lib / "escape_abs", weights=str(outside / "stolen" / lora.WEIGHTS))
    manifest_variant(good["lora_a"], lib / "escape_export", exports=["../../outside/stolen/lora_a.safetensors"])
    manifest_variant(good["lora_a"], lib / "weights_null", weights=None)
    manifest_variant(good["lora_a"], lib / "weights_nul", weights="pytorch\x00.safetensors")
    manifest_variant(good["lora_a"], lib / "kind_unknown", kind="hypernetwork")
    link = manifest_variant(good["lora_a"], lib / "escape_symlink")
    (link / lora.WEIGHTS).unlink()
    (link / lora.WEIGHTS).symlink_to(outside / "stolen" / lora.WEIGHTS)
    shutil.copytree(good["lora_a"], lib / "manifest_garbage")
    (lib / "manifest_garbage" / "style.json").write_text("{not json")
    shutil.copytree(good["lora_a"], lib / "lora_truncated")
    data = (lib / "lora_truncated" / lora.WEIGHTS).read_bytes()
    (lib / "lora_truncated" / lora.WEIGHTS).write_bytes(data[: len(data) // 2])
    return lib


class Evil:
    """A pickle that would leave a marker file if anything ever unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def build_pickled_model(sandbox: Path) -> Path:
    """The tiny model as a diffusers folder whose UNet is a malicious pickled .bin (and no .safetensors)."""
    folder = sandbox / "pickled_model"
    load_pipeline("tiny", kind="txt2img", device="cpu").save_pretrained(folder, safe_serialization=False)
    torch.save({"weight": Evil(sandbox / "PWNED")}, folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


def build_inputs(sandbox: Path) -> dict[str, Path]:
    """Training images, content photos (some broken) and a working folder holding images (`--content ''` bait)."""
    make_wikiart_tree(sandbox / "data" / "wikiart", styles={"Cubism": 3}, size=(80, 72))
    contents = make_contents(sandbox / "contents", n=2)
    make_contents(sandbox / "cwd", n=2)
    bad = sandbox / "bad_images"
    bad.mkdir()
    (bad / "text.png").write_text("this is not an image")
    (bad / "empty.png").write_bytes(b"")
    content_image(5).save(bad / "whole.png")
    data = (bad / "whole.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (sandbox / "a_file").write_text("a regular file, not a folder")
    (sandbox / "empty_folder").mkdir()
    return {"content": contents / "content_0.png", "bad": bad}


def build_runs(sandbox: Path) -> dict[str, Path]:
    """Finished 6-step runs (checkpoints at steps 2 and 4 kept) whose checkpoints the resume cases copy."""
    runs = {"lora": [], "rank8": ["lora.rank=8"], "dreambooth": ["prompt.prior=false"]}
    out = {}
    for name, sets in runs.items():
        folder = sandbox / "runs" / name
        config = "dreambooth_style" if name == "dreambooth" else "lora_style"
        assert main([str(a) for a in train_argv(sandbox, folder, *sets, config=config)]) == 0
        out[name] = folder
    return out


def fresh_run(sandbox: Path, template: Path, name: str, steps=("step-000002", "step-000004")) -> Path:
    """A new output folder holding copies of `template`'s checkpoints (a run that stopped after them)."""
    folder = sandbox / "work" / name
    for step in steps:
        shutil.copytree(template / "checkpoints" / step, folder / "checkpoints" / step)
    return folder
