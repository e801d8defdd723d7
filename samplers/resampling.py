"""Particle weights and resampling for SMC, in log space, per batch item (weights are [B, N])."""
from __future__ import annotations

import logging

import torch

RESAMPLERS = ("multinomial", "systematic", "stratified")


def normalise_log_weights(log_w: torch.Tensor, what: str = "particle weights") -> torch.Tensor:
    """log of normalised weights per row.  NaN counts as zero weight; a row with no positive weight falls back to
    uniform with a warning instead of losing the run."""
    log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, -float("inf")), log_w)
    dead = torch.isinf(log_w.max(dim=1, keepdim=True).values) & (log_w.max(dim=1, keepdim=True).values < 0)
    if bool(dead.any()):
        logging.warning("[reward-steering] all %s of batch item(s) %s are zero or NaN; using uniform weights",
                        what, torch.nonzero(dead.flatten()).flatten().tolist())
        log_w = torch.where(dead, torch.zeros_like(log_w), log_w)
    # +inf (an overflowing potential) dominates: keep it as the only particle of its row
    pos_inf = torch.isinf(log_w) & (log_w > 0)
    if bool(pos_inf.any()):
        log_w = torch.where(pos_inf.any(dim=1, keepdim=True), torch.where(pos_inf, 0.0, -float("inf")), log_w)
    return log_w - torch.logsumexp(log_w, dim=1, keepdim=True)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """1 / sum w^2 of the normalised weights, per row."""
    log_w = normalise_log_weights(log_w)
    return torch.exp(-torch.logsumexp(2.0 * log_w, dim=1))


def resample_indices(log_w: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    """Ancestor indices [B, N] drawn from the normalised weights of each row."""
    w = torch.exp(normalise_log_weights(log_w)).double().cpu()
    b, n = w.shape
    if method == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=generator)
    if method == "systematic":
        u = (torch.rand(b, 1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    elif method == "stratified":
        u = (torch.rand(b, n, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    else:
        raise ValueError(f"resampling must be one of {RESAMPLERS}, got {method!r}")
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0
    return torch.searchsorted(cdf, u.contiguous()).clamp(max=n - 1)
