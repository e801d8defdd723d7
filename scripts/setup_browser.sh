#!/usr/bin/env bash
# Browser for the end-to-end tests (tests/test_manual_pick_browser.py): Debian's chromium at /usr/bin/chromium
# and the Playwright Python driver in the host's Python, which drives that chromium (never `playwright install`:
# the tests use executable_path=/usr/bin/chromium).  Idempotent: a second run only checks and returns.
#
#     bash scripts/setup_browser.sh            # after scripts/setup_host.py
#
# Needs root (or sudo) for apt-get.  A failure is reported, not fatal to the caller: the browser tests then fail
# with this script's message instead of being skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${COMFYUI_PYTHON:-.host/venv/bin/python}"
status=0

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
