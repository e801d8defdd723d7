"""Test set-up: run inside the host's Python with ComfyUI importable, the pack imported under the same module
name ComfyUI gives it (so classes are shared with the executor), and fixtures for the in-process executor and
a real server.  Run via the README's test command (scripts/test.sh), which installs the host first."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import ComfyServer, host_paths  # noqa: E402

import harness  # noqa: E402

_, COMFY_DIR = host_paths()
if not (COMFY_DIR / "main.py").exists():
    raise pytest.UsageError(f"no ComfyUI at {COMFY_DIR}: run `python3 scripts/setup_host.py` first "
                            "(or set COMFYUI_DIR to an existing ComfyUI)")
harness.bootstrap_comfy(COMFY_DIR)


@pytest.fixture(scope="session")
def pack():
    """The pack's top-level module, as ComfyUI loads it."""
    return harness.import_pack()


@pytest.fixture(scope="session")
def executor():
    """Runs API-format prompts in this process through ComfyUI's real PromptExecutor."""
    return harness.InProcessExecutor()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real ComfyUI server (main.py --cpu) on a free 127.0.0.1 port, shared by the session."""
    out = tmp_path_factory.mktemp("comfy-output")
    with ComfyServer(output_dir=out, log_path=out / "server.log") as srv:
        srv.object_info = srv.get("/object_info", timeout=120)
        yield srv
