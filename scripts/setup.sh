#!/usr/bin/env bash
# Create .venv and install customgen with its test extras (PyPI's torch: it runs on CPU and GPU).
# Headless Chromium for the demo's browser test comes from Debian when apt is available as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # this machine's pip config names absent local indexes
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -e ".[dev]"
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; the browser test will be skipped"
fi
