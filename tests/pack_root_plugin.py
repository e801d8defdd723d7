"""pytest plugin (scripts/test.sh loads it with -p): the repository root is the pack itself -- it has an
__init__.py -- not a test package.  pytest would import that __init__.py on its own to look for set-up functions,
which fails outside ComfyUI when the checkout's folder name is not a Python identifier.  Collect it as a plain
folder instead."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collect_directory(path, parent):
    if path == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None
