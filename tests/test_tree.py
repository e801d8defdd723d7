"""Diffusion Tree Sampling (DTS, DTS*) and pruned best-of-N on the exact oracle (the reference model).

The law checks compare DTS's weighted draws (one per batch item: every item grows its own tree) with the exact
tilted law p * exp(lam r) of reference/target.py, for the linear "toward red" reward and the nonlinear -MSE to a
mirrored picture, on the eps and the flow model.  Settings (stated, chosen so the file stays cheap on a CPU):
8x8 latents, 12 'normal' steps, ancestral steps (eta 1), progressive widening 1 * visits^0.5, 200 items.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import harness
from test_smc import mirrored_picture_reward

RED = (0.9, 0.2, 0.2)
STEPS = 12
ITEMS = 200


def linear_reward():
    return harness.pack_submodule("rewards").LinearColorReward.toward(RED)


def run_tree(parametrization="eps", batch=ITEMS, seed=0, reward=None, x=None, steps=STEPS, sampler=None,
             **options):
    """sample_tree (or another sampler function of the pack) through ComfyUI's sample_custom (its KSAMPLER path)
    on the reference model.  Returns (output latents, the final report, the per-round reports)."""
    import comfy.sample
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    tree = harness.pack_submodule("samplers.tree")
    scoring = harness.pack_submodule("samplers.scoring")
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization=parametrization))
    reward = reward or linear_reward()
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    latent = torch.zeros(batch, 3, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed) if x is None else x
    cond = cm.neutral_conditioning()
    summary, rounds = {}, []
    opts = {"score_fn": scoring.make_latent_scorer(cm.ReferenceVAE(), reward),
            "report": lambda s: summary.update(s) if s.get("done") else rounds.append(s), **options}
    with torch.inference_mode():
        out = comfy.sample.sample_custom(patcher, noise, 1.0, comfy.samplers.KSAMPLER(sampler or tree.sample_tree,
                                                                                      extra_options=opts),
                                         sigmas, cond, cond, latent, disable_pbar=True, seed=seed)
    return out, summary, rounds


def law_error(out, parametrization, reward, lam):
    """(|mean reward - exact| in units of the exact standard error, max |frequency z| over components,
    TV between the component frequencies and the exact tilted ones, the mean reward, the exact one)."""
    cm = harness.pack_submodule("reference.comfy_model")
    target = harness.pack_submodule("reference.target")
    mix = cm.ReferenceSpec(parametrization=parametrization).mixture(8, 8)
    w, c, h = target.latent_reward_form(reward, cm.latent_to_image, (3, 8, 8))
    tilted = mix.tilted(w, lam, h)
    mean, var = tilted.quadratic_moments(w, c, h)
    n = out.shape[0]
    r = reward(cm.latent_to_image(out)).double()
    freq = torch.bincount(mix.classify(out), minlength=mix.num_components).double() / n
    p = tilted.weights.double()
    z = (freq - p) / (p * (1 - p) / n).sqrt().clamp_min(1e-12)
    return {"reward_z": abs(float(r.mean()) - mean) / (math.sqrt(var / n)), "freq_z": float(z.abs().max()),
            "tv": 0.5 * float((freq - p).abs().sum()), "mean": float(r.mean()), "exact": mean,
            "tilt_tv": 0.5 * float((mix.weights.double() - p).abs().sum())}


# (reward, lambda): the linear colour reward and the nonlinear -MSE to a mirrored picture
LAWS = {"linear": (linear_reward, 10.0), "nonlinear": (mirrored_picture_reward, 40.0)}
BUDGETS = (1, 4, 32)   # rollouts per item


@pytest.fixture(scope="module")
def convergence():
    results = {}
    for parametrization in ("eps", "flow"):
        for law, (make_reward, lam) in LAWS.items():
            reward = make_reward()
            for m in BUDGETS:
                out, summary, _ = run_tree(parametrization, seed=7, reward=reward, mode="dts", lam=lam, rollouts=m)
                results[parametrization, law, m] = law_error(out, parametrization, reward, lam)
    return results


@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("parametrization", ["eps", "flow"])
def test_dts_draws_converge_to_the_exact_tilted_law(convergence, parametrization, law):
    """With one rollout DTS is plain sampling, far from the tilted law; the error falls with the number of
    rollouts, and at 32 rollouts per item the mean reward is within 4 exact standard errors of the tilted law's
    and every component frequency within 3.5 standard errors."""
    e = {m: convergence[parametrization, law, m] for m in BUDGETS}
    print(parametrization, law, {m: (round(v["reward_z"], 2), round(v["freq_z"], 2), round(v["tv"], 3),
                                     round(v["mean"], 4)) for m, v in e.items()}, "exact", e[1]["exact"])
    assert e[1]["tilt_tv"] > 0.1                      # the tilt matters
    assert e[1]["reward_z"] > 6                       # one rollout: the base law
    assert e[4]["reward_z"] < e[1]["reward_z"] and e[32]["reward_z"] < e[1]["reward_z"] / 3
    assert e[32]["reward_z"] < 4, e[32]
    assert e[32]["freq_z"] < 3.5, e[32]


def plain_ancestral(parametrization, x, seed, steps=STEPS):
    """Plain sampling with the shared stochastic step (samplers/sde.py, eta 1), the first rollout's noise stream
    of each item: what DTS* must return with a one-rollout budget."""
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    sde = harness.pack_submodule("samplers.sde")
    resampling = harness.pack_submodule("samplers.resampling")
    mix = cm.ReferenceSpec(parametrization=parametrization).mixture(8, 8)
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization=parametrization))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    flow = parametrization == "flow"
    outs = []
    for b in range(x.shape[0]):
        gen = torch.Generator().manual_seed(resampling.item_seed(seed, b, "tree/0"))
        xb = x[b:b + 1] * (1.0 if not flow else 1.0)
        for i in range(steps):
            d = mix.denoise(xb, float(sigmas[i]), flow)
            if i == steps - 1:
                outs.append(d)
                break
            s, s2 = float(sigmas[i]), float(sigmas[i + 1])
            noise = torch.randn(xb.shape[1:], generator=gen, dtype=torch.float32)[None]
            fresh = sde.fresh_fraction_eta(torch.tensor([s], dtype=torch.float64), torch.tensor([s2],
                                           dtype=torch.float64), 1.0, flow, xb)
            xb = sde.stochastic_step(xb, d, torch.tensor([s], dtype=torch.float64),
                                     torch.tensor([s2], dtype=torch.float64), noise, fresh, flow)
    return torch.cat(outs)


@pytest.mark.parametrize("parametrization", ["eps", "flow"])
def test_dts_star_with_one_rollout_is_plain_sampling(parametrization):
    """DTS* (and DTS) with a one-rollout budget return the rollout itself: plain ancestral sampling from the same
    start with the same noises, to float tolerance (the model here is the mixture's closed form, outside ComfyUI)."""
    import comfy.sample
    x = comfy.sample.prepare_noise(torch.zeros(3, 3, 8, 8), 4)
    if parametrization == "flow":
        pass   # the flow model starts at sigma = 1: x is the noise itself, as for eps with its large sigma_max
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization=parametrization))
    ms = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    start = ms.noise_scaling(sigmas[0], x, torch.zeros_like(x), max_denoise=True)
    expected = plain_ancestral(parametrization, start, seed=4)
    for mode in ("dts_star", "dts"):
        out, summary, _ = run_tree(parametrization, batch=3, seed=4, x=x, mode=mode, rollouts=1)
        assert summary["model_calls"] == [STEPS] * 3 and summary["rollouts"] == [1] * 3
        assert torch.allclose(out, expected, atol=1e-5), (mode, (out - expected).abs().max())


