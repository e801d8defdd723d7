"""Best-of-N with early pruning (training-free form of the TTSnap line): run any core sampler on N candidates per
batch item, and at chosen steps score every candidate's clean-image estimate D(x, sigma) (one model call), keep
the best ceil(keep_fraction * n) of each item and continue only those.  The calls the dropped candidates would
have used are saved; `plan_seeds` spends them on more starting seeds: the largest N whose pruned run (segments
plus the pruning steps' scoring calls) stays within a model-call budget per image, by default plain best-of-N's.
The plan is made before sampling from the calls one candidate makes in each segment, counted by a dry run of the
inner sampler on a denoiser that returns zeros (`calls_per_candidate`: exact for samplers whose number of calls does
not depend on the model's output, i.e. all but the adaptive ones).

A seconds budget makes the search anytime: once the clock passes it, the run stops within one model call and
returns the latest clean-image estimates D(x, sigma) of the candidates still alive (the caller scores them and keeps
the best per item); no model call is spent on the way out.

The inner sampler runs in segments between the pruning steps, each from the state the previous one left.
Segment s > 0 gets the seed + s * 1000003 for its own noise (ancestral samplers reseed on every call; reusing the
seed would repeat the first segment's noises).  Multistep samplers (dpmpp_2m, ...) restart their history at each
pruning step.  Candidates stay candidate-major (slot j of item b at j*B + b), so conditioning, inpainting masks
and img2img keep lining up after every pruning.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .model_calls import ComputeCounter
from .scoring import SteeringInputError, finite_or_flat
from .tree import Clock

SEGMENT_SEED_STRIDE = 1000003
MAX_SEEDS = 1024   # starting seeds per item a plan may ask for (the n input's maximum)


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


def segment_bounds(prune_at: list[int], steps: int) -> list[int]:
    """Step indices where the inner sampler's segments start and end: 0, the pruning steps, steps."""
    return [0] + [p for p in prune_at if 0 < p < steps] + [steps]


def run_calls(seeds: int, segment_calls: list[int], keep_fraction: float) -> tuple[int, list[int]]:
    """(model calls per image, candidates alive in each segment) of a pruned run from `seeds` candidates per item;
    segment_calls[s]: the calls one candidate makes in segment s.  A pruning step that drops someone first scores
    every candidate's D(x, sigma): one call each (as sample_pruned does)."""
    alive, total, survivors = seeds, 0, []
    for s, calls in enumerate(segment_calls):
        survivors.append(alive)
        total += alive * calls
        if s < len(segment_calls) - 1:
            keep = kept_per_item(alive, keep_fraction)
            if keep < alive:
                total += alive
                alive = keep
    return total, survivors


@dataclass(frozen=True)
class SeedPlan:
    seeds: int              # starting seeds per item
    survivors: list[int]    # candidates per item alive in each segment
    calls: int              # planned model calls per image
    budget: int             # the budget it had (model calls per image)
    minimum: int            # one seed's run (the smallest budget accepted)
    capped: bool            # MAX_SEEDS bound the plan, not the budget


