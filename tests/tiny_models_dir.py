"""A models folder of tiny stand-in files for workflows that name the user's model files (tests only).

`write_named_files(root, api_graphs, unet_families)` writes, under the file names the graphs use, every file this pack's and ComfyUI's
loaders can read in its real format with seeded random weights:
- open_clip checkpoints (models/open_clip): the tiny open_clip architecture of tests/test_clip_rewards.py with a
  768-d embedding (ViT-L/14's), declared by the same-named .json beside the file;
- aesthetic heads (models/aesthetic): the official key names, 768 wide;
- CLIP vision (models/clip_vision): a full-size ViT-L/14 in ComfyUI's key format, fp16 -- core detection recognises
  nothing smaller as CLIP;
- HPS v2.1, PickScore and ImageReward files (models/hps, models/pickscore, models/image_reward): tiny, in the users'
  formats, by tests/test_preference_rewards.write_tiny_preference_models (its names: those of the README and the
  examples);
- diffusion models (models/diffusion_models) for core UNETLoader, where the host's model detection takes the
  family's tiny file (reference/tiny_families.py); otherwise the test swaps the loader for the tiny family node.
`models_config` makes the folders and the extra_model_paths.yaml that points a server at them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import harness
from test_clip_rewards import TINY, tiny_head, write_vit_l_clip_vision

EMBED_DIM = 768   # ViT-L/14's image embedding: one aesthetic head fits the open_clip and the CLIP-vision backbones
FOLDERS = {"RewardSteerLoadOpenClip": ("weights", "open_clip"), "RewardSteerAestheticReward": ("head", "aesthetic"),
           "CLIPVisionLoader": ("clip_name", "clip_vision"), "UNETLoader": ("unet_name", "diffusion_models"),
           "RewardSteerHPSReward": ("weights", "hps"), "RewardSteerPickScoreReward": ("weights", "pickscore"),
           "RewardSteerImageReward": ("weights", "image_reward")}
PREFERENCE_FOLDERS = ("hps", "pickscore", "image_reward")   # written by test_preference_rewards


def write_open_clip(folder: Path, name: str, seed: int = 0) -> None:
    """A tiny open_clip checkpoint (safetensors) and its architecture JSON under `name`."""
    import open_clip
    from safetensors.torch import save_file
    config = folder / (Path(name).stem + ".json")
    config.write_text(json.dumps({**TINY, "embed_dim": EMBED_DIM}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        model = open_clip.create_model(config.stem, pretrained=None, load_weights=False)
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / name))


def named_files(api_graphs) -> dict[str, set[str]]:
    """{models folder: file names} that the graphs' file-reading nodes ask for."""
    wanted: dict[str, set[str]] = {}
    for graph in api_graphs:
        for node in graph.values():
            if node["class_type"] in FOLDERS:
                field, folder = FOLDERS[node["class_type"]]
                value = node["inputs"].get(field)
                if isinstance(value, str):
                    wanted.setdefault(folder, set()).add(value)
    return wanted


def models_config(root: Path) -> Path:
    """The models folders (empty until write_named_files) and an extra_model_paths.yaml naming them; a server
    started on it lists the files written later (ComfyUI re-reads a folder whose modification time changed)."""
    lines = ["tests:"]
    for folder in sorted({folder for _, folder in FOLDERS.values()}):
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines.append(f"    {folder}: {root / folder}")
    config = root / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def write_named_files(root: Path, api_graphs, unet_families: dict[str, str]) -> dict[str, set[str]]:
    """Write the files the graphs name (see the module docstring) into the folders of `root`.  `unet_families`:
    UNETLoader file name -> tiny family.  Returns {folder: names written}."""
    from test_preference_rewards import write_tiny_preference_models
    tiny = harness.pack_submodule("reference.tiny_families")
    written: dict[str, set[str]] = {}
    wanted = named_files(api_graphs)
    if set(wanted) & set(PREFERENCE_FOLDERS):
        write_tiny_preference_models(root)
    for folder, names in wanted.items():
        path = root / folder
        for name in sorted(names):
            if folder in PREFERENCE_FOLDERS:
                if (path / name).is_file():       # a name it does not write stays unserved: "no tiny stand-in"
                    written.setdefault(folder, set()).add(name)
                continue
            if folder == "open_clip":
                write_open_clip(path, name)
            elif folder == "aesthetic":
                tiny_head(path / name, EMBED_DIM, seed=8)
            elif folder == "clip_vision":
                write_vit_l_clip_vision(path / name, seed=7)
            elif folder == "diffusion_models":
                family = unet_families.get(name)
                made = tiny.write_tiny_model_file(family, str(path)) if family else None
                if made is None:   # no file route on this host: the test swaps the loader instead
                    continue
                Path(made).rename(path / name)
            written.setdefault(folder, set()).add(name)
    return written
