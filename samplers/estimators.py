"""Clean-image estimates of candidate states, for scoring them.

tweedie  D(x, sigma): one model call; exact in expectation, blurry at high sigma.
ode      the PF-ODE rollout from sigma to 0 (Heun on a Karras grid down to the model's sigma_min, then the final
         jump): the paper's "baseline" estimator.  Its step count shrinks with sigma as in the official code:
         ceil(max_steps * position of sigma on the rho=7 grid of the run's own schedule) + 1 intervals.  The
         position is measured between the schedule's lowest and highest non-zero sigma, not the model's range, so
         a schedule gets the same rollouts on SD (sigma_max 14.6) as on a zero-terminal-SNR model (sigma_max in
         the thousands), and img2img (denoise < 1) rolls out as long from its first step as txt2img does.
"""
from __future__ import annotations

import math

from .model_calls import ComputeCounter, denoise

ESTIMATORS = ("tweedie", "ode")
RHO = 7.0


def schedule_span(sigmas) -> tuple[float, float]:
    """(lowest, highest) non-zero sigma of the run's schedule: the range rollout lengths are measured on."""
    nonzero = [float(s) for s in sigmas if float(s) > 0]
    if not nonzero:
        raise ValueError("the schedule has no non-zero sigma")
    return min(nonzero), max(nonzero)


def rollout_steps(sigma: float, span: tuple[float, float], max_steps: int) -> int:
    """Rollout intervals for a candidate at `sigma`: ceil(max_steps * its position on the rho=7 grid of the schedule
    span (lowest, highest non-zero sigma)) + 1."""
    low, high = span
    a, b, c = low ** (1 / RHO), high ** (1 / RHO), max(sigma, low) ** (1 / RHO)
    ratio = 1.0 if b <= a else min(1.0, max(0.0, (c - a) / (b - a)))
    return max(1, math.ceil(max_steps * ratio) + 1)


def karras_to_zero(sigma: float, sigma_min: float, steps: int) -> list[float]:
    """`steps` intervals from sigma down to sigma_min on a rho=7 grid, then to 0."""
    if steps <= 1 or sigma <= sigma_min:
        return [sigma, 0.0]
    a, b = sigma_min ** (1 / RHO), sigma ** (1 / RHO)
    grid = [(b + i / (steps - 1) * (a - b)) ** RHO for i in range(steps)]
    return grid + [0.0]


def rollout_grid(sigma: float, sigma_min: float, span: tuple[float, float], max_steps: int) -> list[float]:
    """The sigmas of a candidate's ODE rollout: from sigma to the model's sigma_min, then 0."""
    return karras_to_zero(sigma, sigma_min, rollout_steps(sigma, span, max_steps))


def rollout_cost(sigma: float, sigma_min: float, span: tuple[float, float], max_steps: int) -> int:
    """Model calls per candidate of the ODE rollout (Heun: 2 per interval, 1 for the final jump)."""
    return 2 * (len(rollout_grid(sigma, sigma_min, span, max_steps)) - 2) + 1


def estimate_x0(model, x, sigma: float, extra_args, batch, chunk_items, counter: ComputeCounter, *,
                estimator: str, flow: bool, sigma_min: float, span: tuple[float, float], max_steps: int = 20,
                denoised=None):
    """Clean-image estimates of the candidates x at sigma.  span: the schedule's (lowest, highest) non-zero sigma."""
    if estimator == "tweedie":
        return denoised if denoised is not None else denoise(model, x, sigma, extra_args, batch, chunk_items, counter)
    if estimator != "ode":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    grid = rollout_grid(sigma, sigma_min, span, max_steps)
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
