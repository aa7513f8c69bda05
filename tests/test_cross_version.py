"""Artifacts cross library versions: written under the newest transformers/diffusers/peft/accelerate they load
under the oldest that pyproject.toml allows, and the other way round, with the same pixels and the same key
names. scripts/oldest_venv.sh builds .venv-oldest; scripts/test.sh runs this with CUSTOMGEN_OLDEST_PYTHON set (CI does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

JOB = Path(__file__).with_name("cross_version_job.py")
OLDEST = os.environ.get("CUSTOMGEN_OLDEST_PYTHON")
pytestmark = pytest.mark.skipif(not OLDEST, reason="needs .venv-oldest: TIERS=oldest bash scripts/test.sh (CI does)")


def job(python: str, *args) -> None:
    env = {**os.environ, "PYTHONPATH": str(JOB.parents[1]) + os.pathsep + str(JOB.parents[1] / "src"),
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([python, str(JOB), *map(str, args)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def versions(python: str) -> str:
    code = "import transformers, diffusers, peft; print(transformers.__version__, diffusers.__version__, peft.__version__)"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_artifacts_load_across_the_oldest_and_newest_versions(tmp_path):
    new, old = sys.executable, OLDEST
    assert versions(new) != versions(old), "the two venvs hold the same versions"
    base = tmp_path / "base"
    job(new, "base", base)
    job(new, "write", base, tmp_path / "newest")
    job(old, "write", base, tmp_path / "oldest")
    job(new, "render", base, tmp_path / "on_newest.npz", tmp_path / "newest", tmp_path / "oldest")
    job(old, "render", base, tmp_path / "on_oldest.npz", tmp_path / "newest", tmp_path / "oldest")
    for side in ("on_newest", "on_oldest"):
        px = np.load(tmp_path / f"{side}.npz")
        for style in ("subject", "ti", "dreambooth"):
            a, b = px[f"newest/{style}"], px[f"oldest/{style}"]
            assert np.array_equal(a, b), f"{style} written by the two versions renders differently {side}"
            assert a.std() > 0
        names = json.loads((tmp_path / f"{side}.json").read_text())
        assert names == json.loads((tmp_path / "on_newest.json").read_text())
        for style in ("subject", "ti", "dreambooth"):  # the same file names and key names from both writers
            assert names[f"newest/{style}"] == names[f"oldest/{style}"]
    newest, oldest = np.load(tmp_path / "on_newest.npz"), np.load(tmp_path / "on_oldest.npz")
    for key in newest.files:  # and the two library versions draw the same pixels from the same files
        assert np.array_equal(newest[key], oldest[key]), key
