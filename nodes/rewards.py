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
                io.Combo.Input("mode", options=COLOR_MODES, default="channel weights",
                               tooltip="channel weights: score = red x mean R + green x mean G + blue x mean B + "
                                       "bias (1, 1, 1 = brightness). toward colour: red, green, blue are a target "
                                       "colour in 0..1; score = how far the mean colour leans from grey toward it"),
                io.Float.Input("red", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="channel weights: weight of the mean red (negative = less red); toward "
                                       "colour: the target's red in 0..1"),
                io.Float.Input("green", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="channel weights: weight of the mean green; toward colour: the target's "
                                       "green in 0..1"),
                io.Float.Input("blue", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="channel weights: weight of the mean blue; toward colour: the target's "
                                       "blue in 0..1"),
                io.Float.Input("bias", default=0.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="added to the score in 'channel weights' mode (shifts every score alike: "
                                       "no effect on steering, which compares candidates)"),
            ],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="a linear, differentiable reward: connect to a sampler's reward, Score "
                                           "Images or Combine Rewards (exact target on the Reference Model)")],
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
            inputs=[io.Image.Input("reference", tooltip="the image to resemble (Load Image); resized to each scored "
                                                        "image's size; one image, or one per scored image"),
                    io.Combo.Input("metric", options=list(METRICS), default="neg_mse",
                                   tooltip="neg_mse: minus the mean squared pixel difference (0 = identical; "
                                           "exact target on the Reference Model); cosine: cosine of the pixels "
                                           "centred on grey (1 = same pattern, ignores contrast)")],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="a differentiable reward: connect to a sampler's reward, Score Images "
                                           "or Combine Rewards")],
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
            inputs=[io.Image.Input("images", tooltip="the images to score (e.g. VAE Decode's output); any size"),
                    Reward.Input("reward", tooltip="the reward that scores each image (any reward node)"),
                    io.String.Input("prompt", default="", multiline=True, optional=True,
                                    tooltip="the prompt text for rewards that compare image and text (CLIP "
                                            "score, HPS, PickScore, ImageReward, VLM) when their own text is "
                                            "empty"),
                    io.Combo.Input("order", options=["input order", "best first"], default="input order",
                                   optional=True, tooltip="order of the images output"),
                    io.Int.Input("keep_top", default=0, min=0, max=100000, optional=True,
                                 tooltip="keep only the n best images (0 = all)")],
            outputs=[io.String.Output(display_name="scores_json",
                                      tooltip="JSON: the reward's name, every image's score in input order, the "
                                              "mean and the indices of the images output"),
                     io.Float.Output(display_name="mean", tooltip="the mean score over all input images"),
                     io.Image.Output(display_name="images",
                                     tooltip="the images in the chosen order, only the keep_top best if set"),
                     io.Float.Output(display_name="scores", is_output_list=True,
                                     tooltip="the scores of the images output, as a list (one FLOAT each)")],
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
                io.Combo.Input("normalisation", options=list(NORMALISATIONS), default="zscore",
                               tooltip="applied to each reward before weighting, over the candidates compared "
                                       "together (one item's K candidates or particles): zscore = (r - mean) / "
                                       "std; rank = rank in 0..1 (not differentiable); none = raw scores (keep "
                                       "their scales in mind when choosing weights)"),
                Reward.Input("reward_1", tooltip="first reward (required)"),
                io.Float.Input("weight_1", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="weight of reward_1 in the sum (negative = penalise it)"),
                Reward.Input("reward_2", optional=True, tooltip="optional second reward"),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="weight of reward_2 (ignored when reward_2 is not connected)"),
                Reward.Input("reward_3", optional=True, tooltip="optional third reward"),
                io.Float.Input("weight_3", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="weight of reward_3 (ignored when reward_3 is not connected)"),
                Reward.Input("reward_4", optional=True, tooltip="optional fourth reward"),
                io.Float.Input("weight_4", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="weight of reward_4 (ignored when reward_4 is not connected)"),
            ],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="the weighted sum, usable wherever a reward is; differentiable when "
                                           "every part is and normalisation is not rank")],
        )

    @classmethod
    def execute(cls, normalisation, reward_1, weight_1, reward_2=None, weight_2=1.0, reward_3=None, weight_3=1.0,
                reward_4=None, weight_4=1.0) -> io.NodeOutput:
        parts = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2), (reward_3, weight_3),
                                     (reward_4, weight_4)) if r is not None]
        return io.NodeOutput(CompositeReward(parts, normalisation))


NODES = [ColorReward, ImageSimilarity, ScoreImages, CombineRewards]
