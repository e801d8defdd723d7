#!/usr/bin/env python3
"""Write the UI-format workflow files in workflows/ from the API graphs below, laid out with the real node
definitions of a running ComfyUI (/object_info).  Re-run after changing a graph; the tests check that every file
validates and that each file still equals its graph here.

    .host/venv/bin/python scripts/build_workflows.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import REPO, ComfyServer, api_to_ui  # noqa: E402

DEMO_LAMBDA = 10.0


def demo_reference() -> dict:
    """Plain sampling of the reference model, scored by a weight-free colour reward, with the exact target."""
    return {
        "1": {"class_type": "RewardSteerReferenceModel", "_meta": {"title": "Reference Model (exact)"},
              "inputs": {"parametrization": "eps", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 16}},
        "3": {"class_type": "KSampler", "_meta": {"title": "Plain KSampler"},
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "reward_steering_demo/plain"}},
        "6": {"class_type": "RewardSteerColorReward", "_meta": {"title": "Reward: toward red"},
              "inputs": {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}},
        "7": {"class_type": "RewardSteerScoreImages", "_meta": {"title": "Score plain samples"},
              "inputs": {"images": ["4", 0], "reward": ["6", 0], "prompt": ""}},
        "8": {"class_type": "RewardSteerReferenceExactTarget", "_meta": {"title": "Exact target"},
              "inputs": {"model": ["1", 0], "reward": ["6", 0], "latent": ["2", 0], "lam": DEMO_LAMBDA}},
    }


WORKFLOWS = {"demo_reference.json": demo_reference}


def main() -> int:
    with ComfyServer() as server:
        info = server.get("/object_info", timeout=120)
    for filename, graph in WORKFLOWS.items():
        path = REPO / "workflows" / filename
        path.write_text(json.dumps(api_to_ui(graph(), info), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
