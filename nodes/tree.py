"""Diffusion Tree Sampling nodes (DTS / DTS*): a SAMPLER for SamplerCustom / SamplerCustomAdvanced and an
all-in-one KSampler with the search's trace (JSON) and a plot of the best reward against model calls."""
from __future__ import annotations

import numpy as np

import comfy.samplers
from comfy_api.latest import io

from ..samplers.scoring import DECODERS, make_latent_scorer
from ..samplers.tree import MODES, sample_tree
from .sampling import TraceRecorder, batch_text, cost_text, ksampler_inputs, plot_panels, run_steering_ksampler
from .types import Reward

CATEGORY = "reward_steering/sampling"


def tree_inputs() -> list:
    """The search inputs shared by both nodes (their order is part of every saved workflow)."""
    return [
        Reward.Input("reward", tooltip="scores each rollout's final image; its value flows back up the tree "
                                       "(soft for dts, max for dts_star) and guides where later rollouts branch"),
        io.Vae.Input("vae", tooltip="decodes each rollout's final image for the reward (TAESD is a cheap choice)"),
        io.Combo.Input("mode", options=list(MODES), default="dts_star",
                       tooltip="dts: a draw from p(x) * exp(lambda * r(x)) (soft value backup); dts_star: search "
                               "for the highest reward (max backup), returns the best image found"),
        io.Float.Input("lam", display_name="lambda", default=10.0, min=0.0, max=100000.0, step=0.1,
                       tooltip="dts: the target's inverse temperature; dts_star ignores it"),
        io.Int.Input("rollouts", default=16, min=1, max=100000,
                     tooltip="rollouts per image (one rollout = one image's worth of steps, minus the steps it "
                             "shares with the tree)"),
        io.Int.Input("max_calls", default=0, min=0, max=10_000_000,
                     tooltip="maximum model calls per image (0 = no limit); at least one rollout's (= steps)"),
        io.Float.Input("max_seconds", default=0.0, min=0.0, max=1_000_000.0, step=0.5,
                       tooltip="maximum seconds per image (0 = no limit); stops within one model call of it, "
                               "after at least one rollout"),
        io.Int.Input("parallel", default=1, min=1, max=256,
                     tooltip="rollouts per image that share each model call (more = faster on a GPU, a little "
                             "less informed). They are also the selection point: each round's `parallel` final "
                             "images of an item are scored together in one reward call, so a reward that compares "
                             "candidates (manual pick, a VLM tournament or ranking) is asked once per round and "
                             "item about them, and needs parallel >= 2 (manual pick: keep ask_every at 1, every "
                             "round's images come from the last step)"),
        io.Float.Input("widening", default=1.0, min=0.01, max=1000.0, step=0.1,
                       tooltip="progressive widening: a node may have ceil(widening * visits^alpha) children"),
        io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                       tooltip="progressive widening exponent (0 = a fixed ceil(widening) children per node)"),
        io.Float.Input("exploration", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="dts_star: UCT exploration bonus, in units of the reward spread seen so far"),
        io.Float.Input("eta", default=1.0, min=0.01, max=1.0, step=0.01,
                       tooltip="fresh noise per step (1 = ancestral / DDPM-like): the variety between children"),
        io.Int.Input("chunk_items", default=0, min=0, max=4096, tooltip="states per model call; 0 = auto"),
        io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                       tooltip="vae: decode with the VAE input; latent_rgb: the live-preview projection (nearly "
                               "free, approximate: for colour-type rewards)"),
        io.String.Input("prompt", default="", multiline=True, optional=True,
                        tooltip="text for rewards that need the prompt"),
    ]


def tree_options(reward, vae, mode, lam, rollouts, max_calls, max_seconds, parallel, widening, alpha, exploration,
                 eta, chunk_items, decoder="vae", prompt="") -> dict:
    return {"score_fn": make_latent_scorer(vae, reward, [prompt] if prompt else None, decoder=decoder),
            "mode": mode, "lam": lam, "rollouts": rollouts, "max_calls": max_calls, "max_seconds": max_seconds,
            "parallel": parallel, "widening": widening, "alpha": alpha, "exploration": exploration, "eta": eta,
            "chunk_items": chunk_items}


