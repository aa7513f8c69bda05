"""scripts/quickstart.sh inside a notebook image: the image's own Python and packages, never a second environment.

The README's Kaggle section runs it from a notebook cell after the install cell; Kaggle sets KAGGLE_KERNEL_RUN_TYPE
(Colab: `google.colab` imports). There it must not run setup.sh, which would build .venv and download torch again.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def checkout_copy(dest: Path) -> Path:
    """The tracked files of this checkout (no .venv*, no outputs), as a fresh clone has them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def quickstart(copy: Path, python_dir: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{python_dir}:{os.environ['PATH']}", "OUT": str(tmp / "out"), **env}
    return subprocess.run(["bash", "scripts/quickstart.sh"], cwd=copy, env=environ, capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_in_a_kaggle_notebook_quickstart_uses_the_images_python_and_builds_no_venv(tmp_path):
    copy = checkout_copy(tmp_path / "clone")
    r = quickstart(copy, Path(sys.executable).parent, tmp_path, KAGGLE_KERNEL_RUN_TYPE="Interactive")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(no .venv)" in r.stdout
    assert not any(copy.glob(".venv*")), "quickstart built a second environment in a notebook"
    out = tmp_path / "out"
    assert (out / "stylized.png").is_file() and (out / "results" / "metrics.csv").is_file()
    assert sorted(p.name for p in (out / "styles").iterdir()) == ["dreambooth_style", "lora_style", "textual_inversion"]


def test_without_the_install_cell_quickstart_says_what_to_run(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable
    probe = subprocess.run([python, "-c", "import customgen"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{python} has customgen installed: no Python without it to try")
    (bare / "python3").symlink_to(python)
    copy = checkout_copy(tmp_path / "clone")
    r = quickstart(copy, bare, tmp_path, SKIP_SETUP="1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "README's install cell" in r.stderr
    assert not any(copy.glob(".venv*"))
