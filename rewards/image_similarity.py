"""Similarity to a reference image: no weights, differentiable, and exact-oracle friendly (quadratic).

The reference is resized (bilinear) to each candidate's size.  A reference batch of 1 is compared with every
image; a batch of B gives one reference per image.
  neg_mse  -mean((image - reference)^2)                       0 for an identical image, negative otherwise
  cosine   cosine between (image - 0.5) and (reference - 0.5)  1 for the same picture, structure over brightness
"""
from __future__ import annotations

import torch

from .base import Reward, RewardInputError, as_image_batch

METRICS = ("neg_mse", "cosine")


class ImageSimilarityReward(Reward):
    differentiable = True

    def __init__(self, reference: torch.Tensor, metric: str = "neg_mse"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.reference = as_image_batch(reference, "reference image").float()
        self.metric = metric
        self.name = f"similarity to reference ({metric})"

    def _reference_for(self, images: torch.Tensor) -> torch.Tensor:
        ref = self.reference.to(images.device, images.dtype)
        if ref.shape[0] not in (1, images.shape[0]):
            raise RewardInputError(f"{self.name}: {ref.shape[0]} reference images for {images.shape[0]} images; "
                                   "give one reference, or one per image")
        if ref.shape[1:3] != images.shape[1:3]:
            ref = torch.nn.functional.interpolate(ref.movedim(-1, 1), size=tuple(images.shape[1:3]),
                                                  mode="bilinear", align_corners=False).movedim(1, -1)
        return ref.expand(images.shape[0], -1, -1, -1)

    def score(self, images, prompts=None, context=None):  # scores each image alone
        ref = self._reference_for(images)
        if self.metric == "neg_mse":
            return -((images - ref) ** 2).mean(dim=(1, 2, 3))
        a = (images - 0.5).reshape(images.shape[0], -1)
        b = (ref - 0.5).reshape(images.shape[0], -1)
        return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)
