"""SMC / FK steering nodes (a SAMPLER and an all-in-one KSampler) and the Best-of-N baseline node."""
from __future__ import annotations

import json
import math

import torch

import comfy.samplers
from comfy_api.latest import io

from ..samplers.pruning import (calls_per_candidate, parse_prune_at, plan_seeds, sample_pruned,
                                segment_bounds)
from ..samplers.resampling import RESAMPLERS
from ..samplers.scoring import DECODERS, make_latent_scorer
from ..samplers.smc import OUTPUTS, POTENTIALS, TEMPERING, sample_smc
from ..samplers.model_calls import align_conds_with_items
from .sampling import (DOWNSCALE_KEYS, TraceRecorder, batch_text, cost_text, fix_empty_latent, ksampler_inputs, run_sampler,
                       run_steering_ksampler, show_text_on_node, sigmas_for)
from .types import Reward

CATEGORY = "reward_steering/sampling"


def smc_inputs() -> list:
    """The steering inputs shared by both SMC nodes (their order is part of every saved workflow)."""
    return [
        Reward.Input("reward", tooltip="the reward r(x) that weights the particles (any reward node, or Combine "
                                       "Rewards); scored on each particle's clean-image estimate at scored steps"),
        io.Vae.Input("vae", tooltip="decodes particles' clean-image estimates for the reward (decoder = vae): the "
                                    "model's VAE, or a TAESD for speed; must match the model's latents; unused "
                                    "with decoder = latent_rgb"),
        io.Int.Input("particles", default=4, min=1, max=512,
                     tooltip="particles per batch item. Every particle takes every step, so the cost is about "
                             "particles x a plain run's model calls, plus one decode and reward call per particle "
                             "at each scored step. More particles = a closer match to the target law"),
        io.Float.Input("lam", display_name="lambda", default=10.0, min=0.0, max=100000.0, step=0.1,
                       tooltip="strength of the tilt: the population targets p(x) * exp(lambda * r(x)). In the "
                               "reward's units: lambda x the reward's spread over particles of ~1 is mild, ~10 "
                               "strong (more resampling, lower ESS); 0 = unsteered. tempering ramps it during the "
                               "run, and every potential ends at exactly lambda"),
        io.Combo.Input("potential", options=list(POTENTIALS), default="difference",
                       tooltip="how the rewards a particle's lineage scored so far weight it at each scored step "
                               "(FK steering): difference = exp(lambda (r_now - r_previous)), favours rising "
                               "rewards; max = exp(lambda x best so far); sum = exp(lambda x sum so far); "
                               "immediate = exp(lambda r_now). A final correction makes all of them target the "
                               "same p * exp(lambda r); they differ in how early they select"),
        io.Combo.Input("tempering", options=list(TEMPERING), default="none",
                       tooltip="ramp lambda over the steps: none = full lambda from the first scored step; "
                               "exponential (DAS) = lambda x min((1 + gamma)^(step+1) - 1, 1); linear = lambda x "
                               "(step+1) / steps. The last step always uses the full lambda"),
        io.Float.Input("gamma", default=0.008, min=0.0, max=1.0, step=0.001,
                       tooltip="exponential tempering only: the ramp's rate. lambda reaches full strength after "
                               "about 0.69 / gamma steps (0.008: 87 steps, so with 30 steps it stays below ~27 % "
                               "until the last). Ignored with tempering none or linear"),
        io.Combo.Input("resampling", options=list(RESAMPLERS), default="systematic",
                       tooltip="how an item's particles are redrawn by weight when resampled: systematic (one "
                               "uniform, lowest variance), stratified (one draw per stratum) or multinomial "
                               "(independent draws); all keep the target"),
        io.Float.Input("ess_threshold", default=0.5, min=0.0, max=1.0, step=0.05,
                       tooltip="resample an item at a scored step when its effective sample size < threshold x "
                               "particles; 1 = at every scored step, 0 = never (the weights then act only in the "
                               "final draw). Only scored steps (reward_start / end / interval) can resample"),
        io.Int.Input("reward_start", default=0, min=0, max=10000,
                     tooltip="first step (0-based) at which particles are scored, weighted and may be resampled; "
                             "earlier steps only move them. The last step is always scored"),
        io.Int.Input("reward_end", default=-1, min=-1, max=10000,
                     tooltip="last step of the scoring schedule (-1 = the last step); the final step is scored "
                             "anyway, to apply the final potential"),
        io.Int.Input("reward_interval", default=1, min=1, max=10000,
                     tooltip="score every n-th step from reward_start: fewer decodes and reward calls, and fewer "
                             "chances to resample"),
        io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="fresh noise in each particle's step: 1 = ancestral / DDPM-like, 0 = deterministic "
                               "(DDIM / Euler). Copies made by resampling differ only through this noise, so keep "
                               "it high"),
        io.Boolean.Input("gradient_guidance", default=False,
                         tooltip="DAS: shift each step's proposal along the reward's gradient (std^2 x lambda_t x "
                                 "grad r), with the weight correction that keeps the target. Needs a "
                                 "differentiable reward; costs a backward pass through model, VAE and reward "
                                 "per step"),
        io.Combo.Input("output", options=list(OUTPUTS), default="weighted_draw",
                       tooltip="weighted_draw: one particle per item drawn by its final weight (a draw from the "
                               "target); best: the particle with the highest last reward (greedy); all: every "
                               "particle, items x particles latents, item by item"),
        io.Int.Input("chunk_items", default=0, min=0, max=4096,
                     tooltip="particles (of all batch items) per model call; 0 = as many as free memory allows. "
                             "Changes speed and memory, not the method"),
        io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                       tooltip="vae: decode particles with the VAE input; latent_rgb: the live-preview "
                               "projection (nearly free, approximate: for colour-type rewards, not for rewards "
                               "that judge content or detail)"),
        io.String.Input("prompt", default="", multiline=True, optional=True,
                        tooltip="the prompt text for rewards that compare image and text (CLIP score, HPS, "
                                "PickScore, ImageReward, VLM) when their own text is empty; other rewards ignore "
                                "it"),
    ]