def test_dts_star_best_reward_never_decreases_with_budget():
    """Same seed, budgets of 1, 2, 4, 8, 16 rollouts (and 60..300 model calls): each item's best reward is
    non-decreasing in the budget (a larger budget replays the smaller one's rollouts first), and it rises overall."""
    bests = []
    for m in (1, 2, 4, 8, 16):
        _, summary, rounds = run_tree("eps", batch=6, seed=9, mode="dts_star", rollouts=m)
        bests.append(summary["best_reward"])
        per_round = [r["best_reward"] for r in rounds]
        assert all(a <= b for prev, nxt in zip(per_round, per_round[1:]) for a, b in zip(prev, nxt))
    for smaller, larger in zip(bests, bests[1:]):
        assert all(a <= b for a, b in zip(smaller, larger)), (smaller, larger)
    assert sum(bests[-1]) > sum(bests[0])
    calls = []
    for budget in (60, 120, 300):
        _, summary, _ = run_tree("eps", batch=6, seed=9, mode="dts_star", rollouts=1000, max_calls=budget)
        assert summary["stopped_by"] == "max_calls" and max(summary["model_calls"]) <= budget
        calls.append(summary["best_reward"])
    for smaller, larger in zip(calls, calls[1:]):
        assert all(a <= b for a, b in zip(smaller, larger)), (smaller, larger)


