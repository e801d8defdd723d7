"""A tiny SD1.5-family model on ComfyUI's real UNet code, with deterministic random weights (tests only).

About 1M parameters (model_channels 32, channel_mult [1, 2], context_dim 32): every layer type of the SD1.5
UNet runs (res blocks, cross-attention transformers, up/down sampling) in milliseconds on a CPU.  Its decoder
is ComfyUI's TAESD architecture with random weights, loaded through the core VAE class.  ComfyUI's ops leave
weights uninitialised (NaN), so every tensor is filled here from a seeded generator.
"""
from __future__ import annotations

import hashlib

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd

CONTEXT_DIM = 32
TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM, "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _init_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("weight") and t.ndim == 1:   # normalisation layers: identity scale
                t.copy_(torch.ones_like(t))
            elif name.endswith("bias"):
                t.copy_(torch.zeros_like(t))
            else:
                t.copy_(scale * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


def build_tiny_unet_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    config = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    _init_(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    taesd = comfy.taesd.taesd.TAESD()
    _init_(taesd, seed + 1, scale=0.1)
    taesd.vae_scale.data.fill_(1.0)
    taesd.vae_shift.data.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def prompt_conditioning(prompt: str):
    """Deterministic CONDITIONING for a prompt: a seeded random [1, 77, CONTEXT_DIM] embedding."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    emb = torch.randn((1, 77, CONTEXT_DIM), generator=torch.Generator().manual_seed(seed))
    return [[emb, {}]]
