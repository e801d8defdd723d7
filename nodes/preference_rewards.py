"""Human-preference rewards from files the user keeps in ComfyUI's models/ folders (no hub, no extra packages:
open_clip_torch and transformers, which ComfyUI and the pack already have).

models/hps            HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (open_clip ViT-H-14)
models/pickscore      the PickScore_v1 folder: config.json, model.safetensors (or pytorch_model.bin), and if
                      present preprocessor_config.json and the tokenizer files; a weights file is read with the
                      configs of the folder it is in
models/image_reward   ImageReward.pt, med_config.json and a folder bert-base-uncased/ with BERT's vocab.txt
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..rewards.clip_common import PRECISIONS
from ..rewards.hps import HPSReward, load_hps
from ..rewards.image_reward import ImageRewardModel, ImageRewardReward, image_reward_files
from ..rewards.pickscore import PickScoreModel, PickScoreReward, check_pickscore_files
from .clip_rewards import cached, file_check, resolve
from .types import Reward

CATEGORY = "reward_steering/rewards"
FOLDERS = {"hps": {".pt", ".pth", ".safetensors", ".bin"},
           "pickscore": {".safetensors", ".bin"},
           "image_reward": {".pt", ".pth", ".safetensors", ".bin"}}


def register_folders() -> None:
    for name, extensions in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        paths, known = folder_paths.folder_names_and_paths.get(name, ([], set()))
        # an extra_model_paths.yaml may have created the entry first, with no extension filter
        folder_paths.folder_names_and_paths[name] = (paths + ([default] if default not in paths else []),
                                                     set(known) | extensions)


register_folders()


def precision_input():
    return io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                          tooltip="auto: fp16 on a GPU that supports it, fp32 on the CPU (bf16 is faster on CPUs "
                                  "with bfloat16 instructions)")


def text_input():
    return io.String.Input("text", default="", multiline=True, optional=True,
                           tooltip="the prompt to score against; empty: the prompt the sampler or Score node "
                                   "passes")


def load_cached(folder: str, filename: str, precision: str, build):
    path = resolve(folder, filename)
    return cached((folder, path, os.path.getmtime(path), precision), lambda: build(path, precision))


class HPSRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerHPSReward",
            display_name="HPS v2 / v2.1 Reward",
            category=CATEGORY,
            description="Human Preference Score v2 / v2.1: cosine of image and prompt in the HPS-tuned open_clip "
                        "ViT-H-14 (about 0.2 .. 0.35). Weights HPS_v2.1_compressed.pt or HPS_v2_compressed.pt in "
                        "models/hps (huggingface.co/xswu/HPSv2). Differentiable.",
            inputs=[io.Combo.Input("weights", options=folder_paths.get_filename_list("hps"),
                                   tooltip="HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) in models/hps; the "
                                           "version is read from the name"),
                    text_input(), precision_input()],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="HPS score per image (about 0.2..0.35), differentiable")],
        )

    @classmethod
    def validate_inputs(cls, weights=None):
        return file_check("hps", weights)

    @classmethod
    def execute(cls, weights, text="", precision="auto") -> io.NodeOutput:
        clip = load_cached("hps", weights, precision, load_hps)
        version = "HPSv2.1" if "2.1" in weights else "HPSv2" if "v2" in weights.lower() else "HPS"
        return io.NodeOutput(HPSReward(clip, text, version))


class PickScoreRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerPickScoreReward",
            display_name="PickScore Reward",
            category=CATEGORY,
            description="PickScore: logit scale times the cosine of image and prompt in the PickScore CLIP "
                        "ViT-H/14 (about 18 .. 24). Put the PickScore_v1 folder (huggingface.co/yuvalkirstain/"
                        "PickScore_v1: config.json and the weights; its tokenizer files if it has them, else "
                        "ComfyUI's CLIP tokenizer is used) in models/pickscore and pick its weights file. "
                        "Differentiable.",
            inputs=[io.Combo.Input("weights", options=folder_paths.get_filename_list("pickscore"),
                                   tooltip="the weights file inside the PickScore_v1 folder in models/pickscore "
                                           "(PickScore_v1/model.safetensors); its config.json must be beside it"),
                    text_input(), precision_input()],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="PickScore per image (about 18..24), differentiable")],
        )

    @classmethod
    def validate_inputs(cls, weights=None):
        return file_check("pickscore", weights, check_pickscore_files)

    @classmethod
    def execute(cls, weights, text="", precision="auto") -> io.NodeOutput:
        return io.NodeOutput(PickScoreReward(load_cached("pickscore", weights, precision, PickScoreModel), text))


class ImageRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerImageReward",
            display_name="ImageReward Reward",
            category=CATEGORY,
            description="ImageReward: BLIP image-text model with a preference head (about -2 .. 2). Put "
                        "ImageReward.pt and med_config.json (huggingface.co/THUDM/ImageReward) in "
                        "models/image_reward, and BERT's vocab.txt (huggingface.co/google-bert/bert-base-uncased) "
                        "in models/image_reward/bert-base-uncased/. Differentiable.",
            inputs=[io.Combo.Input("weights", options=folder_paths.get_filename_list("image_reward"),
                                   tooltip="ImageReward.pt in models/image_reward, with med_config.json and "
                                           "bert-base-uncased/vocab.txt beside it"),
                    text_input(), precision_input()],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="ImageReward score per image (about -2..2), differentiable")],
        )

    @classmethod
    def validate_inputs(cls, weights=None):
        return file_check("image_reward", weights, image_reward_files)

    @classmethod
    def execute(cls, weights, text="", precision="auto") -> io.NodeOutput:
        model = load_cached("image_reward", weights, precision, ImageRewardModel)
        return io.NodeOutput(ImageRewardReward(model, text))


NODES = [HPSRewardNode, PickScoreRewardNode, ImageRewardNode]