def test_seconds_budget_stops_within_one_model_call():
    """A fake clock that advances one second per model call (the reference model is too fast to time): with
    max_seconds 50 per image and 2 images (100 s for the batch), the search stops at the first model call that
    would start past 100 s, dropping that round, so the clock reads at most 100 + one call's second."""
    model_calls = harness.pack_submodule("samplers.model_calls")
    ticks = [0.0]
    real_denoise = model_calls.denoise

    def counting_denoise(*args, **kwargs):
        ticks[0] += 1.0
        return real_denoise(*args, **kwargs)

    tree = harness.pack_submodule("samplers.tree")
    tree.denoise, saved = counting_denoise, tree.denoise
    try:
        _, summary, rounds = run_tree("eps", batch=2, seed=1, mode="dts_star", rollouts=10000, max_seconds=50.0,
                                      clock=lambda: ticks[0])
    finally:
        tree.denoise = saved
    assert summary["stopped_by"] == "max_seconds"
    assert 100.0 <= summary["seconds"] <= 101.0, summary["seconds"]
    assert rounds[-1]["seconds"] <= 100.0


def test_same_seed_same_output_and_batch_items_are_independent():
    """Same seed: bit-identical output and trace.  Change item 1's starting noise: items 0 and 2 stay
    bit-identical (each item has its own tree and its own per-rollout generators), and item 1 changes."""
    import comfy.sample
    x = comfy.sample.prepare_noise(torch.zeros(3, 3, 8, 8), 2)
    a, sa, ra = run_tree("eps", batch=3, seed=2, x=x.clone(), mode="dts", lam=10.0, rollouts=6, parallel=2)
    b, sb, rb = run_tree("eps", batch=3, seed=2, x=x.clone(), mode="dts", lam=10.0, rollouts=6, parallel=2)
    timeless = lambda rounds: [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]   # noqa: E731
    assert torch.equal(a, b) and timeless(ra) == timeless(rb)
    x2 = x.clone()
    x2[1] = torch.randn(x[1].shape, generator=torch.Generator().manual_seed(99))
    c, sc, rc = run_tree("eps", batch=3, seed=2, x=x2, mode="dts", lam=10.0, rollouts=6, parallel=2)
    assert torch.equal(a[0], c[0]) and torch.equal(a[2], c[2])
    assert not torch.equal(a[1], c[1])
    assert [r["rollout_reward"][0] for r in ra] == [r["rollout_reward"][0] for r in rc]


def test_bad_budgets_and_inputs_are_refused_with_the_minimum():
    tree = harness.pack_submodule("samplers.tree")
    with pytest.raises(tree.SteeringInputError, match=f"at least {STEPS}"):
        run_tree("eps", batch=1, mode="dts", max_calls=STEPS - 1)
    with pytest.raises(tree.SteeringInputError, match="mode"):
        run_tree("eps", batch=1, mode="beam")
    with pytest.raises(tree.SteeringInputError, match="lambda"):
        run_tree("eps", batch=1, lam=float("nan"))
    with pytest.raises(tree.SteeringInputError, match="MiB"):
        run_tree("eps", batch=1, rollouts=10 ** 9)


def test_nan_rewards_warn_and_the_run_finishes(caplog):
    class NanReward:
        name, differentiable, linear = "nan", False, False

        def __call__(self, images, prompts=None, context=None):
            r = images.mean(dim=(1, 2, 3))
            r[0] = float("nan")
            return r

        def describe(self):
            return "nan"

    out, summary, _ = run_tree("eps", batch=2, seed=1, reward=NanReward(), mode="dts", rollouts=3)
    assert torch.isfinite(out).all() and summary["rollouts"] == [3, 3]
    assert "NaN" in caplog.text


def tree_inputs(**overrides) -> dict:
    inputs = {"reward": ["8", 0], "vae": ["1", 1], "mode": "dts_star", "lam": 10.0, "rollouts": 6, "max_calls": 0,
              "max_seconds": 0.0, "parallel": 2, "widening": 1.0, "alpha": 0.5, "exploration": 1.0, "eta": 1.0,
              "chunk_items": 0, "decoder": "vae", "prompt": ""}
    inputs.update(overrides)
    return inputs


