"""Build the venv of one user stack (Kaggle's or Colab's image) the way a user meets it, and check the README cell.

    .venv/bin/python scripts/stack_tier.py kaggle     # → .venv-kaggle; prints its python's path (progress: stderr)

1. A venv with the image's Python minor (pyenv's 3.12 / 3.13 on these machines; exit 3 with one line if missing).
2. "Preinstalled": every package of customgen's, its tests' and its notebooks' dependency closure that the image
   has, at the image's version (ci/stacks/<stack>.txt, from the images' own freezes: scripts/make_stack_constraints.py).
3. The README's Kaggle cell, literally (its `!` lines, with the clone's path), then a check that it upgraded,
   downgraded or removed no preinstalled package (exit 1 naming them otherwise).
4. The test extras under constraints that cannot move anything already installed (so Kaggle's nbconvert 6.4.5
   keeps nbclient 0.5.x and the notebook tests run with it).
A venv whose inputs (constraints, pyproject, README cell) are unchanged is reused.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACKS = {"kaggle": ("3.12", "kaggle-2026-05.txt"), "colab": ("3.13", "colab-2026-08.txt")}
CLONE = "/kaggle/working/customgen"  # the README cell's path, replaced by this checkout's
MISSING = 3  # exit status: this machine has no Python of that minor
# The image's notebook tooling: not customgen's dependencies, but it decides which of them fit (Kaggle's nbconvert
# 6.4.5 holds nbclient below 0.6, the version the notebook tests then run with).
TOOLING = ("notebook", "nbconvert", "nbclient", "nbformat", "jupyter-server", "jupyter-client", "ipykernel", "ipywidgets")


def find_python(minor: str) -> str | None:
    """A working CPython `minor` interpreter: pyenv's versions, else python3.X on PATH (a pyenv shim for a version
    that is not selected exists but fails, hence the check)."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    candidates = sorted(p for r in roots if r for p in glob.glob(f"{r}/versions/{minor}.*/bin/python"))
    candidates.append(shutil.which(f"python{minor}") or "")
    ok = lambda c: c and subprocess.run([c, "-c", "import venv"], capture_output=True).returncode == 0  # noqa: E731
    return next((c for c in candidates if ok(c)), None)


def readme_cell() -> list[str]:
    """The shell lines (`!...`) of the README's Kaggle install cell (the section's first code block), without the
    clone itself."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On Kaggle", 1)[1].split("\n## ", 1)[0]
    cell = section.split("```", 2)[1]
    lines = [ln.strip()[1:] for ln in cell.splitlines() if ln.strip().startswith("!")]
    return [ln.replace(CLONE, str(ROOT)) for ln in lines if not ln.startswith("git clone")]


def pip(py: str, *args: str, capture: bool = False) -> str:
    run = subprocess.run([py, "-m", "pip", *args], text=True, check=False,
                         stdout=subprocess.PIPE if capture else sys.stderr, stderr=subprocess.PIPE)
    noise = re.compile(r"WARNING: Location|dependency conflicts|resolver does not|^\s*$")
    err = "\n".join(ln for ln in run.stderr.splitlines() if not noise.search(ln))
    if run.returncode:
        sys.exit(f"pip {' '.join(args[:3])} ... failed:\n{err}")
    return run.stdout or ""


def freeze(py: str) -> dict[str, str]:
    """{normalised name: version} of what the venv holds (customgen itself left out)."""
    rows = json.loads(pip(py, "list", "--format", "json", capture=True))
    return {re.sub(r"[-_.]+", "-", r["name"]).lower(): r["version"] for r in rows if r["name"] != "customgen"}


def image_pins(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def closure(py: str, constraints: Path) -> list[str]:
    """Names in the dependency closure of customgen with its test extras, resolved under the image's pins."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(py, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), "-c", str(constraints),
            f"{ROOT}[dev]")
        items = json.loads(report.read_text())["install"]
    return [re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower() for i in items]


def inputs_hash(constraints: Path) -> str:
    blob = constraints.read_bytes() + (ROOT / "pyproject.toml").read_bytes() + "\n".join(readme_cell()).encode() \
        + Path(__file__).read_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def changed(before: dict, after: dict) -> list[str]:
    return [f"{k} {v} -> {after.get(k, 'removed')}" for k, v in before.items() if after.get(k) != v]


def build(stack: str) -> str:
    minor, name = STACKS[stack]
    constraints, venv = ROOT / "ci" / "stacks" / name, ROOT / f".venv-{stack}"
    base = find_python(minor)
    if base is None:
        print(f"{stack} tier SKIPPED: this machine has no Python {minor} (the image's); install it, e.g. "
              f"`pyenv install {minor}`", file=sys.stderr)
        sys.exit(MISSING)
    py, stamp = str(venv / "bin" / "python"), venv / ".customgen-stack"
    if stamp.is_file() and stamp.read_text() == inputs_hash(constraints):
        return py
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
    pins = image_pins(constraints)
    have = list(dict.fromkeys([n for n in closure(py, constraints) if n in pins] + list(TOOLING)))
    print(f"{stack}: preinstalling {len(have)} packages at the image's versions", file=sys.stderr, flush=True)
    pip(py, "install", "-q", "-c", str(constraints), *[f"{n}=={pins[n]}" if n in pins else n for n in have])
    before = freeze(py)
    for line in readme_cell():
        print(f"{stack}: README cell: !{line}", file=sys.stderr, flush=True)
        env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    moved = changed(before, freeze(py))
    if moved:
        sys.exit(f"{stack}: the README cell changed preinstalled packages: {'; '.join(moved)}")
    after = freeze(py)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(f"{k}=={v}" for k, v in after.items()))
    pip(py, "install", "-q", "-c", str(constraints), "-c", f.name, "-e", f"{ROOT}[dev]")
    os.unlink(f.name)
    moved = changed(after, freeze(py))
    if moved:
        sys.exit(f"{stack}: installing the test extras moved packages: {'; '.join(moved)}")
    stamp.write_text(inputs_hash(constraints))
    return py


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STACKS:
        sys.exit(f"usage: stack_tier.py {{{'|'.join(STACKS)}}}")
    print(build(sys.argv[1]))
