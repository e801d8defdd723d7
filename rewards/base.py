"""The REWARD protocol: a batch of images [B, H, W, C] in [0, 1] (plus prompts where needed) -> float scores [B].

Every reward in this folder subclasses `Reward`, implements `score`, and declares what it is:
  differentiable  gradients flow from the scores back to the pixels (gradient-guided SMC needs this)
  needs_prompt    the score depends on the text prompt; callers must pass one prompt per image
  linear          the score is affine in the pixels, so the exact tilted law of the reference model is known
Callers use `reward(images, prompts, context)`, which validates the input and the output once for every reward.

A sampler scores K candidates for each of its B batch items in one call; `ScoringContext` tells a reward which
images are candidates for the same item and at which step, so that rewards which compare candidates (a VLM
tournament, a person picking) compare only like with like.  Rewards that score each image alone ignore it.

Video: a sampler of video latents passes whole clips, frames back to back ([clips * F, H, W, C], the context's
`clip_frames` = F), and gets one score per clip.  A reward declares how (`video`):
  "frame_mean"  (the default) score() sees the frames as images, with each frame's group, and the clip scores
                the mean of its frames' scores
  "clip"        score() sees the whole clips with the context as given and returns one score per clip
  None          it cannot score video; it is refused, named, before sampling
  compares_candidates  a score depends on the other images of its group (z-score / rank, tournaments, a person
                picking): the caller passes every candidate of a batch item in one call.  Others may be scored
                a few candidates at a time, which bounds the memory of long clips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

REWARD_TYPE = "REWARD"  # the ComfyUI socket type that carries a Reward


class RewardInputError(ValueError):
    """Bad images or prompts given to a reward; the message says what to change."""


def as_image_batch(images, who: str) -> torch.Tensor:
    """Validate a ComfyUI IMAGE batch: [B, H, W, C] (or [H, W, C]), 1/3/4 channels -> float [B, H, W, 3]."""
    if not torch.is_tensor(images):
        raise RewardInputError(f"{who}: expected an IMAGE tensor [B, H, W, C], got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise RewardInputError(f"{who}: expected an IMAGE of shape [B, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise RewardInputError(f"{who}: the image batch is empty; connect a node that produces at least one image")
    channels = images.shape[-1]
    if channels == 4:      # RGBA: the reward scores the colour, not the transparency
        images = images[..., :3]
    elif channels == 1:    # greyscale
        images = images.expand(*images.shape[:-1], 3)
    elif channels != 3:
        raise RewardInputError(f"{who}: images must have 1, 3 or 4 channels in the last dimension "
                               f"([B, H, W, C]); got shape {tuple(images.shape)}")
    return images if images.dtype.is_floating_point else images.float() / 255.0


@dataclass(frozen=True)
class ScoringContext:
    """What the caller knows about a batch of images it asks to have scored."""
    groups: tuple[int, ...] | None = None  # per image, the batch item it is a candidate for (None: one group)
    step: int | None = None                # sampling step (0-based) the candidates come from
    steps: int | None = None               # number of steps in the run
    clip_frames: int | None = None         # video: the images are clips of this many frames each, back to back;
    #                                        `groups` still names one group per image (frame)

    def clip_count(self, n: int, who: str) -> int:
        """Clips in n images (n when the images are not video)."""
        if not self.clip_frames:
            return n
        if n % self.clip_frames:
            raise RewardInputError(f"{who}: {n} frames do not make clips of {self.clip_frames} frames")
        return n // self.clip_frames

    def frames_as_images(self) -> "ScoringContext":
        """The context for scoring the frames of the clips as images (each frame keeps its group)."""
        return ScoringContext(groups=self.groups, step=self.step, steps=self.steps)

    def group_indices(self, n: int) -> list[list[int]]:
        """Image indices of each group, groups in order of first appearance."""
        if self.groups is None:
            return [list(range(n))]
        if len(self.groups) != n:
            raise RewardInputError(f"scoring context names groups for {len(self.groups)} images, got {n} images")
        members: dict[int, list[int]] = {}
        for index, group in enumerate(self.groups):
            members.setdefault(group, []).append(index)
        return list(members.values())


NO_CONTEXT = ScoringContext()


VIDEO_SCORING = ("frame_mean", "clip", None)


class Reward:
    name: str = "reward"
    differentiable: bool = False
    needs_prompt: bool = False
    linear: bool = False
    video: str | None = "frame_mean"   # how it scores clips: see VIDEO_SCORING and the module docstring
    compares_candidates: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              context: ScoringContext = NO_CONTEXT) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                 context: ScoringContext | None = None) -> torch.Tensor:
        images = as_image_batch(images, self.name)
        context = context or NO_CONTEXT
        n = context.clip_count(images.shape[0], self.name)   # what gets one score each: images, or clips
        if context.clip_frames and self.video not in ("frame_mean", "clip"):
            raise RewardInputError(f"{self.describe()} cannot score video (here {n} clips of {context.clip_frames} "
                                   "frames): use a reward that scores images or clips")
        if self.needs_prompt:
            if prompts is None or len(prompts) == 0:
                raise RewardInputError(f"{self.name} needs a prompt: give it a text input or use it in a sampler "
                                       "that passes the prompt")
            if len(prompts) == 1:
                prompts = list(prompts) * n
            if len(prompts) != n:
                raise RewardInputError(f"{self.name}: {len(prompts)} prompts for {n} "
                                       f"{'clips' if context.clip_frames else 'images'}")
        if context.clip_frames and self.video == "frame_mean":
            frames = context.clip_frames
            frame_prompts = ([p for p in prompts for _ in range(frames)] if prompts is not None and len(prompts) == n
                             else prompts)   # one per clip -> one per frame; a single prompt serves all
            per_frame = self._checked(self.score(images, frame_prompts, context.frames_as_images()), images.shape[0])
            return per_frame.reshape(n, frames).mean(dim=1)
        return self._checked(self.score(images, prompts, context), n)

    def _checked(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        if scores.shape != (n,):
            raise RuntimeError(f"{self.name} returned scores of shape {tuple(scores.shape)} "
                               f"for {n} images or clips (expected [{n}])")
        return scores.float()