def ksampler_tree_prompt(batch=2, seed=3, **overrides) -> dict:
    return {
        "1": harness.reference_model_node("eps"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "8": harness.red_reward_node(),
        "3": {"class_type": "RewardSteerKSamplerTree",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": 1.0, "scheduler": "normal",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         **tree_inputs(**overrides)}},
    }


def test_all_in_one_node_trace_plot_and_determinism(executor):
    """The all-in-one node through ComfyUI's executor with the colour reward: the trace JSON (rollouts, calls, tree
    size, depth of re-use, best reward per round, never decreasing), a drawn plot, same seed = same latent."""
    prompt = ksampler_tree_prompt()
    out = executor.run(prompt, want=("3",))
    latent, trace_json, plot = out["3"][0][0], out["3"][1][0], out["3"][2][0]
    trace = json.loads(trace_json)
    assert latent["samples"].shape == (2, 3, 8, 8)
    assert trace["mode"] == "dts_star" and trace["rollouts"] == [6, 6] and trace["stopped_by"] == "rollouts"
    assert all(STEPS <= c <= 6 * STEPS for c in trace["model_calls"])
    rounds = trace["trace"]
    assert [r["rollouts"] for r in rounds] == [[2, 2], [4, 4], [6, 6]]
    assert all(len(levels) == 2 for r in rounds for levels in r["branch_level"])
    for prev, nxt in zip(rounds, rounds[1:]):
        assert all(a <= b for a, b in zip(prev["best_reward"], nxt["best_reward"]))
    assert trace["output_reward"] == trace["best_reward"]
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.min() < 0.5
    again = executor.run(prompt, want=("3",))
    assert torch.equal(again["3"][0][0]["samples"], latent["samples"])


def test_sampler_node_in_samplercustomadvanced_with_a_call_budget(executor):
    """The SAMPLER node under core SamplerCustomAdvanced (flow model), DTS with a 40-call budget per image: one
    finite latent per item, the same for the same seed."""
    prompt = {
        "1": harness.reference_model_node("flow"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "9": harness.red_reward_node(),
        "4": {"class_type": "RewardSteerTreeSampler",
              "inputs": tree_inputs(reward=["9", 0], mode="dts", rollouts=100, max_calls=40)},
        **harness.sampler_custom_advanced_nodes("4", "normal", STEPS),
    }
    out = executor.run(prompt, want=("8",))
    samples = out["8"][0][0]["samples"]
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()
    again = executor.run(prompt, want=("8",))
    assert torch.equal(again["8"][0][0]["samples"], samples)


def test_masked_img2img_keeps_the_unmasked_half(executor):
    """img2img at denoise 0.6 with a noise mask on the left half, batch of two: the right half stays the encoded
    image (core's mask blending at every model call, through the padded candidate-major layout)."""
    prompt = harness.masked_img2img_graph("eps")
    prompt["8"] = harness.red_reward_node()
    prompt["9"] = {"class_type": "RewardSteerKSamplerTree",
                   "inputs": {"model": ["1", 0], "seed": 1, "steps": STEPS, "cfg": 1.0, "scheduler": "normal",
                              "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["7", 0], "denoise": 0.6,
                              **tree_inputs(rollouts=4)}}
    out = executor.run(prompt, want=("9", "3"))
    result, encoded = out["9"][0][0]["samples"], out["3"][0][0]["samples"]
    assert result.shape == encoded.shape == (2, 3, 8, 8)
    assert torch.allclose(result[..., 4:], encoded[..., 4:], atol=1e-4)
    assert not torch.allclose(result[..., :4], encoded[..., :4], atol=1e-2)


def best_of_n_prompt(sampler="euler_ancestral", n=4, batch=2, **pruning) -> dict:
    return {
        "1": harness.reference_model_node("eps"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "8": harness.red_reward_node(),
        "3": {"class_type": "RewardSteerBestOfN",
              "inputs": {"model": ["1", 0], "seed": 5, "steps": STEPS, "cfg": 1.0, "sampler_name": sampler,
                         "scheduler": "normal", "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "denoise": 1.0, "reward": ["8", 0], "vae": ["1", 1], "n": n, "prompt": "", **pruning}},
    }


def run_best_of_n(executor, **kwargs):
    out = executor.run(best_of_n_prompt(**kwargs), want=("3",))
    return out["3"][0][0]["samples"], out["3"][1][0]["samples"], json.loads(out["3"][2][0])


def test_pruning_with_keep_fraction_one_is_best_of_n_bit_for_bit(executor):
    """euler_ancestral (stochastic), n 4, batch 2: pruning points 0.3 and 0.6 with keep fraction 1 give the same
    best latent, all candidates and scores as plain best-of-N, bit for bit."""
    plain = run_best_of_n(executor)
    kept = run_best_of_n(executor, prune_at="0.3, 0.6", keep_fraction=1.0)
    assert torch.equal(plain[0], kept[0]) and torch.equal(plain[1], kept[1]) and plain[2] == kept[2]


def test_pruning_keeps_the_best_candidates_and_saves_calls(executor):
    """euler (deterministic), n 8, batch 2, prune at half the steps keeping a quarter: the two survivors per item
    are the candidates whose clean-image estimates scored highest there, and they finish exactly as in plain
    best-of-N (the segmented run and the extra scoring call change nothing for them); the run uses
    8 * 6 + 8 (scoring) + 2 * 6 = 68 model calls per image instead of 96."""
    plain_best, plain_all, plain_scores = run_best_of_n(executor, sampler="euler", n=8)
    best, survivors, scores = run_best_of_n(executor, sampler="euler", n=8, prune_at="0.5", keep_fraction=0.25)
    assert survivors.shape == (4, 3, 8, 8)
    (step,) = scores["pruning"]
    assert step["step"] == STEPS // 2 and step["candidates"] == 8 and step["kept"] == 2
    for b in range(2):
        ranked = sorted(range(8), key=lambda j: -step["scores"][b][j])
        assert [slot // 2 for slot in step["kept_slots"][b]] == ranked[:2]
        assert all(slot % 2 == b for slot in step["kept_slots"][b])
    slots = torch.tensor(scores["survivor_slots"])
    assert torch.equal(survivors, plain_all[slots])
    assert scores["model_calls_per_image"] == 8 * 6 + 8 + 2 * 6
    # the pruned pick is one of plain best-of-N's candidates, never better than its best
    assert all(p <= q + 1e-9 for p, q in zip(scores["best"], plain_scores["best"]))


def test_bad_pruning_points_are_named(executor):
    with pytest.raises(RuntimeError, match="prune_at"):
        run_best_of_n(executor, prune_at="0.5, half", keep_fraction=0.5)
    with pytest.raises(RuntimeError, match="prune_at"):
        run_best_of_n(executor, prune_at="1.5", keep_fraction=0.5)


def test_demon_seconds_budget_stops_steering_at_the_limit():
    """Demon with budget_seconds 20 per image (batch 1), K 4, tweedie, 12 steps, and a fake clock advancing one
    second per batched model call: a steered step makes 2 (the state, then the 4 candidates in one), so
    steering stops at step 10, the first whose state is denoised at or after 20 s (21 s); the remaining steps are
    unsteered, one call each.  Without a budget every step but the last steers."""
    demon = harness.pack_submodule("samplers.demon")
    estimators = harness.pack_submodule("samplers.estimators")
    ticks = [0.0]
    real = demon.denoise

    def counting_denoise(*args, **kwargs):
        ticks[0] += 1.0
        return real(*args, **kwargs)

    demon.denoise, estimators.denoise = counting_denoise, counting_denoise
    try:
        _, timed, _ = run_tree("eps", batch=1, seed=1, sampler=demon.sample_demon, k=4, budget_seconds=20.0,
                               clock=lambda: ticks[0])
        _, free, _ = run_tree("eps", batch=1, seed=1, sampler=demon.sample_demon, k=4)
    finally:
        demon.denoise, estimators.denoise = real, real
    assert timed["out_of_time_at_step"] == 10
    assert [t["steered"] for t in timed["trace"]] == [True] * 10 + [False] * 2
    assert timed["model_calls_per_image"] == 10 * (1 + 4) + 2    # in items: the state and its 4 candidates
    assert free["out_of_time_at_step"] is None and free["steered_steps"] == STEPS - 1
    with pytest.raises(demon.SteeringInputError, match="budget_seconds"):
        run_tree("eps", batch=1, sampler=demon.sample_demon, k=4, budget_seconds=float("inf"))
