"""The pack's node registry.  Each module of this folder lists its node classes in NODES; a module whose
optional Python packages are missing is skipped with one log line, so ComfyUI and the other nodes still load.
Every node registered here refuses NaN / inf in its FLOAT inputs (validation.py)."""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension

from .validation import check_finite_floats

LOG_PREFIX = "[reward-steering]"

# (module in this folder, Python packages it needs beyond ComfyUI's own)
NODE_MODULES: list[tuple[str, tuple[str, ...]]] = [
    ("reference", ()),
    ("rewards", ()),
    ("demon", ()),
    ("smc", ()),
    ("tree", ()),
    ("clip_rewards", ("open_clip",)),
    ("preference_rewards", ("open_clip", "transformers")),
    ("manual_pick", ()),
    ("vlm", ("requests",)),
]


def load_node_classes(modules=NODE_MODULES, package: str = __name__) -> list[type]:
    classes = []
    for module_name, requirements in modules:
        missing = []
        for requirement in requirements:
            try:
                importlib.import_module(requirement)
            except Exception as e:  # a broken install hides the nodes just like a missing one
                missing.append(f"{requirement} ({type(e).__name__}: {e})")
        if missing:
            logging.warning("%s %s nodes disabled: cannot import %s. Install the pack's requirements "
                            "(pip install -r requirements.txt) and restart ComfyUI.",
                            LOG_PREFIX, module_name, ", ".join(missing))
            continue
        classes.extend(check_finite_floats(node) for node in importlib.import_module(f".{module_name}", package).NODES)
    return classes


class RewardSteeringExtension(ComfyExtension):
    async def get_node_list(self) -> list[type]:
        return load_node_classes()


async def comfy_entrypoint() -> ComfyExtension:
    return RewardSteeringExtension()
