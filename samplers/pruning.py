"""Best-of-N with early pruning (training-free form of the TTSnap line): run any core sampler on N candidates per
batch item, and at chosen steps score every candidate's clean-image estimate D(x, sigma) (one model call), keep
the best ceil(keep_fraction * n) of each item and continue only those.  The calls the dropped candidates would
have used are saved; spend them on more starting seeds (a larger N) at the same total.

The inner sampler runs in segments between the pruning steps, each from the state the previous one left.
Segment s > 0 gets the seed + s * 1000003 for its own noise (ancestral samplers reseed on every call; reusing the
seed would repeat the first segment's noises).  Multistep samplers (dpmpp_2m, ...) restart their history at each
pruning step.  Candidates stay candidate-major (slot j of item b at j*B + b), so conditioning, inpainting masks
and img2img keep lining up after every pruning.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .model_calls import ComputeCounter, denoise, items_per_call
from .scoring import SteeringInputError, finite_or_flat

SEGMENT_SEED_STRIDE = 1000003


def parse_prune_at(text: str, steps: int) -> list[int]:
    """'0.3, 0.6' (fractions of the steps) -> sorted distinct step indices in 1..steps-1 where pruning happens."""
    points = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            fraction = float(part)
        except ValueError:
            raise SteeringInputError(f"prune_at must be fractions of the steps separated by commas (e.g. 0.3, 0.6); "
                                     f"{part!r} is not a number") from None
        if not math.isfinite(fraction) or not 0.0 < fraction < 1.0:
            raise SteeringInputError(f"prune_at fractions must lie strictly between 0 and 1, got {part}")
        points.append(min(steps - 1, max(1, round(fraction * steps))))
    return sorted(set(points))


def kept_per_item(n: int, keep_fraction: float) -> int:
    return max(1, math.ceil(keep_fraction * n - 1e-9))


class CountingModel:
    """The denoiser the inner sampler sees, counting model items; everything else is the real one's."""

    def __init__(self, model, counter: ComputeCounter):
        self.__dict__["_model"], self.__dict__["_counter"] = model, counter

    def __call__(self, x, sigma, **kwargs):
        self._counter.model_items += x.shape[0]
        self._counter.model_batches += 1
        return self._model(x, sigma, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)


@contextmanager
def subset_inpaint_state(model, extra_args: dict, index: torch.Tensor, total: int):
    """ComfyUI's inpainting wrapper holds its latent, noise and mask for all `total` candidates; give it the rows of
    the kept ones."""
    saved = {name: getattr(model, name, None) for name in ("latent_image", "noise")}
    args = dict(extra_args)
    try:
        for name, value in saved.items():
            if torch.is_tensor(value) and value.shape[0] == total:
                setattr(model, name, value[index.to(value.device)])
        mask = args.get("denoise_mask")
        if torch.is_tensor(mask) and mask.shape[0] == total:
            args["denoise_mask"] = mask[index.to(mask.device)]
        yield args
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(model, name, value)


@torch.no_grad()
def sample_pruned(model, x, sigmas, extra_args=None, callback=None, disable=None, *, inner_function,
                  inner_options: dict, score_fn, batch: int, prune_at: list[int], keep_fraction: float,
                  chunk_items: int = 0, report=None):
    """A ComfyUI sampler function for n*batch candidate-major candidates; returns the survivors (k*batch)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise SteeringInputError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    counter = ComputeCounter(batch=batch)
    counting = CountingModel(model, counter)
    chunk = items_per_call(model, x.shape[1:], batch, chunk_items)
    total = x.shape[0]
    alive = torch.arange(total)                       # original candidate slot of each current row
    bounds = [0] + [p for p in prune_at if 0 < p < steps] + [steps]
    seed = int(extra_args.get("seed", 0))
    pruning = []
    for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        args = {**extra_args, "seed": seed + segment * SEGMENT_SEED_STRIDE} if "seed" in extra_args else extra_args
        seg_callback = None if callback is None else (lambda d, a=start: callback({**d, "i": d["i"] + a}))
        with subset_inpaint_state(model, args, alive, total) as seg_args:
            x = inner_function(counting, x, sigmas[start:stop + 1], extra_args=seg_args, callback=seg_callback,
                               disable=disable, **inner_options)
            if stop == steps:
                break
            n = x.shape[0] // batch
            keep = kept_per_item(n, keep_fraction)
            if keep >= n:
                continue
            x0 = denoise(model, x, float(sigmas[stop]), seg_args, batch, chunk, counter)
        scores = score_fn(model, x0, batch, counter, step=(stop, steps)).double().reshape(n, batch)
        clean, ok = finite_or_flat(scores, "the reward")
        order = torch.argsort(-clean, dim=0, stable=True)[:keep]                  # [keep, B], best first
        order = torch.where(ok[None, :], order, torch.arange(keep)[:, None].expand(keep, batch))
        rows = (order * batch + torch.arange(batch)[None, :]).reshape(-1)        # candidate-major again
        x, alive = x[rows.to(x.device)], alive[rows]
        pruning.append({"step": stop, "candidates": n, "kept": keep, "scores": clean.T.tolist(),
                        "kept_slots": (alive.reshape(keep, batch).T).tolist()})
    if report is not None:
        report({"pruning": pruning, "survivors": x.shape[0] // batch, "survivor_slots": alive.tolist(),
                **counter.per_image()})
    return x