def smc_options(reward, vae, particles, lam, potential, tempering, gamma, resampling, ess_threshold, reward_start,
                reward_end, reward_interval, eta, gradient_guidance, output, chunk_items, decoder="vae",
                prompt="") -> dict:
    prompts = [prompt] if prompt else None
    return {"score_fn": make_latent_scorer(vae, reward, prompts, decoder=decoder),
            "grad_score_fn": make_latent_scorer(vae, reward, prompts, differentiable=True, decoder=decoder)
            if gradient_guidance else None,
            "particles": particles, "lam": lam, "potential": potential, "tempering": tempering, "gamma": gamma,
            "resampling": resampling, "ess_threshold": ess_threshold, "start": reward_start, "end": reward_end,
            "interval": reward_interval, "eta": eta, "output": output, "chunk_items": chunk_items}


def format_smc_step(stats: dict, total: int) -> str:
    text = f"step {stats['step'] + 1}/{total}  sigma {stats['sigma']:.3g}  lambda {stats['lambda']:.3g}\n"
    text += f"ESS: {batch_text(stats['ess'])}"
    if "reward_mean" in stats:
        text += f"\nparticles' mean: {batch_text(stats['reward_mean'])}"
    resampled = sum(stats.get("resampled", []))
    if resampled:
        text += f"\nresampled {resampled} of {len(stats['resampled'])} items"
    return text


class SMCRecorder(TraceRecorder):
    def step_text(self, stats: dict) -> str:
        return format_smc_step(stats, self.total_steps)

    def done_text(self, summary: dict) -> str:
        return (f"done: {summary['particles']} particles, final ESS: {batch_text(summary['final_ess'])}\n"
                f"{cost_text(summary['model_calls_per_image'], self.total_steps, 'spent: ')}\n"
                f"{summary['decodes_per_image']:.0f} decodes per image")


def plot_smc(trace: list[dict], title: str, ess_threshold: float | None = None,
             particles: int | None = None) -> torch.Tensor:
    """Reward per item and batch mean; ESS with the resampling threshold and the resampling events."""
    from .plots import smc_figure, to_image
    return to_image(smc_figure(trace, title, ess_threshold, particles))


