"""How exact sampling on the reference model is: the spread inside each component (second moment) and the mean of
a nonlinear reward (-MSE to a mirrored picture) against their closed forms, for plain KSampler sampling (lambda = 0)
and for SMC / FK steering (lambda > 0), through ComfyUI's real executor.

The tolerances are a stated discretisation allowance (the solver's step error, measured; it shrinks with more
steps) plus Monte-Carlo error (4 standard errors).  The step counts below are the ones at which the claims hold:
first-order steps (euler, euler_ancestral, SMC's ancestral base step) need hundreds; Heun needs about 100.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import harness

SIZE = 64           # image side: 8x8 latents (192 numbers), cheap enough for large batches
PICTURE = 4         # the reward's reference is this picture (orange diagonal) mirrored left-right: not in the mixture


def picture_nodes(prefix: str = "p") -> dict:
    """Nodes making the reward's reference IMAGE in the graph: one picture of the reference model (a one-component
    mixture with a tiny spread, sampled by Heun), decoded and mirrored.  Output: node f"{prefix}5"."""
    weights = ",".join("1" if k == PICTURE else "0" for k in range(PICTURE + 1))
    return {
        f"{prefix}1": {"class_type": "RewardSteerReferenceModel",
                       "inputs": {"parametrization": "eps", "components": PICTURE + 1, "spread": 0.005,
                                  "weights": weights}},
        f"{prefix}2": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        f"{prefix}3": {"class_type": "KSampler",
                       "inputs": {"model": [f"{prefix}1", 0], "positive": [f"{prefix}1", 2],
                                  "negative": [f"{prefix}1", 2], "latent_image": [f"{prefix}2", 0], "seed": 0,
                                  "steps": 30, "cfg": 1.0, "sampler_name": "heun", "scheduler": "beta",
                                  "denoise": 1.0}},
        f"{prefix}4": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}3", 0], "vae": [f"{prefix}1", 1]}},
        f"{prefix}5": {"class_type": "ImageFlip", "inputs": {"image": [f"{prefix}4", 0],
                                                             "flip_method": "y-axis: horizontally"}},
    }


def exactness_graph(sampler_node: dict, spread: float, batch: int) -> dict:
    """Reference model "1", latent "2", the sampler "3" (given), decode "4", -MSE reward "6" to the mirrored
    picture "p5", scores "7"."""
    return {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "eps", "components": 8, "spread": spread, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}},
        "3": sampler_node,
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        **picture_nodes(),
        "6": {"class_type": "RewardSteerImageSimilarityReward",
              "inputs": {"reference": ["p5", 0], "metric": "neg_mse"}},
        "7": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["4", 0], "reward": ["6", 0], "prompt": ""}},
    }


def ksampler_node(sampler: str, scheduler: str, steps: int, seed: int) -> dict:
    return {"class_type": "KSampler",
            "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                       "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": scheduler,
                       "denoise": 1.0}}


def smc_node(scheduler: str, steps: int, seed: int, lam: float, particles: int, interval: int) -> dict:
    return {"class_type": "RewardSteerKSamplerSMC",
            "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0, "scheduler": scheduler,
                       "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                       "reward": ["6", 0], "vae": ["1", 1], "particles": particles, "lam": lam,
                       "potential": "difference", "tempering": "none", "gamma": 0.008, "resampling": "systematic",
                       "ess_threshold": 0.5, "reward_start": 0, "reward_end": -1, "reward_interval": interval,
                       "eta": 1.0, "gradient_guidance": False, "output": "weighted_draw", "chunk_items": 0,
                       "decoder": "vae", "prompt": ""}}


def run_and_measure(executor, sampler_node: dict, spread: float, batch: int, lam: float) -> dict:
    """Sample, then compare with the exact law p * exp(lam r): within-component std, component frequencies and
    the mean reward, each with its Monte-Carlo standard error."""
    cm = harness.pack_submodule("reference.comfy_model")
    target = harness.pack_submodule("reference.target")
    rewards = harness.pack_submodule("rewards")
    out = executor.run(exactness_graph(sampler_node, spread, batch), want=("3", "p5"))
    latents = out["3"][0][0]["samples"].double()
    scores = torch.tensor(executor.history["outputs"]["7"]["scores"], dtype=torch.float64)
    assert latents.shape == (batch, 3, SIZE // 8, SIZE // 8) and scores.shape == (batch,)
    reward = rewards.ImageSimilarityReward(out["p5"][0][0])
    shape = tuple(latents.shape[1:])
    w, c, h = target.latent_quadratic_form(reward, cm.latent_to_image, shape)
    base = cm.ReferenceSpec(spread=spread).mixture(*shape[1:])
    exact = base.tilted(w, lam, h)
    # within-component spread: squared deviation from the component's (tilted) mean, per sample, then pooled
    labels = exact.classify(latents)
    dev2 = (latents - exact.means.double()[labels]).reshape(batch, -1).pow(2).mean(1)
    within = float(dev2.mean().sqrt())
    within_se = float(dev2.std()) / math.sqrt(batch) / (2 * within)
    freq = torch.bincount(labels, minlength=exact.num_components).double() / batch
    p = exact.weights.double()
    return {"within": within, "within_se": within_se, "spread": exact.spread, "base": base, "exact": exact,
            "freq": freq, "freq_z": (freq - p) / (p * (1 - p) / batch).sqrt().clamp_min(1e-12),
            "counts": freq * batch, "mean_reward": float(scores.mean()),
            "reward_se": float(scores.std()) / math.sqrt(batch), "exact_reward": exact.expected_quadratic(w, c, h),
            "base_reward": base.expected_quadratic(w, c, h)}


def assert_spread_within(m: dict, allowance: float, what: str):
    """Two-sided: |within-std / exact spread - 1| <= allowance + 4 standard errors."""
    error = m["within"] / m["spread"] - 1.0
    assert abs(error) <= allowance + 4 * m["within_se"] / m["spread"], (what, m["within"], m["spread"], error)


def assert_mean_reward_matches(m: dict, what: str):
    z = (m["mean_reward"] - m["exact_reward"]) / m["reward_se"]
    assert abs(z) < 4, (what, m["mean_reward"], m["exact_reward"], z)


# (sampler, scheduler, steps, allowance on the within-std): predicted step errors +0.2 %, -0.8 %, -1.4 %
PLAIN = [("heun", "beta", 100, 0.01), ("euler", "beta", 400, 0.015), ("euler_ancestral", "beta", 600, 0.025)]


@pytest.mark.parametrize("sampler,scheduler,steps,allowance", PLAIN)
def test_plain_sampling_reproduces_the_spread_and_a_nonlinear_reward(executor, sampler, scheduler, steps, allowance):
    n = 2000
    m = run_and_measure(executor, ksampler_node(sampler, scheduler, steps, seed=3), spread=0.1, batch=n, lam=0.0)
    what = f"{sampler} {scheduler} {steps}"
    assert_spread_within(m, allowance, what)
    assert_mean_reward_matches(m, what)
    _, pvalue = stats.chisquare(m["counts"].numpy(), (m["exact"].weights.double() * n).numpy())
    assert pvalue > 0.001, (what, m["counts"].tolist())


def test_plain_sampling_at_the_demo_step_count_is_not_exact(executor):
    """The checks above have power: 30 'normal' euler steps (the demo's) leave each component about 11 % too
    narrow (first-order steps are too large around sigma ~ spread)."""
    m = run_and_measure(executor, ksampler_node("euler", "normal", 30, seed=3), spread=0.1, batch=500, lam=0.0)
    error = m["within"] / m["spread"] - 1.0
    assert -0.15 < error < -0.07, error


def test_smc_reaches_the_exact_tilted_law_of_a_nonlinear_reward(executor):
    """FK steering toward -MSE to a mirrored picture (lambda 40, 'difference' potential, ancestral base step,
    32 particles, scored every 20th step; spread 0.2, so the spread's share of the reward is 4x the default's):
    weighted draws match p * exp(lambda r) in mean reward (4 SE), component frequencies (3 SE each) and the
    narrowed spread inside each component (allowance 4 %: the base step's error at 200 steps is about -3 %)."""
    m = run_and_measure(executor, smc_node("beta", 200, seed=5, lam=40.0, particles=32, interval=20), spread=0.2,
                        batch=200, lam=40.0)
    assert (m["exact"].weights - m["base"].weights).abs().max() > 0.1    # the tilt matters
    assert m["exact_reward"] > m["base_reward"] + 0.03
    assert m["spread"] < 0.2
    assert_mean_reward_matches(m, "smc")
    assert (m["freq_z"].abs() < 3).all(), (m["freq"].tolist(), m["exact"].weights.tolist())
    assert_spread_within(m, 0.04, "smc")


def test_smc_with_few_steps_is_not_exact(executor):
    """The spread check above has power: at 40 karras steps the same run's components are about 25 % too narrow
    (and its mean reward sits about 4 standard errors above the exact value, since a narrower component is
    closer to the picture)."""
    m = run_and_measure(executor, smc_node("karras", 40, seed=5, lam=40.0, particles=32, interval=20), spread=0.2,
                        batch=50, lam=40.0)
    error = m["within"] / m["spread"] - 1.0
    assert -0.35 < error < -0.15, error


def test_exact_target_node_gives_the_quadratic_answer_for_neg_mse(executor):
    """The Exact Target node accepts -MSE image similarity (quadratic in the latent) and reports the same exact law
    as the helpers: mean reward under p and p*exp(lam r), and the narrowed spread."""
    cm = harness.pack_submodule("reference.comfy_model")
    target = harness.pack_submodule("reference.target")
    rewards = harness.pack_submodule("rewards")
    graph = exactness_graph(ksampler_node("euler", "beta", 2, 0), 0.2, 1)
    graph["8"] = {"class_type": "RewardSteerReferenceExactTarget",
                  "inputs": {"model": ["1", 0], "reward": ["6", 0], "latent": ["2", 0], "lam": 40.0}}
    out = executor.run(graph, want=("p5",))
    node = executor.history["outputs"]["8"]["target"][0]
    reward = rewards.ImageSimilarityReward(out["p5"][0][0])
    shape = (3, SIZE // 8, SIZE // 8)
    w, c, h = target.latent_quadratic_form(reward, cm.latent_to_image, shape)
    base = cm.ReferenceSpec(spread=0.2).mixture(*shape[1:])
    exact = base.tilted(w, 40.0, h)
    assert abs(node["expected_reward_base"] - base.expected_quadratic(w, c, h)) < 1e-5
    assert abs(node["expected_reward_tilted"] - exact.expected_quadratic(w, c, h)) < 1e-5
    assert node["tilted_spread"] < node["base_spread"] == pytest.approx(0.2)
