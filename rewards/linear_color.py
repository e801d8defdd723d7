"""Colour reward: affine in the pixels, so its tilted law on the reference model is exact.

score = sum_c weight_c * mean_pixels(image_c) + bias.  "Toward a colour" is the same reward with the weights
pointing from mid-grey to the target colour (unit length) and the bias making grey score 0: the score is how
far the image's mean colour leans toward the target, in RGB units.
"""
from __future__ import annotations

import math

import torch

from .base import Reward

GREY = (0.5, 0.5, 0.5)


class LinearColorReward(Reward):
    linear = True
    differentiable = True

    def __init__(self, weights: tuple[float, float, float], bias: float = 0.0, label: str | None = None):
        self.weights = tuple(float(w) for w in weights)
        self.bias = float(bias)
        self.name = label or "colour reward " + ", ".join(f"{c}={w:g}" for c, w in zip("rgb", self.weights))

    @classmethod
    def toward(cls, target: tuple[float, float, float]) -> "LinearColorReward":
        direction = [t - g for t, g in zip(target, GREY)]
        norm = math.sqrt(sum(d * d for d in direction))
        if norm < 1e-6:
            raise ValueError("the target colour is mid-grey (0.5, 0.5, 0.5): it gives no direction to move toward")
        unit = tuple(d / norm for d in direction)
        bias = -sum(u * g for u, g in zip(unit, GREY))
        return cls(unit, bias, label="toward colour (" + ", ".join(f"{t:.2f}" for t in target) + ")")

    def score(self, images, prompts=None, context=None):  # scores each image alone
        w = torch.tensor(self.weights, dtype=images.dtype, device=images.device)
        return images.mean(dim=(1, 2)) @ w + self.bias
