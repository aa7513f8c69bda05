#!/usr/bin/env bash
# Build .venv-oldest for the oldest-versions tier (scripts/test.sh runs its tests): the OLDEST transformers, diffusers,
# peft and accelerate that pyproject.toml allows, on top of .venv's other packages. It is the floor customgen
# promises, e.g. what an older notebook that pinned its packages may keep; it is not what Kaggle or Colab ship today
# (their own tiers, ci/stacks/, test those: Kaggle has transformers 5.0.0 and diffusers 0.37.1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PY=${PYTHON:-python3}
if [ ! -x .venv-oldest/bin/python ]; then
  "$PY" -m venv .venv-oldest
  # .venv's site-packages after .venv-oldest's own: torch and the rest come from there, the pins below win
  .venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$(.venv-oldest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_main_venv.pth"
fi
# customgen itself from this checkout (.venv's editable install is a .pth file, which a path added by a .pth file
# does not process)
echo "$PWD/src" > "$(.venv-oldest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/customgen_src.pth"
pins=$(.venv/bin/python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    m = re.fullmatch(r"(transformers|diffusers|peft|accelerate)>=([\d.]+)", d.split("#")[0].strip())
    if m:
        print(f"{m[1]}=={m[2]}")
PY
)
# pip resolves what those versions need (huggingface_hub < 1, tokenizers < 0.21 for transformers 4.x) into
# .venv-oldest; packages only .venv needs (gradio wants huggingface_hub >= 1) are not used by these tests.
.venv-oldest/bin/python -m pip install -q $pins 2>&1 | grep -vE "^WARNING: Location|dependency conflicts|requires huggingface-hub|resolver does not" || true
