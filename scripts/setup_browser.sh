#!/usr/bin/env bash
# Browser for the end-to-end tests (tests/test_manual_pick_browser.py): Debian's chromium at /usr/bin/chromium
# and the Playwright Python driver in the host's Python, which drives that chromium (never `playwright install`:
# the tests use executable_path=/usr/bin/chromium).  Idempotent: a second run only checks and returns.
#
#     bash scripts/setup_browser.sh            # after scripts/setup_host.py
#
#     bash scripts/setup_browser.sh --newest-frontend   # also: the newest comfyui-frontend-package on the
#                                                      # registry, unpacked; last line FRONTEND_ROOT=<its static/>
#
# Needs root (or sudo) for apt-get.  A failure is reported, not fatal to the caller: the browser tests then fail
# with this script's message instead of being skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${COMFYUI_PYTHON:-.host/v0.28.2/venv/bin/python}"
status=0

if [ "${1:-}" = "--newest-frontend" ]; then
    # A folder per version, so that a newer release on the registry is picked up on the next run.
    dl=.host/frontend/downloads
    mkdir -p "$dl"
    if ! "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$dl" \
            comfyui-frontend-package >&2; then
        echo "[setup_browser] FAILED to download comfyui-frontend-package from the registry" >&2
        exit 1
    fi
    "$PY" - "$dl" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
dl = Path(sys.argv[1])
def version(p):
    return tuple(int(x) for x in re.match(r"comfyui_frontend_package-([0-9.]+)-", p.name).group(1).split("."))
wheel = max(dl.glob("comfyui_frontend_package-*.whl"), key=version)
root = dl.parent / ".".join(map(str, version(wheel)))
static = root / "comfyui_frontend_package" / "static"
if not (static / "index.html").exists():
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root)
print(f"[setup_browser] newest frontend: {wheel.name}", file=sys.stderr)
print(f"FRONTEND_ROOT={static.resolve()}")
PYEOF
    exit $?
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "[setup_browser] installing Debian's chromium ..."
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/tmp/setup_browser_apt.log 2>&1; then
        $SUDO apt-get update >>/tmp/setup_browser_apt.log 2>&1
        $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >>/tmp/setup_browser_apt.log 2>&1
    fi
    if [ ! -x /usr/bin/chromium ]; then
        echo "[setup_browser] FAILED to install chromium (log: /tmp/setup_browser_apt.log):" >&2
        tail -n 20 /tmp/setup_browser_apt.log >&2
        status=1
    fi
fi

if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "[setup_browser] installing the playwright Python package into $PY ..."
    if ! "$PY" -m pip install --quiet "playwright>=1.40"; then
        echo "[setup_browser] FAILED to pip install playwright" >&2
        status=1
    fi
fi

if [ "$status" = 0 ]; then
    echo "[setup_browser] ready: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), playwright $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
fi
exit "$status"
