#!/usr/bin/env bash
# README command 2: install the ComfyUI host if it is missing (quick no-op otherwise), then run the tests in
# the host's Python.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=$(python3 scripts/setup_host.py | tail -n 1)   # "COMFYUI_PYTHON=... COMFYUI_DIR=..."
eval "$paths"
mkdir -p test-artifacts
COMFYUI_PYTHON="$COMFYUI_PYTHON" bash scripts/setup_browser.sh || echo "browser set-up failed: the browser tests will fail"
exec "$COMFYUI_PYTHON" -m pytest tests -p no:cacheprovider "$@"
