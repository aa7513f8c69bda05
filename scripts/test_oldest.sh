#!/usr/bin/env bash
# The oldest-versions tier (README "Tests"; scripts/test.sh runs it after the main suite): a second venv,
# .venv-oldest, holds the OLDEST transformers, diffusers, peft and accelerate that pyproject.toml allows (what
# Kaggle images tend to have) on top of .venv's other packages, runs the artifact/loader/inference tests there,
# then checks that artifacts written under the newest versions load under the oldest and vice versa.
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
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
.venv-oldest/bin/python -c "import transformers, diffusers, peft, accelerate; print('oldest tier:', 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests/test_interop.py tests/test_inference.py tests/test_models.py \
  tests/test_train.py::test_recipe_trains_only_its_parameters_and_reloads_with_stock_loaders \
  "tests/test_sd15.py::test_subject_lora_names_equal_sd15s_canonical_names"
CUSTOMGEN_OLDEST_PYTHON="$PWD/.venv-oldest/bin/python" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cross_version.py