def _reported_smc(model, x, sigmas, *args, **kwargs):
    return sample_smc(model, x, sigmas, *args, report=SMCRecorder(len(sigmas) - 1), **kwargs)


class SMCSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerSMCSampler",
            display_name="SMC / FK Steering Sampler",
            category=CATEGORY,
            description="Feynman-Kac steering as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: particles "
                        "weighted by reward potentials and resampled, targeting p(x) * exp(lambda * r(x)).",
            inputs=smc_inputs(),
            outputs=[io.Sampler.Output(tooltip="connect to the sampler input of SamplerCustom / "
                                               "SamplerCustomAdvanced; SMC steering then runs inside their "
                                               "sampling, with their sigmas, noise and guidance")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(_reported_smc, extra_options=smc_options(**kwargs)))


class KSamplerSMC(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerKSamplerSMC",
            display_name="KSampler (SMC / FK steering)",
            category=CATEGORY,
            description="KSampler with SMC / FK reward steering. Outputs the latent, the trace (rewards, ESS, "
                        "final particle weights) as JSON, and a plot.",
            inputs=[
                *ksampler_inputs(),
                *smc_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="the chosen particle per item (output), or every particle with "
                                              "output = all; decode it with VAE Decode"),
                     io.String.Output(display_name="trace_json",
                                      tooltip="JSON: each step's sigma, lambda, ESS, reward mean / max and "
                                              "resampling per item; then the final ESS, particle weights and "
                                              "rewards, and model calls and decodes per image"),
                     io.Image.Output(display_name="trace_plot",
                                     tooltip="plot: reward per step for each item and their mean; ESS per item "
                                             "with the threshold line and the resampling events")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                **steering) -> io.NodeOutput:
        recorder = SMCRecorder(steps)
        out, totals, trace = run_steering_ksampler(sample_smc, smc_options(**steering), recorder, model, seed,
                                                   steps, cfg, scheduler, positive, negative, latent_image, denoise)
        if out["samples"].shape[0] != latent_image["samples"].shape[0]:
            out.pop("noise_mask", None)  # "all" returns every particle; a per-item mask no longer lines up
            out.pop("batch_index", None)
        plot = plot_smc(trace, f"SMC: reward per step ({steering['reward'].describe()})",
                        steering["ess_threshold"], steering["particles"])
        return io.NodeOutput(out, recorder.json(), plot, ui=recorder.ui(smc=[totals]))


class ItemAlignedSampler(comfy.samplers.Sampler):
    """A core sampler run on n candidate-major copies of a batch of B items: the guider's conds are tiled to B first,
    so every copy gets the conditioning core KSampler gives its item (a batch-2 conditioning over 3 items too)."""

    def __init__(self, inner, batch: int):
        self.inner, self.batch = inner, batch

    def __getattr__(self, name):  # sampler_function, options, ...: what callers may read from the real sampler
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, *args, **kwargs):
        align_conds_with_items(model_wrap, self.batch)
        return self.inner.sample(model_wrap, *args, **kwargs)


