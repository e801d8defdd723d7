"""Sampling Demons (Yeh, Lee, Chen, ICLR 2025): at each steered step try K noises, score each candidate's
clean-image estimate with a reward, and step with the reward-weighted noise, rescaled to the sqrt(N) sphere.

Steps outside the steering window are deterministic PF-ODE (Euler) steps, and with K = 1 or beta = 0 (steering
off) every step is: then this is ComfyUI's own Euler sampler.  Batch items are steered independently; the K*B
candidates go through the model in memory-sized chunks that keep every item aligned with its conditioning.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import trange

from .estimators import ESTIMATORS, estimate_x0, rollout_cost, schedule_span
from .model_calls import ComputeCounter, denoise, items_per_call
from .scoring import SteeringInputError, check_scorer, finite_or_flat, require_choice
from . import live
from .sde import noise_generator, noise_scale_of, sde_step, uses_flow

WEIGHTINGS = ("tanh", "boltzmann")


def demon_weights(rewards: torch.Tensor, weighting: str, tau: float | None) -> torch.Tensor:
    """Weights [K, B] of the K candidates of each item from rewards [K, B].  tau None = adaptive (the per-step
    std of the item's K rewards).  Flat rewards (std < 1e-8) give equal weights."""
    centred = rewards - rewards.mean(dim=0, keepdim=True)
    std = rewards.std(dim=0, unbiased=False, keepdim=True) if rewards.shape[0] > 1 else torch.zeros_like(centred[:1])
    temperature = std if tau is None else torch.full_like(std, float(tau))
    flat = (std < 1e-8).expand_as(rewards)
    safe_t = temperature.clamp_min(1e-12)
    if weighting == "tanh":
        w = torch.tanh(centred / safe_t)
    elif weighting == "boltzmann":
        w = torch.softmax(centred / safe_t, dim=0)
    else:
        raise SteeringInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return torch.where(flat, torch.ones_like(w), w)


def combine_noises(noises: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sqrt(N) * sum_k w_k z_k / ||sum_k w_k z_k|| per item: noises [K, B, ...], weights [K, B] -> [B, ...]."""
    mixed = (weights.view(*weights.shape, *([1] * (noises.ndim - 2))) * noises).sum(0)
    flat = mixed.reshape(mixed.shape[0], -1)
    norm = flat.norm(dim=1, keepdim=True)
    # all-zero combinations (e.g. tanh weights of a perfectly symmetric pair) fall back to the plain mean
    fallback = noises.mean(0).reshape(mixed.shape[0], -1)
    flat = torch.where(norm > 1e-12, flat, fallback)
    n = flat.shape[1]
    return (flat * math.sqrt(n) / flat.norm(dim=1, keepdim=True)).reshape(mixed.shape)


def steering_steps(sigmas: torch.Tensor, min_sigma: float = 0.0, start: float = 0.0, end: float = 1.0) -> list[bool]:
    """Which of the len(sigmas)-1 steps steer: sigma >= min_sigma and step index within [start, end) of the steps.
    Raises a clear error when the window selects none."""
    steps = len(sigmas) - 1
    if not 0.0 <= start < end <= 1.0:
        raise SteeringInputError(f"steering window start ({start}) must be < end ({end}), both within 0..1")
    if not any(float(s) > 0 for s in sigmas[1:]):
        what = "the only step lands" if steps == 1 else f"all {steps} steps land"
        raise SteeringInputError(f"{what} on sigma = 0, which cannot be steered (a step to sigma = 0 adds no noise, so "
                                 "there are no candidates to choose from): use at least 2 steps")
    chosen = [float(sigmas[i]) >= min_sigma and start * steps <= i < math.ceil(end * steps) and float(sigmas[i + 1]) > 0
              for i in range(steps)]
    if not any(chosen):
        raise SteeringInputError(
            f"the steering window (sigma >= {min_sigma:g}, steps {start:.2f}..{end:.2f} of {steps}) selects no step "
            f"of these sigmas ({float(sigmas[0]):.4g} .. {float(sigmas[-2]):.4g}); lower min_sigma or widen the window")
    return chosen


def plan_budget(sigmas, steer: list[bool], k: int, estimator: str, max_rollout_steps: int, budget: float,
                sigma_min: float) -> tuple[int, list[bool], float]:
    """Fit K and the window into `budget` model calls per image (0 = no limit): lower K first, then drop the
    lowest-sigma steered steps.  Returns (K, steer, planned calls per image).  Every step costs one call, so a
    budget below the number of steps is refused."""
    steps = len(sigmas) - 1
    if not math.isfinite(budget):
        raise SteeringInputError(f"budget must be a finite number of model calls per image (0 = no limit), got {budget}")
    if 0 < budget < steps:
        raise SteeringInputError(
            f"budget ({budget:g} model calls per image) is below the minimum for {steps} steps: every step needs one "
            f"model call, so set budget to at least {steps} (or 0 for no limit), or use fewer steps")
    span = schedule_span(sigmas)

    def cost(kk, mask):
        per_candidate = [1 if estimator == "tweedie" else rollout_cost(float(sigmas[i + 1]), sigma_min, span,
                                                                       max_rollout_steps)
                         for i in range(steps) if mask[i]]
        return steps + kk * sum(per_candidate)

    if budget <= 0 or cost(k, steer) <= budget:
        return k, steer, cost(k, steer)
    for kk in range(k - 1, 1, -1):
        if cost(kk, steer) <= budget:
            return kk, steer, cost(kk, steer)
    mask = list(steer)
    while any(mask) and cost(2, mask) > budget:
        mask[max(i for i, m in enumerate(mask) if m)] = False
    if not any(mask):
        return 1, mask, steps
    return 2, mask, cost(2, mask)


@torch.no_grad()
def sample_demon(model, x, sigmas, extra_args=None, callback=None, disable=None, *, score_fn, k: int = 16,
                 beta: float = 0.1, weighting: str = "tanh", tau: float | None = None, estimator: str = "tweedie",
                 max_rollout_steps: int = 20, min_sigma: float = 0.0, start: float = 0.0, end: float = 1.0,
                 chunk_items: int = 0, budget: float = 0.0, budget_seconds: float = 0.0, clock=None, report=None):
    """A ComfyUI sampler function.  score_fn(model, x0, batch, counter, step) -> rewards [n] (samplers/scoring.py).
    report(dict) receives each step's statistics and, at the end, the totals.  budget_seconds: seconds per image
    (0 = no limit); once the batch's time (budget_seconds * batch) is spent, the remaining steps are plain Euler
    steps (one model call each), so the image is still finished.  clock: a time function (tests)."""
    if k < 1:
        raise SteeringInputError(f"K (candidates per step) must be at least 1, got {k}")
    if not math.isfinite(budget_seconds) or budget_seconds < 0:
        raise SteeringInputError(f"budget_seconds must be a finite number >= 0 (0 = no limit), got {budget_seconds}")
    clock = clock or time.monotonic
    deadline = clock() + budget_seconds * x.shape[0] if budget_seconds > 0 else math.inf
    out_of_time_at = None
    require_choice("estimator", estimator, ESTIMATORS)
    require_choice("weighting", weighting, WEIGHTINGS)
    check_scorer(score_fn, model, x)   # a VAE or reward that cannot score these latents: refused before sampling
    extra_args = {} if extra_args is None else extra_args
    batch = x.shape[0]
    flow = uses_flow(model)
    noise_scale = noise_scale_of(model)
    sigma_min = float(model.inner_model.model_patcher.get_model_object("model_sampling").sigma_min)
    if k > 1 and beta > 0:
        steer = steering_steps(sigmas, min_sigma, start, end)
    else:   # steering off (one candidate, or no noise to choose): every step is a plain Euler step
        steer = [False] * (len(sigmas) - 1)
    k, steer, planned = plan_budget(sigmas, steer, k, estimator, max_rollout_steps, budget, sigma_min)
    if report is not None:
        report({"plan": True, "model_calls_per_image": planned, "steps": len(sigmas) - 1})
    span = schedule_span(sigmas)
    counter = ComputeCounter(batch=batch)
    chunk = items_per_call(model, x.shape[1:], batch, chunk_items)
    generator = noise_generator(extra_args)
    s_in = x.new_ones([batch])
    trace = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(model, x, sigmas[i] * s_in, extra_args, batch, chunk, counter)
        if steer[i] and out_of_time_at is None and clock() >= deadline:
            out_of_time_at = i   # the seconds budget is spent: finish with unsteered steps
        if steer[i] and out_of_time_at is None:
            noises = torch.randn((k, *x.shape), generator=generator, dtype=torch.float32).to(x)
            candidates = sde_step(x.repeat(k, *([1] * (x.ndim - 1))), denoised.repeat(k, *([1] * (x.ndim - 1))),
                                  sigma, sigma_next, noises.reshape(k * batch, *x.shape[1:]), beta, flow,
                                  noise_scale=noise_scale)
            x0 = estimate_x0(model, candidates, sigma_next, extra_args, batch, chunk, counter, estimator=estimator,
                             flow=flow, sigma_min=sigma_min, span=span, max_steps=max_rollout_steps)
            rewards = score_fn(model, x0, batch, counter, step=(i, len(sigmas) - 1)).reshape(k, batch)
            clean, ok = finite_or_flat(rewards, "the reward")
            weights = demon_weights(clean, weighting, tau)
            weights = torch.where(ok[None, :], weights, torch.ones_like(weights)).to(x)
            noise = combine_noises(noises, weights)
            live.publish(model, x0, clean, weights, weights > 0, kind="demon", step=i, steps=len(sigmas) - 1,
                         mark_name="kept")
            stats = {"step": i, "sigma": sigma, "steered": True, "k": k,
                     "reward_mean": clean.mean(0).tolist(), "reward_std": clean.std(0, unbiased=False).tolist(),
                     "reward_min": clean.min(0).values.tolist(), "reward_max": clean.max(0).values.tolist()}
        else:
            # not used (the step is deterministic); still drawn, so a seed gives the same noises as before this change
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
            stats = {"step": i, "sigma": sigma, "steered": False}
        x = sde_step(x, denoised, sigma, sigma_next, noise, beta if stats["steered"] else 0.0, flow,
                     noise_scale=noise_scale)
        trace.append(stats)
        if report is not None:
            report(stats)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    if report is not None:
        report({"done": True, "trace": trace, "k": k, "steered_steps": sum(t["steered"] for t in trace),
                "planned_calls_per_image": planned, "out_of_time_at_step": out_of_time_at,
                **counter.per_image()})
    return x
