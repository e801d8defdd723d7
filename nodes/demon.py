"""Demon sampler nodes: a SAMPLER for SamplerCustom / SamplerCustomAdvanced, and an all-in-one KSampler."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..samplers.demon import WEIGHTINGS, sample_demon
from ..samplers.estimators import ESTIMATORS
from ..samplers.scoring import DECODERS, make_latent_scorer
from .sampling import TraceRecorder, ksampler_inputs, plot_trace, run_steering_ksampler
from .types import Reward

CATEGORY = "reward_steering/sampling"


def demon_inputs() -> list:
    """The steering inputs shared by both nodes (their order is part of every saved workflow)."""
    return [
        Reward.Input("reward", tooltip="the reward that scores each candidate's clean-image estimate (any reward "
                                       "node, or Combine Rewards); the step moves toward high-scoring candidates"),
        io.Vae.Input("vae", tooltip="decodes candidates' clean-image estimates into images for the reward "
                                    "(decoder = vae): the model's VAE, or a TAESD from the core VAE Loader for "
                                    "speed. Must match the model's latents; unused with decoder = latent_rgb"),
        io.Int.Input("k", display_name="K", default=16, min=1, max=256,
                     tooltip="noise candidates tried at each steered step, per image. Each costs one model call "
                             "(tweedie) or one rollout (ode), one decode and one reward call, so K = 16 on every "
                             "step is about 17x a plain run; budget lowers K to fit. K = 1 turns steering off"),
        io.Float.Input("beta", default=0.1, min=0.0, max=10.0, step=0.01,
                       tooltip="noise level of Demon's SDE in the steering window: how much fresh noise each step "
                               "takes, i.e. how far the K candidates differ. 0 = deterministic steps, nothing to "
                               "choose from (steering off). Steps outside the window are plain Euler steps"),
        io.Combo.Input("weighting", options=list(WEIGHTINGS), default="tanh",
                       tooltip="how the K rewards of an item become weights on their noises: tanh (the paper's) "
                               "= tanh((r - mean) / tau), above-average candidates pull and below-average ones "
                               "push away; boltzmann = softmax((r - mean) / tau), only pulls, greedier as tau "
                               "falls. The weighted noise is rescaled to a normal noise's length"),
        io.Float.Input("tau", default=0.0, min=0.0, max=1000.0, step=0.0001,
                       tooltip="temperature dividing the centred rewards in the weighting, in the reward's units. "
                               "0 = adaptive: the std of the step's K rewards, per item (works for any reward "
                               "scale). Fixed: small = follow the best candidate, large = nearly an unweighted "
                               "mean (weak steering)"),
        io.Combo.Input("estimator", options=list(ESTIMATORS), default="tweedie",
                       tooltip="how each candidate's clean image is estimated for the reward. tweedie: the "
                               "model's denoised prediction, one call per candidate (blurry at high sigma); ode: a "
                               "PF-ODE rollout to sigma 0 (the paper's, sharper; up to 2 x max_rollout_steps + 1 "
                               "calls per candidate, counted by budget)"),
        io.Int.Input("max_rollout_steps", default=20, min=1, max=200,
                     tooltip="ode estimator only: rollout steps for a candidate at the schedule's highest sigma, "
                             "fewer at lower sigmas (Heun: 2 model calls each). Ignored with tweedie"),
        io.Float.Input("min_sigma", default=0.0, min=0.0, max=10000.0, step=0.01,
                       tooltip="steer only steps whose sigma >= min_sigma (the model's sigma units: SD up to "
                               "~14.6, flow models 0..1; the paper uses 0.11 for SD). A step is steered when it "
                               "passes this and lies in start..end; others are plain Euler steps. Late, low-sigma "
                               "steps change little, so this saves calls"),
        io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="steering window start, as a fraction of the steps (0 = the first step). Steps i "
                               "with start x steps <= i < end x steps and sigma >= min_sigma are steered; a window "
                               "that selects no step is an error"),
        io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="steering window end, as a fraction of the steps (1 = through the last steerable "
                               "step); must be > start. The final step to sigma 0 is never steered (no noise)"),
        io.Int.Input("chunk_items", default=0, min=0, max=4096,
                     tooltip="candidates (of all batch items) per model call; 0 = as many as free memory allows. "
                             "Lower it if memory runs out: it changes speed and memory, not the method"),
        io.Int.Input("budget", default=0, min=0, max=10_000_000,
                     tooltip="maximum model calls per image (0 = no limit), planned before sampling: if K x the "
                             "steered steps (x the rollout cost with ode) + steps exceeds it, K is lowered first "
                             "(down to 2), then the lowest-sigma steered steps leave the window. Must be at least "
                             "steps (one call each). budget_seconds is a separate limit on time"),
        io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                       tooltip="vae: decode candidates with the VAE input; latent_rgb: the live-preview "
                               "projection (nearly free, approximate: for colour-type rewards, not for rewards "
                               "that judge content or detail)"),
        io.String.Input("prompt", default="", multiline=True, optional=True,
                        tooltip="the prompt text for rewards that compare image and text (CLIP score, HPS, "
                                "PickScore, ImageReward, VLM) when their own text is empty; other rewards ignore "
                                "it"),
        io.Float.Input("budget_seconds", default=0.0, min=0.0, max=1_000_000.0, step=0.5, optional=True,
                       tooltip="maximum seconds per image for steering (0 = no limit; the batch gets this x its "
                               "size); when spent, the remaining steps are plain Euler steps, so the image is "
                               "still finished. Works alongside budget (calls)"),
    ]


def demon_options(reward, vae, k, beta, weighting, tau, estimator, max_rollout_steps, min_sigma, start, end,
                  chunk_items, budget, decoder="vae", prompt="", budget_seconds=0.0) -> dict:
    return {"score_fn": make_latent_scorer(vae, reward, [prompt] if prompt else None, decoder=decoder), "k": k,
            "beta": beta,
            "weighting": weighting, "tau": tau if tau > 0 else None, "estimator": estimator,
            "max_rollout_steps": max_rollout_steps, "min_sigma": min_sigma, "start": start, "end": end,
            "chunk_items": chunk_items, "budget": budget, "budget_seconds": budget_seconds}


def _reported_demon(model, x, sigmas, *args, **kwargs):
    """sample_demon with its statistics shown on the executing node (SamplerCustom / SamplerCustomAdvanced)."""
    return sample_demon(model, x, sigmas, *args, report=TraceRecorder(len(sigmas) - 1), **kwargs)


class DemonSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerDemonSampler",
            display_name="Demon Sampler (reward-steered)",
            category=CATEGORY,
            description="Sampling Demons as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: at each steered "
                        "step, K noise candidates are scored by the reward and the step takes their "
                        "reward-weighted noise. Works with any reward, with or without gradients.",
            inputs=demon_inputs(),
            outputs=[io.Sampler.Output(tooltip="connect to the sampler input of SamplerCustom / "
                                               "SamplerCustomAdvanced; Demon steering then runs inside their "
                                               "sampling, with their sigmas, noise and guidance")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(_reported_demon, extra_options=demon_options(**kwargs)))


class KSamplerDemon(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerKSamplerDemon",
            display_name="KSampler (Demon)",
            category=CATEGORY,
            description="KSampler with Demon reward steering. Outputs the latent, the reward trace as JSON and "
                        "a plot of reward per step.",
            inputs=[
                *ksampler_inputs(),
                *demon_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="the steered latent, as KSampler's (decode it with VAE Decode)"),
                     io.String.Output(display_name="trace_json",
                                      tooltip="JSON: each step's sigma, whether it was steered and its K "
                                              "candidates' reward mean / std / min / max per item; then K, steered "
                                              "steps and model calls, decodes and reward calls per image"),
                     io.Image.Output(display_name="trace_plot",
                                     tooltip="plot of reward per step: one line per batch item, their mean and "
                                             "the candidates' min-max band (connect Preview Image)")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                **steering) -> io.NodeOutput:
        recorder = TraceRecorder(steps)
        out, totals, trace = run_steering_ksampler(sample_demon, demon_options(**steering), recorder, model, seed,
                                                   steps, cfg, scheduler, positive, negative, latent_image, denoise)
        plot = plot_trace(trace, f"Demon: reward per step ({steering['reward'].describe()})")
        return io.NodeOutput(out, recorder.json(), plot, ui=recorder.ui(demon=[totals]))


NODES = [DemonSampler, KSamplerDemon]
