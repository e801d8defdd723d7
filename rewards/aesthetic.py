"""LAION improved aesthetic predictor: CLIP image embedding, L2-normalised, into an MLP head.

Head (official `sac+logos+ava1-l14-linearMSE.pth`): Linear(768,1024) Dropout Linear(1024,128) Dropout
Linear(128,64) Dropout Linear(64,16) Linear(16,1) -- state-dict keys layers.0/2/4/6/7; no activations.  The
input width is read from the file, so heads for other backbones work too.
"""
from __future__ import annotations

import logging

import torch

from .base import Reward

HEAD_LAYERS = (0, 2, 4, 6, 7)
OPENAI_VIT_L_WIDTH = 768


class AestheticHead(torch.nn.Module):
    def __init__(self, state: dict, source: str = "this state dict"):
        super().__init__()
        missing = [f"layers.{i}.weight" for i in HEAD_LAYERS if f"layers.{i}.weight" not in state]
        if missing:
            raise ValueError(f"{source} is not an aesthetic predictor head: missing {', '.join(missing)} (expected "
                             "the LAION improved-aesthetic-predictor state dict)")
        dims = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in HEAD_LAYERS]
        self.input_dim = dims[0]
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dims[0], dims[1]), torch.nn.Dropout(0.2), torch.nn.Linear(dims[1], dims[2]),
            torch.nn.Dropout(0.2), torch.nn.Linear(dims[2], dims[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(dims[3], dims[4]), torch.nn.Linear(dims[4], dims[5]))
        self.load_state_dict({k: v for k, v in state.items() if k.startswith("layers.")})
        self.eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class AestheticReward(Reward):
    differentiable = True

    def __init__(self, clip, head: AestheticHead, head_name: str = "aesthetic head"):
        if head.input_dim != clip.embed_dim:
            raise ValueError(f"the aesthetic head {head_name} expects {head.input_dim}-d embeddings but the CLIP "
                             f"backbone {clip.describe()} gives {clip.embed_dim}-d (the official head needs "
                             "ViT-L/14)")
        if getattr(clip, "activation", "QuickGELU") == "GELU" and head.input_dim == OPENAI_VIT_L_WIDTH:
            # the official head was trained on OpenAI ViT-L/14 embeddings, which come from QuickGELU towers
            logging.warning("%s: the backbone %s runs GELU, but the LAION aesthetic head expects OpenAI CLIP "
                            "ViT-L/14 embeddings (QuickGELU); with OpenAI weights load them as ViT-L-14-quickgelu, "
                            "or the scores are off", head_name, clip.describe())
        self.clip, self.head = clip, head
        self.differentiable = getattr(clip, "differentiable", True)
        self.name = f"LAION aesthetic ({head_name} on {clip.describe()})"

    def score(self, images, prompts=None, context=None):  # scores each image alone
        emb = self.clip.image_embeddings(images)
        head = self.head.to(emb.device)
        return head(emb)
