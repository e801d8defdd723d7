"""CLIP score: cosine between each image and the prompt (minus the cosine to an optional negative text)."""
from __future__ import annotations

from .base import Reward


class ClipScoreReward(Reward):
    differentiable = True

    def __init__(self, clip, text: str = "", negative_text: str = ""):
        self.clip, self.text, self.negative_text = clip, text.strip(), negative_text.strip()
        self.needs_prompt = not self.text          # no text: score against the sampler's / node's prompt
        what = f"'{self.text}'" if self.text else "the prompt"
        self.name = f"CLIP score vs {what}" + (f" minus '{self.negative_text}'" if self.negative_text else "") + \
            f" ({clip.describe()})"

    def score(self, images, prompts=None, context=None):  # scores each image alone
        img = self.clip.image_embeddings(images)
        texts = [self.text] * images.shape[0] if self.text else list(prompts)
        txt = self.clip.text_embeddings(texts).to(img.device)
        score = (img * txt).sum(-1)
        if self.negative_text:
            neg = self.clip.text_embeddings([self.negative_text]).to(img.device)
            score = score - (img * neg).sum(-1)
        return score
