"""Reward Steering for ComfyUI -- registration only; the nodes are listed in nodes/__init__.py."""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # the page-side scripts (the manual pick grid)

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
