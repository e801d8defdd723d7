"""The stochastic step shared by the steering samplers: a reverse SDE with the same marginals as the PF-ODE.

Write the state as x = alpha(sigma) x0 + sigma eps, with alpha = 1 (eps / v models) or 1 - sigma (flow: SD3,
Flux).  y = x / alpha is then a variance-exploding state with noise level lam = sigma / alpha.  In y, Sampling
Demons' SDE is  dy = (1 + beta lam) eps_hat dlam + sqrt(2 beta) lam dW  (eps_hat = (y - D) / lam, integrated
from lam down), which keeps the PF-ODE's marginals for any beta.  Holding D fixed over a step, its linear part
integrates exactly:
    y' = D + (lam'/lam) e^{-beta (lam - lam')} (y - D) + lam' sqrt(1 - e^{-2 beta (lam - lam')}) z,
and mapping back to x:
    x' = alpha' D + (sigma'/sigma) e^{-beta dlam} (x - alpha D) + sigma' sqrt(1 - e^{-2 beta dlam}) z.
More generally, with f = sqrt(1 - e^{-2 beta dlam}) the fraction of fresh noise, any f in [0, 1] keeps the
marginals (`stochastic_step`); f = eta sqrt(1 - (lam'/lam)^2) is the ancestral / DDPM-like family used by SMC.
This agrees with Demon's Euler-Maruyama step to first order, is stable for any step size (zero-terminal-SNR
schedules have sigma_max in the thousands), equals ComfyUI's Euler step at beta = 0, and lands on D at
sigma' = 0.  Flow models get the correct SDE for x = (1 - sigma) x0 + sigma eps through alpha; reusing the
variance-exploding formula on them would change the sampled law.

Some flow models are trained on noise of std s != 1 (model_sampling.noise_scale, e.g. HiDream-O1: 8): ComfyUI
starts them from x = (1 - sigma) x0 + sigma s eps and scales the fresh noise of its stochastic samplers by s.
The deterministic part of the step is unchanged; the fresh noise gets std sigma' f s (`noise_scale_of`).
"""
from __future__ import annotations

import torch
from tqdm.auto import trange

import comfy.model_sampling

from .scoring import SteeringInputError


def _model_sampling(model):
    return model.inner_model.model_patcher.get_model_object("model_sampling")


PROBE_SIGMAS = (0.25, 0.5)