def plan_seeds(segment_calls: list[int], keep_fraction: float, budget: int, what: str = "max_calls",
               max_seeds: int = MAX_SEEDS) -> SeedPlan:
    """The most starting seeds whose pruned run stays within `budget` model calls per image (the run's cost grows
    with the seeds, so a bisection finds it).  A budget below one seed's run is refused, naming `what` and the
    minimum."""
    minimum = run_calls(1, segment_calls, keep_fraction)[0]
    if not budget >= minimum:
        raise SteeringInputError(f"{what} gives {budget:g} model calls per image, below one full run: a single seed "
                                 f"needs {minimum} model calls per image with these steps and this sampler; set "
                                 f"{what} to at least {minimum}" + (" (or 0 for no limit)" if what == "max_calls"
                                                                    else ""))
    low, high = 1, max(1, min(max_seeds, int(budget) // max(1, segment_calls[0])))
    while low < high:   # invariant: run_calls(low) fits the budget
        mid = (low + high + 1) // 2
        if run_calls(mid, segment_calls, keep_fraction)[0] <= budget:
            low = mid
        else:
            high = mid - 1
    calls, survivors = run_calls(low, segment_calls, keep_fraction)
    return SeedPlan(low, survivors, calls, int(budget), minimum,
                    low == max_seeds and run_calls(low + 1, segment_calls, keep_fraction)[0] <= budget)


class _DryRunModel:
    """The dry run's denoiser: counts items and returns zeros; every other attribute is the model view's.  The
    samplers' post-CFG hooks run as CFG would run them (the *_cfg_pp samplers read the uncond prediction there)."""

    def __init__(self, view):
        self.__dict__["_view"], self.__dict__["items"] = view, 0

    def __call__(self, x, sigma, **kwargs):
        self.__dict__["items"] += x.shape[0]
        zeros = torch.zeros_like(x)
        model_options = kwargs.get("model_options") or {}
        for hook in model_options.get("sampler_post_cfg_function", []):
            zeros = hook({"denoised": zeros, "cond_denoised": zeros, "uncond_denoised": zeros, "input": x,
                          "sigma": sigma, "cond_scale": 1.0, "model": None, "cond": None, "uncond": None,
                          "model_options": model_options})
        return zeros

    def __getattr__(self, name):
        return getattr(self._view, name)


def calls_per_candidate(inner_function, inner_options: dict, model_view, item_shape, sigmas, bounds: list[int],
                        seed: int = 0) -> tuple[list[int], bool]:
    """Model calls one candidate makes in each segment [bounds[s], bounds[s+1]] of the inner sampler, from a dry
    run on one zero latent (model_view: what the sampler may read besides calling it, e.g. .inner_model).
    Returns (calls, measured); a sampler that cannot run on the dry denoiser is assumed to make one call per step
    (measured False, with a warning)."""
    calls = []
    try:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            dry = _DryRunModel(model_view)
            inner_function(dry, torch.zeros(1, *item_shape), sigmas[start:stop + 1],
                           extra_args={"seed": seed, "model_options": {}}, callback=None, disable=True,
                           **inner_options)
            calls.append(max(1, dry.items))
        return calls, True
    except Exception as error:   # noqa: BLE001  (an estimate is still better than no plan)
        logging.warning("[reward-steering] best-of-N: could not count this sampler's model calls (%s: %s); "
                        "assuming one per step", type(error).__name__, error)
        return [stop - start for start, stop in zip(bounds[:-1], bounds[1:])], False


def denoise_alive(model, x, sigma: float, args: dict, counter: ComputeCounter) -> torch.Tensor:
    """The pruning step's D(x, sigma) for all alive candidates in one call, as each step of the inner sampler makes
    it (the inpainting state already holds exactly their rows, so it is not tiled as samplers.model_calls.denoise
    tiles a batch-B state)."""
    counter.model_items += x.shape[0]
    counter.model_batches += 1
    return model(x, x.new_full((x.shape[0],), sigma), **args)


class _OutOfTime(Exception):
    """The seconds budget ran out inside the inner sampler (private: caught by sample_pruned)."""


class CountingModel:
    """The denoiser the inner sampler sees, counting model items; everything else is the real one's.
    before_call: run before each call (the seconds budget stops the run there)."""

    def __init__(self, model, counter: ComputeCounter, before_call=None):
        self.__dict__["_model"], self.__dict__["_counter"] = model, counter
        self.__dict__["_before_call"] = before_call

    def __call__(self, x, sigma, **kwargs):
        if self._before_call is not None:
            self._before_call()
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
                  budget_seconds: float = 0.0, clock=None, report=None):
    """A ComfyUI sampler function for n*batch candidate-major candidates; returns the survivors (k*batch), or,
    stopped by the seconds budget (budget_seconds per image, 0 = none), their latest clean-image estimates.
    clock: a zero-argument time function (tests); default time.monotonic."""
    if not 0.0 < keep_fraction <= 1.0:
        raise SteeringInputError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    if not math.isfinite(budget_seconds) or budget_seconds < 0:
        raise SteeringInputError(f"budget_seconds must be a finite number >= 0 (0 = no limit), got {budget_seconds}")
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    deadline = Clock(budget_seconds * batch, clock or time.monotonic)
    latest = {"denoised": None, "step": None}   # the newest clean estimates of the alive candidates

    def stop_if_out_of_time():
        if latest["denoised"] is not None and deadline.expired():
            raise _OutOfTime

    counter = ComputeCounter(batch=batch)
    counting = CountingModel(model, counter, before_call=stop_if_out_of_time)
    total = x.shape[0]
    alive = torch.arange(total)                       # original candidate slot of each current row
    bounds = segment_bounds(prune_at, steps)
    seed = int(extra_args.get("seed", 0))
    pruning, stopped = [], None
    for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        args = {**extra_args, "seed": seed + segment * SEGMENT_SEED_STRIDE} if "seed" in extra_args else extra_args

        def watch(d, offset=start):
            latest.update(denoised=d["denoised"], step=d["i"] + offset)
            if callback is not None:
                callback({**d, "i": d["i"] + offset})
            stop_if_out_of_time()

        with subset_inpaint_state(model, args, alive, total) as seg_args:
            try:
                x = inner_function(counting, x, sigmas[start:stop + 1], extra_args=seg_args, callback=watch,
                                   disable=disable, **inner_options)
            except _OutOfTime:
                stopped = latest["step"]
                x = latest["denoised"]
                break
            if stop == steps:
                break
            n = x.shape[0] // batch
            keep = kept_per_item(n, keep_fraction)
            if keep >= n:
                continue
            x0 = denoise_alive(model, x, float(sigmas[stop]), seg_args, counter)
        scores = score_fn(model, x0, batch, counter, step=(stop, steps)).double().reshape(n, batch)
        clean, ok = finite_or_flat(scores, "the reward")
        order = torch.argsort(-clean, dim=0, stable=True)[:keep]                  # [keep, B], best first
        order = torch.where(ok[None, :], order, torch.arange(keep)[:, None].expand(keep, batch))
        rows = (order * batch + torch.arange(batch)[None, :]).reshape(-1)        # candidate-major again
        x, alive = x[rows.to(x.device)], alive[rows]
        latest.update(denoised=x0[rows.to(x0.device)], step=stop)
        pruning.append({"step": stop, "candidates": n, "kept": keep, "scores": clean.T.tolist(),
                        "kept_slots": (alive.reshape(keep, batch).T).tolist()})
    if report is not None:
        report({"pruning": pruning, "starting_seeds": total // batch, "survivors": x.shape[0] // batch,
                "survivor_slots": alive.tolist(), "stopped_by": "budget_seconds" if stopped is not None else "steps",
                "stopped_at_step": stopped, "seconds": deadline.elapsed(), **counter.per_image()})
    return x
