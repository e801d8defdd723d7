"""Reward nodes: thin adapters that build Reward objects, and a node that scores images with any reward."""
from __future__ import annotations

import json

import torch

from comfy_api.latest import io

from ..rewards import CompositeReward, ImageSimilarityReward, LinearColorReward
from ..rewards.composite import NORMALISATIONS
from ..rewards.image_similarity import METRICS
from .types import Reward

CATEGORY = "reward_steering/rewards"
COLOR_MODES = ["channel weights", "toward colour"]


class ColorReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerColorReward",
            display_name="Colour Reward (linear)",
            category=CATEGORY,
            description="Scores the image's mean colour, linearly. 'channel weights': red*R + green*G + blue*B "
                        "+ bias (1,1,1 = brightness). 'toward colour': how far the mean colour leans from grey "
                        "toward the colour (red, green, blue in 0..1). No weights file needed.",
            inputs=[
                io.Combo.Input("mode", options=COLOR_MODES, default="channel weights"),
                io.Float.Input("red", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("green", default=0.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("blue", default=0.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("bias", default=0.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="added to the score in 'channel weights' mode"),
            ],
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, mode, red, green, blue, bias) -> io.NodeOutput:
        if mode == "toward colour":
            for name, v in (("red", red), ("green", green), ("blue", blue)):
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"in 'toward colour' mode {name} is a colour component in 0..1, got {v}")
            return io.NodeOutput(LinearColorReward.toward((red, green, blue)))
        return io.NodeOutput(LinearColorReward((red, green, blue), bias))


class ImageSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerImageSimilarityReward",
            display_name="Image Similarity Reward",
            category=CATEGORY,
            description="Scores how close each image is to a reference image (resized to match). neg_mse: "
                        "minus the mean squared pixel difference; cosine: cosine of the grey-centred pixels.",
            inputs=[io.Image.Input("reference"), io.Combo.Input("metric", options=list(METRICS), default="neg_mse")],
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, reference, metric) -> io.NodeOutput:
        return io.NodeOutput(ImageSimilarityReward(reference, metric))


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerScoreImages",
            display_name="Score Images",
            category=CATEGORY,
            description="Scores every image of a batch with a reward and shows the scores on the node. Can sort "
                        "the batch best-first and keep the top n: a post-hoc best-of-N.",
            inputs=[io.Image.Input("images"), Reward.Input("reward"),
                    io.String.Input("prompt", default="", multiline=True, optional=True,
                                    tooltip="for rewards that need the prompt"),
                    io.Combo.Input("order", options=["input order", "best first"], default="input order",
                                   optional=True, tooltip="order of the images output"),
                    io.Int.Input("keep_top", default=0, min=0, max=100000, optional=True,
                                 tooltip="keep only the n best images (0 = all)")],
            outputs=[io.String.Output(display_name="scores_json"), io.Float.Output(display_name="mean"),
                     io.Image.Output(display_name="images"),
                     io.Float.Output(display_name="scores", is_output_list=True)],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, reward, prompt="", order="input order", keep_top=0) -> io.NodeOutput:
        scores = reward(images, [prompt] if prompt else None).detach().float().cpu()
        ranking = torch.argsort(scores, descending=True, stable=True)
        chosen = ranking if order == "best first" else torch.arange(len(scores))
        if keep_top > 0:
            top = set(ranking[:keep_top].tolist())
            chosen = torch.tensor([i for i in chosen.tolist() if i in top], dtype=torch.long)
        values = scores.tolist()
        mean = sum(values) / len(values)
        text = f"{reward.describe()}\nmean {mean:.4f} over {len(values)}: " + ", ".join(f"{v:.4f}" for v in values)
        if keep_top > 0:
            text += f"\nkept {len(chosen)}: images " + ", ".join(str(i) for i in chosen.tolist())
        kept = [values[i] for i in chosen.tolist()]
        # "text" is what the node shows; "scores" lets API clients read the numbers from /history.
        return io.NodeOutput(json.dumps({"reward": reward.describe(), "scores": values, "mean": mean,
                                         "kept_indices": chosen.tolist()}), mean,
                             images[chosen.to(images.device)], kept, ui={"text": [text], "scores": values})


class CombineRewards(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerCombineRewards",
            display_name="Combine Rewards",
            category=CATEGORY,
            description="Weighted sum of up to four rewards. Normalise each first (z-score or rank over the "
                        "candidates being compared) when their scales differ.",
            inputs=[
                io.Combo.Input("normalisation", options=list(NORMALISATIONS), default="zscore"),
                Reward.Input("reward_1"),
                io.Float.Input("weight_1", default=1.0, min=-100.0, max=100.0, step=0.01),
                Reward.Input("reward_2", optional=True),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True),
                Reward.Input("reward_3", optional=True),
                io.Float.Input("weight_3", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True),
                Reward.Input("reward_4", optional=True),
                io.Float.Input("weight_4", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True),
            ],
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, normalisation, reward_1, weight_1, reward_2=None, weight_2=1.0, reward_3=None, weight_3=1.0,
                reward_4=None, weight_4=1.0) -> io.NodeOutput:
        parts = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2), (reward_3, weight_3),
                                     (reward_4, weight_4)) if r is not None]
        return io.NodeOutput(CompositeReward(parts, normalisation))


NODES = [ColorReward, ImageSimilarity, ScoreImages, CombineRewards]
