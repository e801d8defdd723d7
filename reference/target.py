"""Exact targets of reward-steered sampling on the reference model.

For a reward that is affine in the pixels and the reference model's affine decoder, the reward is affine in
the latent: r(decode(z)) = <w, z> + c.  `latent_linear_form` recovers (w, c) by one backward pass and checks
the claim at a random point; `exact_target` then gives the tilted law p(z) exp(lam r) in closed form.
"""
from __future__ import annotations

import torch

from .mixture import GaussianMixture
from .pictures import PICTURE_NAMES


class NotLinearError(ValueError):
    pass


def latent_linear_form(reward, decode, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """(w, c) such that reward(decode(z)) == <w, z> + c for every latent z of shape latent_shape."""
    if not getattr(reward, "linear", False):
        raise NotLinearError(f"{reward.name} is not linear in the pixels, so its tilted law has no closed form; "
                             "use a linear reward (e.g. the colour reward) for exact targets")
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.zeros((1,) + tuple(latent_shape), requires_grad=True)
        r0 = reward(decode(z))[0]
        (w,) = torch.autograd.grad(r0, z)
    w, c = w[0].detach().clone(), float(r0.detach())
    probe = 0.5 * torch.randn((1,) + tuple(latent_shape), generator=torch.Generator().manual_seed(0))
    predicted = float((w * probe[0]).sum()) + c
    actual = float(reward(decode(probe))[0])
    if abs(predicted - actual) > 1e-4 * (1.0 + abs(actual)):
        raise NotLinearError(f"{reward.name} says it is linear but is not affine in the latent "
                             f"(predicted {predicted:.6f}, got {actual:.6f} at a random point)")
    return w, c


def exact_target(mixture: GaussianMixture, w: torch.Tensor, c: float, lam: float) -> dict:
    """Component probabilities and expected reward under p and under p*exp(lam*r)."""
    tilted = mixture.tilted(w, lam)
    names = PICTURE_NAMES[:mixture.num_components]
    return {
        "lambda": lam,
        "components": names,
        "base_probabilities": [round(float(p), 6) for p in mixture.weights],
        "tilted_probabilities": [round(float(p), 6) for p in tilted.weights],
        "component_rewards": [round(float((m.double() * w.double()).sum()) + c, 6) for m in mixture.means],
        "expected_reward_base": mixture.expected_linear(w, c),
        "expected_reward_tilted": tilted.expected_linear(w, c),
    }