def _state_law(model_sampling):
    """[(sigma, a, b)]: ComfyUI's noise_scaling written as x = a x0 + b eps at a few sigmas, probed on single numbers
    (so it holds for any model type, including ones newer than this pack); None if the probe does not fit."""
    law = []
    try:
        for sigma in PROBE_SIGMAS:
            s = torch.tensor([sigma])
            a = model_sampling.noise_scaling(s, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
            b = model_sampling.noise_scaling(s, torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
            law.append((sigma, float(torch.as_tensor(a).flatten()[0]), float(torch.as_tensor(b).flatten()[0])))
    except Exception:
        return None
    return law


def require_supported_sampling(model) -> None:
    """Refuse, before any step, models whose noisy state is not one the steering SDE is written for:
    x = x0 + sigma s eps (eps, v, EDM, Cosmos ... models) or, for CONST (flow) models, x = (1 - sigma) x0 + sigma s eps
    (s = the noise scale).  That refuses image-to-image sampling that adds no noise (core IMG_TO_IMG_FLOW,
    IMG_TO_IMG_VELOCITY) and any other law, naming the model type and the law found."""
    model_sampling = _model_sampling(model)
    law = _state_law(model_sampling)
    if law is None:  # an exotic model_sampling the probe does not fit: assume the usual, noisy sampling
        return
    flow, scale = isinstance(model_sampling, comfy.model_sampling.CONST), noise_scale_of(model)
    std = law[0][2] / law[0][0]   # the noise's std s: b = sigma s at every sigma
    wrong = [(sigma, a, b) for sigma, a, b in law
             if abs(a - (1.0 - sigma if flow else 1.0)) > 1e-5 or abs(b - sigma * std) > 1e-5 * max(1.0, abs(std))]
    if std > 0 and not wrong:
        return
    sampling = next((k.__name__ for k in type(model_sampling).__mro__ if "noise_scaling" in vars(k)),
                    type(model_sampling).__name__)
    model_type = getattr(getattr(model.inner_model.inner_model, "model_type", None), "name", "unknown")
    if all(b == 0 for _, _, b in law):
        what = ("its noise_scale is 0, so its sampling adds no noise" if scale == 0 else
                "is an image-to-image model whose sampling adds no noise")
        raise SteeringInputError(
            f"this model (model type {model_type}, sampling {sampling}) {what}, so there are no noise candidates to "
            "steer: sample it with a plain sampler (KSampler), not Demon or SMC")
    sigma, a, b = (wrong or law)[0]
    raise SteeringInputError(
        f"this model (model type {model_type}, sampling {sampling}) samples states x = {a:.4g} x0 + {b:.4g} eps at "
        f"sigma {sigma:g}, neither x0 + sigma eps (eps / v models) nor (1 - sigma) x0 + sigma eps (flow models), "
        "the two laws the steering SDE is written for: sample it with a plain sampler (KSampler), not Demon or SMC")


def uses_flow(model) -> bool:
    """True for flow (CONST: SD3, Flux) models.  `model` is what ComfyUI passes to a sampler function.  Every
    steering sampler asks this first, so it also refuses models whose sampling the steering SDE does not cover."""
    require_supported_sampling(model)
    return isinstance(_model_sampling(model), comfy.model_sampling.CONST)


def noise_scale_of(model) -> float:
    """The std of the model's noise (model_sampling.noise_scale, v0.21.1+; 1 where the model does not set it), by
    which ComfyUI's stochastic samplers scale their fresh noise."""
    return float(getattr(_model_sampling(model), "noise_scale", 1.0))


def _column(value, x):
    return torch.as_tensor(value, dtype=torch.float64, device=x.device).reshape((-1,) + (1,) * (x.ndim - 1))


def _alphas(sigma, sigma_next, flow: bool):
    return (1.0 - sigma, 1.0 - sigma_next) if flow else (torch.ones_like(sigma), torch.ones_like(sigma_next))


def fresh_fraction_beta(sigma, sigma_next, beta: float, flow: bool, like):
    """Share of the next noise that is new under Demon's SDE with noise level beta: sqrt(1 - e^{-2 beta dlam})."""
    sigma, sigma_next = _column(sigma, like), _column(sigma_next, like)
    if beta <= 0:
        return torch.zeros_like(sigma)
    alpha, alpha_next = _alphas(sigma, sigma_next, flow)
    d_lam = sigma / alpha - sigma_next / alpha_next   # inf at flow's sigma = 1: full refresh, as it should be
    return torch.sqrt(-torch.expm1(-2.0 * beta * d_lam))


def fresh_fraction_eta(sigma, sigma_next, eta: float, flow: bool, like):
    """Ancestral (DDPM-like) steps in the noise-level coordinate lam = sigma / alpha: eta = 1 is the ancestral
    sampler, eta = 0 the deterministic DDIM/Euler step; for flow models this is the correct stochastic step."""
    sigma, sigma_next = _column(sigma, like), _column(sigma_next, like)
    alpha, alpha_next = _alphas(sigma, sigma_next, flow)
    ratio = torch.where(alpha > 0, (sigma_next / alpha_next) / (sigma / alpha).clamp_min(1e-30), torch.zeros_like(sigma))
    return eta * torch.sqrt((1.0 - ratio.clamp(0, 1) ** 2).clamp_min(0.0))


def step_mean_std(x, denoised, sigma, sigma_next, fresh, flow: bool, noise_scale: float = 1.0):
    """Mean and std of the stochastic step: x' = mean + std * z (float64).  noise_scale: `noise_scale_of(model)`."""
    sigma, sigma_next = _column(sigma, x), _column(sigma_next, x)
    alpha, alpha_next = _alphas(sigma, sigma_next, flow)
    keep = (sigma_next / sigma) * torch.sqrt((1.0 - fresh ** 2).clamp_min(0.0))
    mean = alpha_next * denoised.double() + keep * (x.double() - alpha * denoised.double())
    return mean, sigma_next * fresh * noise_scale


def stochastic_step(x, denoised, sigma, sigma_next, noise, fresh, flow: bool, noise_scale: float = 1.0):
    """x' = alpha' D + (sigma'/sigma) sqrt(1 - f^2) (x - alpha D) + sigma' f s z: keeps the PF-ODE marginals for any
    fresh-noise fraction f in [0, 1] (f = 0: Euler; sigma' = 0: lands on D); s = the model's noise scale."""
    mean, std = step_mean_std(x, denoised, sigma, sigma_next, fresh, flow, noise_scale)
    return (mean + std * noise.double()).to(x.dtype)


def sde_step(x, denoised, sigma, sigma_next, noise, beta: float, flow: bool, noise_scale: float = 1.0):
    """One step of Demon's reverse SDE from sigma to sigma_next (floats or per-item tensors)."""
    return stochastic_step(x, denoised, sigma, sigma_next, noise,
                           fresh_fraction_beta(sigma, sigma_next, beta, flow, x), flow, noise_scale)


def noise_generator(extra_args: dict, offset: int = 0) -> torch.Generator:
    """A dedicated CPU generator seeded from the prompt's seed: same workflow + seed => same noises.  Seed + 1, as
    core's CPU noise sampler: the starting noise (comfy.sample.prepare_noise) is drawn on the CPU from the seed
    itself, and the steps' fresh noise must not repeat it."""
    return torch.Generator(device="cpu").manual_seed(int(extra_args.get("seed", 0)) + 1 + offset)


@torch.no_grad()
def sample_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, beta: float = 0.1):
    """Plain SDE sampling with the shared step (Demon's stochastic step without candidates), for comparisons."""
    extra_args = {} if extra_args is None else extra_args
    flow, scale = uses_flow(model), noise_scale_of(model)
    generator = noise_generator(extra_args)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
        x = sde_step(x, denoised, sigmas[i], sigmas[i + 1], noise, beta, flow, scale)
    return x