class BestOfN(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerBestOfN",
            display_name="Best-of-N (seed search)",
            category=CATEGORY,
            description="Samples N candidates per batch item with consecutive noise (one batched run with any "
                        "sampler), scores them with the reward and keeps the best. The baseline every steering "
                        "method should beat at equal compute. Optional early pruning (prune_at, keep_fraction) "
                        "drops weak seeds partway; spend_saved_calls / max_calls turn the saved calls into more "
                        "starting seeds within a model-call budget, and budget_seconds stops the search on time "
                        "with the best so far. scores_json records the starting seeds, the survivors at each "
                        "pruning step and the model calls spent.",
            inputs=[
                *ksampler_inputs(sampler_name=True),
                Reward.Input("reward", tooltip="scores every finished candidate (and, with pruning, the clean-"
                                               "image estimates at each pruning step); the highest is kept"),
                io.Vae.Input("vae", tooltip="decodes the candidates for the reward; must match the model's "
                                            "latents (a TAESD is a cheap choice)"),
                io.Int.Input("n", default=4, min=1, max=1024,
                             tooltip="candidates (starting seeds) per batch item; spend_saved_calls starts more "
                                     "within n's plain best-of-N calls, and max_calls replaces it"),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="the prompt text for rewards that compare image and text (CLIP score, HPS, "
                                        "PickScore, ImageReward, VLM) when their own text is empty"),
                io.String.Input("prune_at", default="", optional=True,
                                tooltip="early pruning: fractions of the steps (e.g. 0.3, 0.6) at which every "
                                        "candidate's clean-image estimate is scored and only the best are kept; "
                                        "empty = plain best-of-N"),
                io.Float.Input("keep_fraction", default=1.0, min=0.01, max=1.0, step=0.05, optional=True,
                               tooltip="share of each item's candidates kept at each pruning step (1 = no pruning: "
                                       "exactly best-of-N)"),
                io.Boolean.Input("spend_saved_calls", default=False, optional=True,
                                 tooltip="start from more seeds than n: as many as keep the pruned run's model "
                                         "calls per image (the segments plus one scoring call per candidate at each "
                                         "pruning step) within plain best-of-N's with n. Off: n seeds, and pruning "
                                         "just saves calls. Changes nothing without pruning (keep_fraction 1); "
                                         "max_calls, when set, is the budget instead"),
                io.Int.Input("max_calls", default=0, min=0, max=10_000_000, optional=True,
                             tooltip="model calls per image (0 = off). Set: the number of starting seeds is the "
                                     "most whose run (with the pruning above, if any) fits this budget, and n is "
                                     "ignored; it must be at least one seed's full run (steps x the sampler's calls "
                                     "per step); the error says the minimum"),
                io.Float.Input("budget_seconds", default=0.0, min=0.0, max=1_000_000.0, step=0.5, optional=True,
                               tooltip="seconds per image (0 = off; the batch gets budget_seconds x batch size). "
                                       "When spent, sampling stops within one model call and the best of the "
                                       "candidates' current clean-image estimates is returned per item (anytime; "
                                       "works with or without pruning and call budgets)"),
            ],
            outputs=[io.Latent.Output(display_name="best",
                                      tooltip="the highest-scoring candidate of each batch item (batch size as "
                                              "latent_image)"),
                     io.Latent.Output(display_name="all",
                                      tooltip="every finished candidate (the survivors, with pruning), candidate-"
                                              "major: candidate j of item b at j x batch + b"),
                     io.String.Output(display_name="scores_json",
                                      tooltip="JSON: every candidate's score per item, the best index and score; "
                                              "with pruning or budgets also the starting seeds, survivors at each "
                                              "pruning step and model calls spent")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                reward, vae, n, prompt="", prune_at="", keep_fraction=1.0, spend_saved_calls=False, max_calls=0,
                budget_seconds=0.0) -> io.NodeOutput:
        batch = latent_image["samples"].shape[0]
        from ..samplers.model_calls import ComputeCounter

        class _Model:  # the scorer only needs the model behind the sampler (latent format, process_latent_out)
            inner_model = type("G", (), {"inner_model": model.model, "model_patcher": model})()

        if not math.isfinite(budget_seconds) or budget_seconds < 0:
            raise ValueError(f"budget_seconds must be a finite number >= 0 (0 = off), got {budget_seconds}")
        scorer = make_latent_scorer(vae, reward, [prompt] if prompt else None)
        scorer.check(_Model, fix_empty_latent(model, latent_image))   # a VAE / reward that cannot score: refused now
        sigmas = sigmas_for(model, scheduler, steps, denoise)
        sampler = comfy.samplers.sampler_object(sampler_name)
        points = parse_prune_at(prune_at, len(sigmas) - 1)
        # keep fraction 1 drops nothing: plain best-of-N, bit for bit (one segment, no pruning step)
        points = points if keep_fraction < 1.0 else []
        plan, requested = None, n
        if max_calls > 0 or spend_saved_calls:
            plan = plan_best_of_n(sampler, _Model, fix_empty_latent(model, latent_image).shape[1:], sigmas, seed,
                                  n, points, keep_fraction, max_calls)
            n = plan["starting_seeds"]
        if plan is not None:
            plain_one = plan["plain_best_of_n_calls_per_image"] / requested
            planned = (f"planned: {plan['planned_calls_per_image']:.0f} model calls per image\n"
                       f"  = {plan['planned_calls_per_image'] / plain_one:.1f}x a plain run")
        else:
            planned = f"planned: {n} seeds per image = {n}x a plain run"
        show_text_on_node(planned)
        # candidates laid out candidate-major (like the steering samplers), each aligned with its item's conditioning
        tiled = {key: latent_image[key] for key in DOWNSCALE_KEYS if key in latent_image}
        tiled["samples"] = latent_image["samples"].repeat(n, *([1] * (latent_image["samples"].ndim - 1)))
        if "noise_mask" in latent_image:
            mask = latent_image["noise_mask"]
            tiled["noise_mask"] = mask.repeat(n, *([1] * (mask.ndim - 1))) if mask.shape[0] == batch else mask
        pruning = {}
        if points or plan is not None or budget_seconds > 0:
            sampler = comfy.samplers.KSAMPLER(sample_pruned, extra_options={
                "inner_function": sampler.sampler_function, "inner_options": sampler.extra_options,
                "score_fn": scorer, "batch": batch, "prune_at": points, "keep_fraction": keep_fraction,
                "budget_seconds": budget_seconds, "report": pruning.update},
                inpaint_options=sampler.inpaint_options)
        out = run_sampler(model, ItemAlignedSampler(sampler, batch), sigmas, seed, cfg, positive, negative, tiled)
        samples = out["samples"]
        scores = scorer(_Model, samples, batch, ComputeCounter(batch=batch))
        table = scores.reshape(-1, batch)   # the survivors of pruning, or all n
        best = table.argmax(dim=0)
        chosen = samples[best * batch + torch.arange(batch)]
        result = {"scores": table.T.tolist(), "best_index": best.tolist(), "best": table.max(0).values.tolist()}
        result.update(pruning)
        if plan is not None:
            result["plan"] = plan
        text = f"best of {n}: {batch_text(result['best'])}"
        if pruning:
            text += (f"\nper image: {pruning['model_calls_per_image']:.0f} model calls, survivors "
                     + " -> ".join(str(p["candidates"]) for p in pruning["pruning"]) + f" -> {pruning['survivors']}")
            if pruning["stopped_by"] == "budget_seconds":
                text += f"\nstopped by budget_seconds at step {pruning['stopped_at_step'] + 1}"
        text += "\n" + planned
        show_text_on_node(text)
        return io.NodeOutput({"samples": chosen}, {"samples": samples}, json.dumps(result),
                             ui={"best_of_n": [result], "text": [text]})


