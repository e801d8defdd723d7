"""HPS v2 / v2.1 (Human Preference Score, Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human choices.

The score is what the official scorer returns: the cosine between the L2-normalised image and prompt embeddings
(no logit scale; typical values 0.2 .. 0.35).  The image is preprocessed the way HPS evaluates (open_clip's
`resize_longest_max` transform): the longer side resized to 224, the shorter padded with black, then CLIP
mean/std -- not the centre crop of plain CLIP.

Weights: `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` ({'state_dict': ...} in open_clip's key layout), loaded
into ViT-H-14 built without pretrained weights.  ViT-H-14 runs GELU (it was trained from LAION's ViT-H-14, not
from OpenAI's QuickGELU CLIP).  The tokenizer is open_clip's own CLIP BPE, shipped inside the package.
"""
from __future__ import annotations

import os

from .base import Reward
from .clip_common import OpenClipModel, load_open_clip, pad_preprocess

HPS_ARCHITECTURE = "ViT-H-14"


def load_hps(weights_path: str, precision: str = "auto") -> OpenClipModel:
    """The HPS model from a local file; a same-named .json beside it declares another open_clip architecture
    (tests use a tiny one)."""
    clip = load_open_clip(HPS_ARCHITECTURE, weights_path, precision)
    if clip.activation != "GELU":
        raise ValueError(f"{os.path.basename(weights_path)} loaded with {clip.activation} activations, but HPS "
                         "models are ViT-H-14 with GELU (this file carries OpenAI CLIP's key layout: it is not an "
                         "HPS checkpoint)")
    return clip


class HPSReward(Reward):
    differentiable = True

    def __init__(self, clip: OpenClipModel, text: str = "", version: str = "HPS"):
        self.clip, self.text = clip, text.strip()
        self.needs_prompt = not self.text       # no text: score against the sampler's / node's prompt
        what = f"'{self.text}'" if self.text else "the prompt"
        self.name = f"{version} vs {what} ({clip.describe()})"

    def score(self, images, prompts=None, context=None):  # scores each image alone
        img = self.clip.image_embeddings(images, pad_preprocess)
        texts = [self.text] * images.shape[0] if self.text else list(prompts)
        txt = self.clip.text_embeddings(texts).to(img.device)
        return (img * txt).sum(-1)
