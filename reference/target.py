"""Exact targets of reward-steered sampling on the reference model.

For a reward that is affine in the pixels and the reference model's affine decoder, the reward is affine in
the latent: r(decode(z)) = <w, z> + c.  `latent_linear_form` recovers (w, c) by one backward pass and checks
the claim at a random point.  -MSE to a picture is quadratic in the pixels, and through the decoder (each latent
pixel becomes the same number of image pixels) an isotropic quadratic in the latent:
r(decode(z)) = c + <w, z> + (h/2) |z|^2; `latent_quadratic_form` recovers (w, c, h) from two gradients and checks
it at random points.  `exact_target` then gives the tilted law p(z) exp(lam r) in closed form for either.
"""
from __future__ import annotations

import torch

from .mixture import GaussianMixture
from .pictures import PICTURE_NAMES


class NotLinearError(ValueError):
    pass


class NotQuadraticError(ValueError):
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


def _value_and_gradient(reward, decode, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode(False), torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        r = reward(decode(z))[0]
        (grad,) = torch.autograd.grad(r, z)
    return float(r.detach()), grad[0].detach().double()


def latent_quadratic_form(reward, decode, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, float, float]:
    """(w, c, h) such that reward(decode(z)) == c + <w, z> + (h/2) |z|^2 for every latent z (h = 0 for an affine
    reward).  Raises NotQuadraticError for rewards of any other form (e.g. cosine similarity)."""
    if not getattr(reward, "differentiable", False):
        raise NotQuadraticError(f"{reward.name} is not differentiable, so its form in the latent cannot be read")
    shape = (1,) + tuple(latent_shape)
    probes = 0.5 * torch.randn((3,) + shape, generator=torch.Generator().manual_seed(0))
    c, w = _value_and_gradient(reward, decode, torch.zeros(shape))
    _, grad_u = _value_and_gradient(reward, decode, probes[0])
    u = probes[0][0].double()
    # the gradient of c + <w, z> + (h/2)|z|^2 is w + h z: read h along u, then check it everywhere
    h = float(((grad_u - w) * u).sum() / (u * u).sum())
    scale = float(grad_u.abs().max()) + float(w.abs().max())
    mismatch = float((grad_u - w - h * u).abs().max())
    if mismatch > 1e-4 * scale + 1e-9:
        raise NotQuadraticError(f"{reward.name} is not an isotropic quadratic in the latent (its gradient at a random "
                                f"point is off the form by {mismatch:.3g}), so its tilted law has no closed form "
                                "here; use a linear reward or -MSE to a picture")
    for probe in probes[1:]:
        p = probe[0].double()
        predicted = c + float((w * p).sum()) + 0.5 * h * float((p * p).sum())
        actual = float(reward(decode(probe))[0])
        if abs(predicted - actual) > 1e-4 * (1.0 + abs(actual)):
            raise NotQuadraticError(f"{reward.name} is not an isotropic quadratic in the latent (predicted "
                                    f"{predicted:.6f}, got {actual:.6f} at a random point)")
    return w.float(), c, h


def latent_reward_form(reward, decode, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, float, float]:
    """(w, c, h) for a linear reward (h = 0) or an isotropic quadratic one; the arguments of `exact_target`."""
    if getattr(reward, "linear", False):
        return (*latent_linear_form(reward, decode, latent_shape), 0.0)
    return latent_quadratic_form(reward, decode, latent_shape)


def exact_target(mixture: GaussianMixture, w: torch.Tensor, c: float, lam: float, curvature: float = 0.0) -> dict:
    """Component probabilities, spread, and the reward's mean and standard deviation under p and under
    p*exp(lam*r), for r = c + <w, z> + (curvature/2) |z|^2 (curvature 0: a linear reward)."""
    tilted = mixture.tilted(w, lam, curvature)
    names = PICTURE_NAMES[:mixture.num_components]

    def component_reward(m):
        m = m.double()
        return float((m * w.double()).sum()) + c + 0.5 * curvature * float((m * m).sum())

    base_mean, base_var = mixture.quadratic_moments(w, c, curvature)
    tilted_mean, tilted_var = tilted.quadratic_moments(w, c, curvature)
    return {
        "lambda": lam,
        "components": names,
        "base_probabilities": [round(float(p), 6) for p in mixture.weights],
        "tilted_probabilities": [round(float(p), 6) for p in tilted.weights],
        "component_rewards": [round(component_reward(m), 6) for m in mixture.means],
        "base_spread": mixture.spread,
        "tilted_spread": tilted.spread,
        "expected_reward_base": base_mean,
        "expected_reward_tilted": tilted_mean,
        # the exact standard deviation of one sample's reward: n samples' mean has standard error std / sqrt(n)
        # (steadier than a sample standard deviation at small n, since the rewards cluster by component)
        "reward_std_base": base_var ** 0.5,
        "reward_std_tilted": tilted_var ** 0.5,
    }