class TreeRecorder(TraceRecorder):
    def step_text(self, stats: dict) -> str:
        return (f"rollouts: {batch_text(stats['rollouts'])}\nmodel calls: {batch_text(stats['model_calls'])}\n"
                f"best reward: {batch_text(stats['best_reward'])}")

    def done_text(self, summary: dict) -> str:
        return (f"done ({summary['mode']}, stopped by {summary['stopped_by']})\nrollouts: "
                f"{batch_text(summary['rollouts'])}, tree nodes: {batch_text(summary['tree_nodes'])}\nbest reward: {batch_text(summary['best_reward'])}\n"
                f"{cost_text(summary['model_calls_per_image'], self.total_steps, 'spent: ')}\n"
                f"{summary['seconds']:.1f} s")


def plot_tree(trace: list[dict], title: str):
    """Best reward so far and the round's mean rollout reward against model calls per image (batch means)."""
    best = [(float(np.mean(t["model_calls"])), float(np.mean(t["best_reward"]))) for t in trace]
    rollout = [(float(np.mean(t["model_calls"])), float(np.mean([np.mean(r) for r in t["rollout_reward"] if r])))
               for t in trace if any(t["rollout_reward"])]
    nodes = [(float(np.mean(t["model_calls"])), float(np.mean(t["tree_nodes"]))) for t in trace]
    return plot_panels([(title + " vs model calls per image", {"best reward": best, "rollout reward": rollout}),
                        ("tree nodes vs model calls per image", {"tree nodes": nodes})],
                       xlabel="model calls per image", ylabels=["reward", "tree nodes"])


def _reported_tree(model, x, sigmas, *args, **kwargs):
    return sample_tree(model, x, sigmas, *args, report=TreeRecorder(len(sigmas) - 1), **kwargs)


class TreeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerTreeSampler",
            display_name="Diffusion Tree Sampler (DTS / DTS*)",
            category=CATEGORY,
            description="Diffusion Tree Sampling as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: rollouts "
                        "grow a tree of denoising states and share its early steps; rewards flow back up the "
                        "tree. dts draws from p(x) * exp(lambda * r(x)); dts_star returns the best image found. "
                        "Stops at the rollout, model-call or seconds budget, whichever comes first.",
            inputs=tree_inputs(),
            outputs=[io.Sampler.Output(tooltip="connect to the sampler input of SamplerCustom / "
                                               "SamplerCustomAdvanced; the tree search then runs inside their "
                                               "sampling, with their sigmas, noise and guidance")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(_reported_tree, extra_options=tree_options(**kwargs)))


class KSamplerTree(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerKSamplerTree",
            display_name="KSampler (Diffusion Tree Sampling)",
            category=CATEGORY,
            description="KSampler with DTS / DTS* tree search. Outputs the latent, the search's trace (rollouts, "
                        "model calls, tree size, depth of re-use, best reward) as JSON and a plot of the best "
                        "reward against model calls.",
            inputs=[*ksampler_inputs(), *tree_inputs()],
            outputs=[io.Latent.Output(tooltip="per item, the tree's draw (dts) or the best leaf found (dts_star); "
                                              "decode it with VAE Decode"),
                     io.String.Output(display_name="trace_json",
                                      tooltip="JSON: per round, rollouts, model calls, tree nodes and the best and "
                                              "rollout rewards per item; then what stopped the search, its seconds "
                                              "and model calls per image"),
                     io.Image.Output(display_name="trace_plot",
                                     tooltip="plot: best reward so far and the rollouts' reward, and the tree's "
                                             "size, against model calls per image")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                **search) -> io.NodeOutput:
        recorder = TreeRecorder(steps)
        out, totals, trace = run_steering_ksampler(sample_tree, tree_options(**search), recorder, model, seed,
                                                   steps, cfg, scheduler, positive, negative, latent_image, denoise)
        plot = plot_tree(trace, f"{search['mode']}: reward ({search['reward'].describe()})")
        return io.NodeOutput(out, recorder.json(), plot, ui=recorder.ui(tree=[totals]))


NODES = [TreeSampler, KSamplerTree]
