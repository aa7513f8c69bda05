#!/usr/bin/env bash
# The test command (README "Tests"; CI runs it through .ci/run): set up .venv if needed, then pytest
# offline on the tiny model. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k models`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest -q "$@"
