#!/usr/bin/env bash
# The test command (README "Tests"; CI runs it through .ci/run). Four tiers, each in its own venv, offline, on a CPU:
#   newest  .venv           the newest PyPI releases: the whole suite (tiny tests, notebooks, browser, sd15-random tier)
#   kaggle  .venv-kaggle    Kaggle's GPU image (Python 3.12, torch 2.10, diffusers 0.37.1, transformers 5.0.0):
#                           the README install cell checked, then the whole suite
#   colab   .venv-colab     Colab's runtime (Python 3.13, torch 2.11, diffusers 0.39.0, transformers 5.15.0):
#                           the cross-version set (tests/cross_version_set.txt)
#   oldest  .venv-oldest    the oldest transformers/diffusers/peft/accelerate pyproject.toml allows: the cross-version
#                           set, then artifacts crossing between it and newest (venv: scripts/oldest_venv.sh)
# Each tier prints its versions, its result and its time; scripts/guard.py stops a tier that hangs, loses a worker or
# passes the memory limit, within minutes. TIERS="newest kaggle" runs only those. Arguments go to pytest on the newest
# tier instead, e.g. `bash scripts/test.sh -k models`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
TIERS=${TIERS:-newest kaggle colab oldest}
LIMIT_GIB=${LIMIT_GIB:-16}  # the suite with two workers must stay under this (the machine has 24 GiB)
mapfile -t CROSS < <(grep -vE '^\s*(#|$)' tests/cross_version_set.txt)
summary=()
failed=0
declare -A builds
for t in kaggle colab; do  # their venvs download several GB each: build them while the newest tier runs
  if [[ " $TIERS " == *" $t "* ]]; then
    ( start=$(date +%s); .venv/bin/python scripts/stack_tier.py "$t" > ".tier-$t.python" 2> ".tier-$t.build"
      echo "$? $(( $(date +%s) - start ))" > ".tier-$t.rc" ) &
    builds[$t]=$!
  fi
done

versions() {  # one line: the tier's python and the packages that decide artifact names and loading
  "$1" -c "import sys, torch, diffusers, transformers, peft, accelerate; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'accelerate', accelerate.__version__)"
}

tier() {  # tier NAME PYTHON PYTEST-ARGS...: run pytest under the guard, remember the outcome
  local name=$1 py=$2; shift 2
  local start=$(date +%s) v log=".tier-${name//[^a-z]/_}.log" rc=0
  v=$(versions "$py")
  echo "== $name tier: $v"
  set +e
  .venv/bin/python scripts/guard.py --label "$name tier" --limit-gib "$LIMIT_GIB" --idle 900 --wall 2400 -- \
    "$py" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local result
  result=$(grep -E "^[=]* ?[0-9]+ (passed|failed)|^error: .* stopped" "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
  summary+=("$name | $v | ${result:-no result} | $(( $(date +%s) - start )) s | rc $rc")
  [ "$rc" = 0 ] || failed=1
  rm -f "$log"
}

skipped() { summary+=("$1 | $2 | SKIPPED | 0 s | -"); }

for t in $TIERS; do
  case $t in
    newest) tier newest .venv/bin/python -n 2 --dist loadfile ;;
    kaggle|colab)
      wait "${builds[$t]}" || true
      grep -v "WARNING: Location" ".tier-$t.build" || true
      read -r rc secs < ".tier-$t.rc"
      py=$(tail -n 1 ".tier-$t.python")
      rm -f ".tier-$t.python" ".tier-$t.build" ".tier-$t.rc"
      echo "$t venv built in $secs s (in the background)"
      if [ "$rc" = 3 ]; then skipped "$t" "no Python for this tier on this machine (see above)"
      elif [ "$rc" != 0 ]; then summary+=("$t | venv | FAILED: the README cell or the image's packages (see above) | - | rc $rc"); failed=1
      elif [ "$t" = kaggle ]; then tier kaggle "$py" -n 2 --dist loadfile
      else tier colab "$py" -n 2 --dist loadfile "${CROSS[@]}"
      fi ;;
    oldest)
      start=$(date +%s)
      bash scripts/oldest_venv.sh
      tier oldest .venv-oldest/bin/python -n 2 --dist loadfile "${CROSS[@]}"
      CUSTOMGEN_OLDEST_PYTHON="$PWD/.venv-oldest/bin/python" tier "oldest<->newest artifacts" .venv/bin/python tests/test_cross_version.py ;;
    *) echo "unknown tier $t (newest, kaggle, colab, oldest)"; exit 2 ;;
  esac
done

echo
echo "== tiers: name | versions | result | time | exit"
printf '%s\n' "${summary[@]}"
exit $failed
