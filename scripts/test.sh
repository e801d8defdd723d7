#!/usr/bin/env bash
# README command 2: install every ComfyUI host that can be installed (a quick no-op when they are there), run the
# whole suite on each host in that host's Python, then the browser tests once more on the newest host against the
# newest comfyui-frontend-package on the registry.  Extra arguments go to every pytest run.  Fails if any run
# fails or collects nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
mapfile -t hosts < <(python3 scripts/setup_host.py --host all)
if [ "${#hosts[@]}" -eq 0 ]; then
  echo "[test] no ComfyUI host could be installed (see the messages above)" >&2
  exit 1
fi
mkdir -p test-artifacts
status=0
results=()

run_pytest() {  # label, then pytest arguments
  local label=$1; shift
  local start rc
  start=$(date +%s)
  "$COMFYUI_PYTHON" -m pytest -p no:cacheprovider "$@"
  rc=$?
  results+=("$label: exit $rc after $(( $(date +%s) - start ))s")
  if [ "$rc" -eq 5 ]; then
    echo "[test] $label: pytest collected no tests, which proves nothing" >&2
  fi
  [ "$rc" -eq 0 ] || status=1
}

for line in "${hosts[@]}"; do
  eval "$line"   # COMFYUI_HOST=... COMFYUI_PYTHON=... COMFYUI_DIR=...
  export COMFYUI_HOST COMFYUI_PYTHON COMFYUI_DIR
  echo "[test] ===== ComfyUI $COMFYUI_HOST ($COMFYUI_DIR) ====="
  bash scripts/setup_browser.sh || echo "[test] browser set-up failed: the browser tests will fail" >&2
  run_pytest "ComfyUI $COMFYUI_HOST" tests --junitxml="test-artifacts/junit-$COMFYUI_HOST.xml" "$@"
done

# The page extension against the newest frontend the registry has, on the newest host (listed first).
eval "${hosts[0]}"
export COMFYUI_HOST COMFYUI_PYTHON COMFYUI_DIR
if frontend=$(bash scripts/setup_browser.sh --newest-frontend | tail -n 1) && [ -d "${frontend#*=}" ]; then
  export REWARD_STEER_FRONTEND_ROOT="${frontend#*=}"
  echo "[test] ===== browser tests: ComfyUI $COMFYUI_HOST with the frontend in $REWARD_STEER_FRONTEND_ROOT ====="
  run_pytest "ComfyUI $COMFYUI_HOST + newest frontend" tests/test_*_browser.py \
    --junitxml="test-artifacts/junit-$COMFYUI_HOST-newest-frontend.xml" "$@"
  unset REWARD_STEER_FRONTEND_ROOT
else
  echo "[test] could not get the newest comfyui-frontend-package" >&2
  results+=("newest frontend: not installed")
  status=1
fi

printf '[test] %s\n' "${results[@]}"
exit "$status"
