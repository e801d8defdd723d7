"""Reward nodes on CLIP models the user keeps in ComfyUI's models/ folders (needs open_clip_torch).

models/open_clip   open_clip checkpoints (image + text towers); a same-named .json beside a file declares a
                   custom architecture
models/aesthetic   LAION aesthetic predictor heads (.pth / .safetensors)
The aesthetic reward also takes ComfyUI's own CLIP vision model (core "Load CLIP Vision", models/clip_vision).
"""
from __future__ import annotations

import os

import folder_paths
import open_clip
from comfy_api.latest import io

from ..rewards.aesthetic import AestheticHead, AestheticReward
from ..rewards.clip_common import PRECISIONS, ComfyClipVision, _load_state_dict, load_open_clip
from ..rewards.clip_score import ClipScoreReward
from ..rewards.model_files import missing_file_message
from .types import Reward

CATEGORY = "reward_steering/rewards"
OpenClip = io.Custom("OPEN_CLIP")
FOLDERS = ("open_clip", "aesthetic")


def register_folders() -> None:
    for name in FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        paths, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        # an extra_model_paths.yaml may have created the entry first, with no extension filter
        folder_paths.folder_names_and_paths[name] = (paths + ([default] if default not in paths else []),
                                                     set(extensions) | set(folder_paths.supported_pt_extensions))


register_folders()


def resolve(folder: str, filename: str) -> str:
    """Full path of a file in a models/ folder, or an error that says what the file is, where users get it, where
    to put it and what is there."""
    path = folder_paths.get_full_path(folder, filename) if filename else None
    if path is None:
        raise FileNotFoundError(missing_file_message(folder, filename or "(no file chosen)",
                                                     folder_paths.get_folder_paths(folder),
                                                     folder_paths.get_filename_list(folder)))
    return path


def file_check(folder: str, filename, companions=None):
    """validate_inputs of the loader nodes: True, or the missing-file error as the message ComfyUI shows when the
    prompt is queued (in place of core's bare "value not in list")."""
    try:
        path = resolve(folder, filename)
        if companions is not None:
            companions(path)
    except FileNotFoundError as e:
        return str(e)
    return True


_cache: dict = {}


def cached(key, build):
    """Models stay loaded across queued prompts (ComfyUI's memory manager may still offload them)."""
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


class LoadOpenClip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerLoadOpenClip",
            display_name="Load OpenCLIP (for rewards)",
            category=CATEGORY,
            description="An open_clip model from models/open_clip for the CLIP-score and aesthetic rewards. "
                        "Pick the architecture the file was trained with: OpenAI's weights (the LAION aesthetic "
                        "head's backbone) need a -quickgelu one (ViT-L-14-quickgelu); LAION / DataComp weights the "
                        "plain one (ViT-L-14). A file in OpenAI's own layout is detected and run with QuickGELU.",
            inputs=[io.Combo.Input("architecture", options=open_clip.list_models(), default="ViT-L-14-quickgelu",
                                   tooltip="OpenAI CLIP weights use QuickGELU: ViT-L-14-quickgelu; LAION / DataComp "
                                           "weights: ViT-L-14"),
                    io.Combo.Input("weights", options=folder_paths.get_filename_list("open_clip"),
                                   tooltip="an open_clip checkpoint (.safetensors / .bin / .pt) in models/open_clip "
                                           "(or a folder extra_model_paths.yaml names open_clip); a same-named .json "
                                           "beside it declares a custom architecture"),
                    io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                                   tooltip="auto: fp16 on a GPU that supports it, fp32 on the CPU")],
            outputs=[OpenClip.Output(display_name="clip",
                                     tooltip="the CLIP model, loaded once and kept across prompts: connect to "
                                             "LAION Aesthetic Reward or CLIP Score Reward")],
        )

    @classmethod
    def validate_inputs(cls, weights=None):
        return file_check("open_clip", weights)

    @classmethod
    def execute(cls, architecture, weights, precision="auto") -> io.NodeOutput:
        path = resolve("open_clip", weights)
        return io.NodeOutput(cached(("open_clip", architecture, path, os.path.getmtime(path), precision),
                                    lambda: load_open_clip(architecture, path, precision)))


class AestheticRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerAestheticReward",
            display_name="LAION Aesthetic Reward",
            category=CATEGORY,
            description="LAION improved aesthetic predictor: the head from models/aesthetic on the CLIP image "
                        "embedding (L2-normalised). Scores roughly 1..10. Differentiable. The CLIP can be an "
                        "open_clip ViT-L-14 (Load OpenCLIP) or ComfyUI's CLIP vision ViT-L/14 (Load CLIP Vision, "
                        "models/clip_vision).",
            inputs=[io.MultiType.Input("clip", types=[OpenClip, io.ClipVision],
                                       tooltip="the backbone the head was trained on: OpenAI CLIP ViT-L/14, from "
                                               "Load OpenCLIP (architecture ViT-L-14-quickgelu; gives gradients) or "
                                               "core Load CLIP Vision (no gradients)"),
                    io.Combo.Input("head", options=folder_paths.get_filename_list("aesthetic"),
                                   tooltip="the aesthetic predictor head, e.g. sac+logos+ava1-l14-linearMSE.pth, in "
                                           "models/aesthetic; its input width must match the CLIP's embedding")],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="aesthetic score per image (about 1..10), differentiable with an "
                                           "open_clip backbone")],
        )

    @classmethod
    def validate_inputs(cls, head=None):
        return file_check("aesthetic", head)

    @classmethod
    def execute(cls, clip, head) -> io.NodeOutput:
        if not hasattr(clip, "image_embeddings"):   # ComfyUI's CLIP_VISION
            clip = ComfyClipVision(clip)
        path = resolve("aesthetic", head)
        module = cached(("aesthetic", path, os.path.getmtime(path)),
                        lambda: AestheticHead(_load_state_dict(path), f"{head} ({path})"))
        return io.NodeOutput(AestheticReward(clip, module, head))


class ClipScoreRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerClipScoreReward",
            display_name="CLIP Score Reward",
            category=CATEGORY,
            description="Cosine between each image and the text (empty: the prompt given to the sampler or Score "
                        "node), minus the cosine to the negative text if given. Differentiable.",
            inputs=[OpenClip.Input("clip", tooltip="an open_clip model from Load OpenCLIP (image and text towers)"),
                    io.String.Input("text", default="", multiline=True,
                                    tooltip="what the image should show; empty: the prompt given to the sampler "
                                            "or Score Images (their prompt input)"),
                    io.String.Input("negative_text", default="", multiline=True,
                                    tooltip="optional: what the image should not show; its cosine is subtracted "
                                            "(empty = nothing subtracted)")],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="cosine of image and text per image (about -1..1, typically 0.2..0.35), "
                                           "differentiable")],
        )

    @classmethod
    def execute(cls, clip, text, negative_text) -> io.NodeOutput:
        return io.NodeOutput(ClipScoreReward(clip, text, negative_text))


NODES = [LoadOpenClip, AestheticRewardNode, ClipScoreRewardNode]