def plan_best_of_n(sampler, model_view, item_shape, sigmas, seed, n, points, keep_fraction, max_calls) -> dict:
    """Starting seeds for a model-call budget per image: max_calls, or plain best-of-N's calls with n."""
    steps = len(sigmas) - 1
    function, options = sampler.sampler_function, sampler.extra_options
    (plain_one,), measured = calls_per_candidate(function, options, model_view, item_shape, sigmas, [0, steps], seed)
    segment_calls, measured_too = calls_per_candidate(function, options, model_view, item_shape, sigmas,
                                                      segment_bounds(points, steps), seed)
    budget = max_calls if max_calls > 0 else n * plain_one
    plan = plan_seeds(segment_calls, keep_fraction if points else 1.0, budget,
                      what="max_calls" if max_calls > 0 else "n")
    return {"starting_seeds": plan.seeds, "planned_survivors": plan.survivors, "planned_calls_per_image": plan.calls,
            "budget_calls_per_image": plan.budget, "budget_from": "max_calls" if max_calls > 0 else "n",
            "plain_best_of_n_calls_per_image": n * plain_one, "one_seed_calls": plan.minimum,
            "calls_per_candidate_per_segment": segment_calls, "calls_counted": measured and measured_too,
            "capped_at_max_seeds": plan.capped}


NODES = [SMCSampler, KSamplerSMC, BestOfN]
