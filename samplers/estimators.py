"""Clean-image estimates of candidate states, for scoring them.

tweedie  D(x, sigma): one model call; exact in expectation, blurry at high sigma.
ode      the PF-ODE rollout from sigma to 0 (Heun on a Karras grid, then the final jump): the paper's
         "baseline" estimator.  Its step count shrinks with sigma as in the official code: ceil(max_steps *
         position of sigma on the rho=7 grid) + 1 intervals.
"""
from __future__ import annotations

import math


from .model_calls import ComputeCounter, denoise

ESTIMATORS = ("tweedie", "ode")
RHO = 7.0


def rollout_steps(sigma: float, sigma_min: float, sigma_max: float, max_steps: int) -> int:
    a, b, c = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO), max(sigma, sigma_min) ** (1 / RHO)
    ratio = min(1.0, max(0.0, (c - a) / (b - a)))
    return max(1, math.ceil(max_steps * ratio) + 1)


def karras_to_zero(sigma: float, sigma_min: float, steps: int) -> list[float]:
    """`steps` intervals from sigma down to sigma_min on a rho=7 grid, then to 0."""
    if steps <= 1 or sigma <= sigma_min:
        return [sigma, 0.0]
    a, b = sigma_min ** (1 / RHO), sigma ** (1 / RHO)
    grid = [(b + i / (steps - 1) * (a - b)) ** RHO for i in range(steps)]
    return grid + [0.0]


def rollout_cost(sigma: float, sigma_min: float, sigma_max: float, max_steps: int) -> int:
    """Model calls per candidate of the ODE rollout (Heun: 2 per interval, 1 for the final jump)."""
    n = len(karras_to_zero(sigma, sigma_min, rollout_steps(sigma, sigma_min, sigma_max, max_steps))) - 1
    return 2 * (n - 1) + 1


def estimate_x0(model, x, sigma: float, extra_args, batch, chunk_items, counter: ComputeCounter, *,
                estimator: str, flow: bool, sigma_min: float, sigma_max: float, max_steps: int = 20,
                denoised=None):
    if estimator == "tweedie":
        return denoised if denoised is not None else denoise(model, x, sigma, extra_args, batch, chunk_items, counter)
    if estimator != "ode":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    grid = karras_to_zero(sigma, sigma_min, rollout_steps(sigma, sigma_min, sigma_max, max_steps))
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        d = denoised if i == 0 and denoised is not None else denoise(model, x, s, extra_args, batch, chunk_items,
                                                                     counter)
        if s_next == 0:
            return d
        # Heun on the PF-ODE; the velocity (x - D) / sigma holds for every parametrisation
        velocity = (x - d) / s
        x_euler = x + velocity * (s_next - s)
        d_next = denoise(model, x_euler, s_next, extra_args, batch, chunk_items, counter)
        x = x + 0.5 * (velocity + (x_euler - d_next) / s_next) * (s_next - s)
    raise AssertionError("the rollout grid always ends at sigma = 0")
