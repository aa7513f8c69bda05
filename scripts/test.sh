#!/usr/bin/env bash
# The test command (README "Tests"; CI runs it through .ci/run): set up .venv if needed, run the test suite
# offline on the tiny model (and the sd15-random slow tier) with two workers, then the oldest-versions tier
# (scripts/test_oldest.sh). Arguments go to pytest instead, e.g. `bash scripts/test.sh -k models` (main suite only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
start=$(date +%s)
.venv/bin/python -m pytest -q -n 2 --dist loadfile
echo "main suite: $(( $(date +%s) - start )) s"
start=$(date +%s)
bash scripts/test_oldest.sh
echo "oldest-versions tier: $(( $(date +%s) - start )) s"
