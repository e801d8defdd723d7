"""Reward Steering for ComfyUI -- registration only; the nodes are listed in nodes/__init__.py."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
