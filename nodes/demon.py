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
        Reward.Input("reward"),
        io.Vae.Input("vae", tooltip="decodes candidates for the reward; a TAESD loaded by the core VAELoader is "
                                    "a cheap choice"),
        io.Int.Input("k", display_name="K", default=16, min=1, max=256,
                     tooltip="noise candidates tried per steered step"),
        io.Float.Input("beta", default=0.1, min=0.0, max=10.0, step=0.01,
                       tooltip="SDE noise level inside the steering window (0 = deterministic ODE)"),
        io.Combo.Input("weighting", options=list(WEIGHTINGS), default="tanh"),
        io.Float.Input("tau", default=0.0, min=0.0, max=1000.0, step=0.0001,
                       tooltip="temperature of the weights; 0 = adaptive (std of the step's K rewards)"),
        io.Combo.Input("estimator", options=list(ESTIMATORS), default="tweedie",
                       tooltip="tweedie: one model call per candidate; ode: PF-ODE rollout (the paper's, "
                               "costly)"),
        io.Int.Input("max_rollout_steps", default=20, min=1, max=200,
                     tooltip="ode estimator: rollout steps at the highest sigma, fewer below"),
        io.Float.Input("min_sigma", default=0.0, min=0.0, max=10000.0, step=0.01,
                       tooltip="steer only while sigma >= this (the paper: 0.11 for SD); deterministic below"),
        io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="window start, fraction of steps"),
        io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="window end, fraction of steps"),
        io.Int.Input("chunk_items", default=0, min=0, max=4096,
                     tooltip="candidates per model call; 0 = as many as free memory allows"),
        io.Int.Input("budget", default=0, min=0, max=10_000_000,
                     tooltip="maximum model calls per image; K, then the window, shrink to fit. 0 = no limit"),
        io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                       tooltip="vae: decode candidates with the VAE input; latent_rgb: the live-preview "
                               "projection (nearly free, approximate: for colour-type rewards)"),
        io.String.Input("prompt", default="", multiline=True, optional=True,
                        tooltip="text for rewards that need the prompt"),
        io.Float.Input("budget_seconds", default=0.0, min=0.0, max=1_000_000.0, step=0.5, optional=True,
                       tooltip="maximum seconds per image for steering (0 = no limit); when spent, the remaining "
                               "steps are plain Euler steps, so the image is still finished"),
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
            outputs=[io.Sampler.Output()],
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
            outputs=[io.Latent.Output(), io.String.Output(display_name="trace_json"),
                     io.Image.Output(display_name="trace_plot")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                **steering) -> io.NodeOutput:
        recorder = TraceRecorder(steps)
        out, totals, trace = run_steering_ksampler(sample_demon, demon_options(**steering), recorder, model, seed,
                                                   steps, cfg, scheduler, positive, negative, latent_image, denoise)
        plot = plot_trace(trace, f"Demon: reward per step ({steering['reward'].describe()})")
        return io.NodeOutput(out, recorder.json(), plot, ui={"demon": [totals]})


NODES = [DemonSampler, KSamplerDemon]
