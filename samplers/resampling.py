"""Particle weights and resampling for SMC, in log space, per batch item (weights are [B, N]).

Each batch item draws its resampling choices from its own generator (`item_generators`), so an item's result
depends only on its seed and its own inputs, never on what the other items of the batch do.
"""
from __future__ import annotations

import hashlib
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


def item_seed(seed: int, item: int, stream: str) -> int:
    """The seed of batch item `item`'s generator for `stream`: the first 8 bytes (little-endian, top bit cleared)
    of sha256("reward-steering/<stream>/<seed>/<item>").  Distinct items, streams and seeds get unrelated seeds."""
    digest = hashlib.sha256(f"reward-steering/{stream}/{int(seed)}/{item}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def item_generators(seed: int, batch: int, stream: str = "resampling") -> list[torch.Generator]:
    """One CPU generator per batch item (see item_seed)."""
    return [torch.Generator(device="cpu").manual_seed(item_seed(seed, b, stream)) for b in range(batch)]


def _resample_row(w: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    n = w.shape[0]
    if method == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=generator)
    if method == "systematic":
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    elif method == "stratified":
        u = (torch.rand(n, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    else:
        raise ValueError(f"resampling must be one of {RESAMPLERS}, got {method!r}")
    cdf = torch.cumsum(w, dim=0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u).clamp(max=n - 1)


def resample_indices(log_w: torch.Tensor, method: str, generators: list[torch.Generator],
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestor indices [B, N] drawn from the normalised weights of each row with that row's generator.  Rows where
    `rows` [B] is False keep their particles (identity indices) and leave their generator untouched."""
    w = torch.exp(normalise_log_weights(log_w)).double().cpu()
    b, n = w.shape
    if len(generators) != b:
        raise ValueError(f"{len(generators)} generators for {b} rows of weights")
    idx = torch.arange(n)[None, :].repeat(b, 1)
    for row in range(b):
        if rows is None or bool(rows[row]):
            idx[row] = _resample_row(w[row], method, generators[row])
    return idx


def weighted_draw(log_w: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One particle index per row [B], drawn from the row's normalised weights with that row's generator."""
    w = torch.exp(normalise_log_weights(log_w, "final particle weights")).double().cpu()
    return torch.stack([torch.multinomial(w[row], 1, generator=g)[0] for row, g in enumerate(generators)])
