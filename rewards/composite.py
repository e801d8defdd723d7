"""Weighted sum of several rewards, each normalised first so rewards of different scales mix safely.

normalisation (per reward, over the candidates being compared: the images of one group of the scoring context,
or all images of the call when the caller gives no groups):
  none    the raw score
  zscore  (r - mean) / std   (0 when all candidates score the same)
  rank    rank in [0, 1] (ties share their mean rank); not differentiable
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import NO_CONTEXT, Reward, ScoringContext

NORMALISATIONS = ("none", "zscore", "rank")


def normalise(scores: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return scores
    if scores.shape[0] == 1:
        return torch.zeros_like(scores) if how == "zscore" else torch.full_like(scores, 0.5)
    if how == "zscore":
        std = scores.std(unbiased=False)
        centred = scores - scores.mean()
        return centred / std if float(std) > 1e-12 else torch.zeros_like(scores)
    if how == "rank":
        s = scores.detach()
        below = (s[None, :] < s[:, None]).sum(1).double()
        equal = (s[None, :] == s[:, None]).sum(1).double()
        return ((below + (equal - 1) / 2) / (len(s) - 1)).to(scores.dtype)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")


def normalise_groups(scores: torch.Tensor, how: str, context: ScoringContext) -> torch.Tensor:
    """normalise() within each group of candidates separately."""
    if how == "none":
        return scores
    out = torch.empty_like(scores)
    for members in context.group_indices(scores.shape[0]):
        idx = torch.tensor(members, device=scores.device)
        out = out.index_copy(0, idx, normalise(scores[idx], how))
    return out


class CompositeReward(Reward):
    def __init__(self, parts: Sequence[tuple[Reward, float]], normalisation: str = "none"):
        if not parts:
            raise ValueError("connect at least one reward to combine")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.parts = list(parts)
        self.normalisation = normalisation
        self.differentiable = normalisation != "rank" and all(r.differentiable for r, _ in self.parts)
        self.needs_prompt = any(r.needs_prompt for r, _ in self.parts)
        self.linear = normalisation == "none" and all(r.linear for r, _ in self.parts)
        self.compares_candidates = normalisation != "none" or any(r.compares_candidates for r, _ in self.parts)
        self.video = "frame_mean" if all(r.video for r, _ in self.parts) else None   # parts score clips' frames
        self.name = " + ".join(f"{w:g}*[{r.describe()}]" for r, w in self.parts) + f" ({normalisation})"

    def score(self, images, prompts=None, context=NO_CONTEXT):
        total = None
        for reward, weight in self.parts:
            raw = reward(images, prompts if reward.needs_prompt else None, context)
            part = weight * normalise_groups(raw, self.normalisation, context)
            total = part if total is None else total + part.to(total.device)
        return total
