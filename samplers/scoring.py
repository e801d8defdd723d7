"""Decode-and-score: latent x0 estimates -> images through a VAE -> rewards.  Shared by every steering sampler."""
from __future__ import annotations

import logging

import torch

from ..rewards.base import ScoringContext
from .model_calls import ComputeCounter, allow_gradients_through, base_model_of


class SteeringInputError(ValueError):
    """A steering sampler was given inputs that cannot work together; the message names the input."""


def require_choice(name: str, value, options) -> None:
    if value not in options:
        raise SteeringInputError(f"{name} must be one of {tuple(options)}, got {value!r}")


def check_vae_matches(vae, latent_channels: int) -> None:
    vae_channels = getattr(vae, "latent_channels", None)
    if vae_channels is not None and vae_channels != latent_channels:
        raise SteeringInputError(f"the VAE decodes {vae_channels}-channel latents but this model's latents have "
                                 f"{latent_channels} channels: connect the VAE that belongs to the model "
                                 "(or a matching TAESD)")


def _item_prompts(prompts, batch: int, n: int):
    if not prompts:
        return None
    per_item = (list(prompts) * batch)[:batch] if len(prompts) == 1 else list(prompts)
    if len(per_item) != batch:
        raise SteeringInputError(f"{len(per_item)} prompts for a batch of {batch}")
    return per_item * (n // batch)


DECODERS = ("vae", "latent_rgb")


def latent_rgb_decode(base_model, x0: torch.Tensor) -> torch.Tensor:
    """The live-preview decoder: the model's linear latent -> RGB factors, at latent resolution, [n, h, w, 3].
    Nearly free; approximate for SD-family latents (exact for the reference model), good enough for colour-type
    rewards, not for rewards that judge detail."""
    fmt = base_model.latent_format
    if fmt.latent_rgb_factors is None:
        raise SteeringInputError("this model's latent format has no RGB preview factors: use decoder 'vae'")
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=x0.dtype, device=x0.device)
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=x0.dtype, device=x0.device)
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    if reshape is not None:  # e.g. Flux 2: 128 channels = 32 channels x 2x2 patches, unpacked before the factors
        x0 = reshape(x0)
    if x0.ndim == 5:  # video latents: frames into the batch
        x0 = x0.movedim(2, 1).reshape(-1, x0.shape[1], *x0.shape[-2:])
    return ((x0.movedim(1, -1) @ factors + bias + 1.0) / 2.0).clamp(0.0, 1.0)


def make_latent_scorer(vae, reward, prompts: list[str] | None = None, differentiable: bool = False,
                       decoder: str = "vae"):
    """score(model, x0, batch, counter, step=None) -> float32 rewards [n] for n = k*batch candidate-major x0: detached
    on the CPU, or (differentiable=True) on x0's device with the graph back to x0, for gradient-guided proposals.
    step = (i, steps) is passed on to the reward in its ScoringContext, with the batch item of each candidate.
    decoder: 'vae' (the VAE given) or 'latent_rgb' (the live-preview projection, nearly free)."""
    if decoder not in DECODERS:
        raise SteeringInputError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if differentiable and not getattr(reward, "differentiable", False):
        raise SteeringInputError(f"gradient guidance needs a differentiable reward, and {reward.describe()} is not; "
                                 "turn gradient guidance off (gradient-free SMC works with any reward)")

    def score(model, x0: torch.Tensor, batch: int, counter: ComputeCounter, step: tuple[int, int] | None = None):
        if decoder == "latent_rgb":
            images = latent_rgb_decode(base_model_of(model), x0)
        else:
            check_vae_matches(vae, x0.shape[1])
            if differentiable:
                allow_gradients_through(getattr(vae, "first_stage_model", None))
            images = vae.decode(base_model_of(model).process_latent_out(x0))
            if images.ndim == 5:  # video VAEs: frames into the batch
                images = images.reshape(-1, *images.shape[-3:])
        counter.decode_items += x0.shape[0]
        context = ScoringContext(groups=tuple(j % batch for j in range(images.shape[0])) if images.shape[0] == x0.shape[0]
                                 else None, step=step[0] if step else None, steps=step[1] if step else None)
        scores = reward(images, _item_prompts(prompts, batch, x0.shape[0]), context)
        counter.reward_items += x0.shape[0]
        return scores.float() if differentiable else scores.detach().float().cpu()

    return score


def finite_or_flat(scores: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with non-finite entries zeroed, per-column flag 'all finite') for scores [K, B].  Columns with a
    NaN / inf get a warning; the caller gives them equal weights instead of crashing."""
    ok = torch.isfinite(scores).all(dim=0)
    if not bool(ok.all()):
        logging.warning("[reward-steering] %s returned NaN/inf rewards for batch item(s) %s; using equal weights "
                        "for them at this step", what, torch.nonzero(~ok).flatten().tolist())
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores)), ok
