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
             score_fn=None, sampler_batch=None, **options):
    """sample_tree (or another sampler function of the pack) through ComfyUI's sample_custom (its KSAMPLER path)
    on the reference model.  Returns (output latents, the final report, the per-round reports).
    sampler_batch: passed to the sampler function as its `batch` (sample_pruned's items)."""
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
    opts = {"score_fn": score_fn or scoring.make_latent_scorer(cm.ReferenceVAE(), reward),
            # the plan (reported before the first model call) is neither a round nor the final report
            "report": lambda s: None if s.get("plan") else
            summary.update(s) if s.get("done") or "pruning" in s else rounds.append(s),
            **({"batch": sampler_batch} if sampler_batch else {}), **options}
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
    best latent, all candidates and scores as plain best-of-N, bit for bit; so does spend_saved_calls on top (no
    candidate is dropped, so there are no saved calls: 4 starting seeds, 48 calls per image)."""
    plain = run_best_of_n(executor)
    kept = run_best_of_n(executor, prune_at="0.3, 0.6", keep_fraction=1.0)
    assert torch.equal(plain[0], kept[0]) and torch.equal(plain[1], kept[1]) and plain[2] == kept[2]
    spent = run_best_of_n(executor, prune_at="0.3, 0.6", keep_fraction=1.0, spend_saved_calls=True)
    assert torch.equal(plain[0], spent[0]) and torch.equal(plain[1], spent[1])
    assert all(spent[2][key] == plain[2][key] for key in plain[2])
    assert spent[2]["starting_seeds"] == 4 and spent[2]["pruning"] == []
    assert spent[2]["model_calls_per_image"] == spent[2]["plan"]["plain_best_of_n_calls_per_image"] == 4 * STEPS


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


# ---- pruned best-of-N: spending the saved calls, budgets -------------------------------------------------------

def test_plan_spends_the_calls_pruning_saves_on_new_seeds():
    """The plan before sampling (a pure function).  12 steps, one call per step, pruning at step 6 keeping a
    quarter: N seeds cost 6N + N (scoring) + 6 ceil(N / 4) calls per image; within plain best-of-8's 96 calls that
    is 11 seeds (95 calls; 12 would cost 102).  Keep fraction 1 gives exactly n.  Two pruning points halving each
    time: 10 seeds (87 calls; 11 cost 97).  A budget below one seed's run is refused with the minimum."""
    pruning = harness.pack_submodule("samplers.pruning")
    plan = pruning.plan_seeds([6, 6], 0.25, 96)
    assert (plan.seeds, plan.calls, plan.survivors, plan.minimum) == (11, 95, [11, 3], 12)
    assert pruning.run_calls(12, [6, 6], 0.25)[0] == 102
    assert pruning.plan_seeds([6, 6], 1.0, 96).seeds == 8
    assert pruning.plan_seeds([12], 1.0, 96).seeds == 8
    two = pruning.plan_seeds([4, 4, 4], 0.5, 96)
    assert (two.seeds, two.calls, two.survivors) == (10, 87, [10, 5, 3])
    assert pruning.run_calls(11, [4, 4, 4], 0.5)[0] == 97
    for budget in (96, 200, 1000):
        for keep in (0.1, 0.5, 0.9):
            p = pruning.plan_seeds([3, 5, 4], keep, budget)
            assert p.calls <= budget < pruning.run_calls(p.seeds + 1, [3, 5, 4], keep)[0]
    capped = pruning.plan_seeds([1], 1.0, 10 ** 6)
    assert capped.seeds == pruning.MAX_SEEDS and capped.capped
    with pytest.raises(pruning.SteeringInputError, match="at least 12"):
        pruning.plan_seeds([6, 6], 0.5, 11)


def test_spend_saved_calls_starts_more_seeds_within_plain_best_of_n_calls(executor):
    """euler_ancestral, n 8, batch 2, pruning at half the steps keeping a quarter, spend_saved_calls on: 11
    starting seeds (instead of 8) pruned to 3 per item, 95 model calls per image counted during the run (plain
    best-of-8: 96); the trace records the seeds, the survivors at the pruning step and the calls.  Without the
    option the same pruning starts 8 seeds and spends 68."""
    best, survivors, scores = run_best_of_n(executor, n=8, prune_at="0.5", keep_fraction=0.25,
                                            spend_saved_calls=True)
    assert scores["starting_seeds"] == scores["plan"]["starting_seeds"] == 11
    assert [(p["step"], p["candidates"], p["kept"]) for p in scores["pruning"]] == [(STEPS // 2, 11, 3)]
    assert scores["model_calls_per_image"] == scores["plan"]["planned_calls_per_image"] == 95
    assert scores["model_calls_per_image"] <= scores["plan"]["plain_best_of_n_calls_per_image"] == 8 * STEPS
    assert survivors.shape == (6, 3, 8, 8) and best.shape == (2, 3, 8, 8)
    assert all(len(row) == 3 for row in scores["scores"])
    _, _, off = run_best_of_n(executor, n=8, prune_at="0.5", keep_fraction=0.25)
    assert off["starting_seeds"] == 8 and off["model_calls_per_image"] == 68 and "plan" not in off


def test_max_calls_budget_counts_the_samplers_calls_and_names_the_minimum(executor):
    """max_calls per image sets the starting seeds (n is ignored).  heun makes 2 calls per step but 1 on the last
    step to sigma 0 (23 calls for a 12-step image); pruning at step 6 keeping half: N seeds cost 12N + N +
    11 ceil(N / 2), so 100 calls give 5 seeds (98 calls, counted during the run).  Without pruning, 100 calls of
    euler are plain best-of-8.  A budget below one image's run is refused, saying the minimum (23)."""
    _, _, heun = run_best_of_n(executor, sampler="heun", n=2, prune_at="0.5", keep_fraction=0.5, max_calls=100)
    assert heun["plan"]["calls_per_candidate_per_segment"] == [12, 11] and heun["plan"]["calls_counted"]
    assert heun["starting_seeds"] == 5 and heun["model_calls_per_image"] == 98 <= 100
    _, everything, plain = run_best_of_n(executor, sampler="euler", n=2, max_calls=100)
    assert plain["starting_seeds"] == 8 and plain["model_calls_per_image"] == 96
    assert everything.shape[0] == 8 * 2
    with pytest.raises(RuntimeError, match="max_calls.*at least 23"):
        run_best_of_n(executor, sampler="heun", max_calls=22)


def test_the_dry_run_counts_every_samplers_calls_as_the_real_run_makes_them():
    """The plan's calls per candidate come from a dry run of the inner sampler on a zero denoiser.  For every core
    sampler but the adaptive dpm_adaptive (whose number of calls depends on the model's output), in two segments
    (12 steps, split at step 6), the count is measured (not the one-per-step fallback) and equals the calls the
    real run makes on the reference model: 1 per step for euler, 2 for heun except the last, the *_cfg_pp samplers
    included (their post-CFG hook runs in the dry run too)."""
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    pruning = harness.pack_submodule("samplers.pruning")
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization="eps"))
    view = type("Model", (), {"inner_model": type("Guider", (), {"inner_model": patcher.model,
                                                                 "model_patcher": patcher})()})
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", STEPS)
    checked = {}
    for name in comfy.samplers.KSampler.SAMPLERS:
        sampler = comfy.samplers.sampler_object(name)
        if name == "dpm_adaptive" or not hasattr(sampler, "sampler_function"):
            continue
        function, options = sampler.sampler_function, sampler.extra_options
        counted, measured = pruning.calls_per_candidate(function, options, view, (3, 8, 8), sigmas, [0, 6, STEPS])
        _, real, _ = run_tree("eps", batch=1, seed=1, sampler=pruning.sample_pruned, sampler_batch=1,
                              inner_function=function, inner_options=options, prune_at=[6], keep_fraction=1.0)
        checked[name] = (counted, real["model_calls_per_image"])
        assert measured and sum(counted) == real["model_calls_per_image"], (name, counted, real)
    assert checked["euler"][0] == [6, 6] and checked["heun"][0] == [12, 11] and "euler_cfg_pp" in checked


def test_spend_saved_calls_is_deterministic_and_batch_items_are_independent(executor):
    """A batch of two encoded images with noise masks where only item 1 differs (white: free; black: kept): with
    pruning and spend_saved_calls, item 0's pick, its scores and its pruning are bit-identical; the same workflow
    twice gives the same latent."""
    from test_demon import img2img_batch_prompt
    node = best_of_n_prompt(n=6, prune_at="0.3, 0.6", keep_fraction=0.5, spend_saved_calls=True)["3"]
    node["inputs"]["latent_image"] = ["7", 0]
    runs = []
    for colour in (0xFFFFFF, 0x000000, 0x000000):
        out = executor.run(img2img_batch_prompt(colour, node), want=("9",))
        runs.append((out["9"][0][0]["samples"], json.loads(out["9"][2][0])))
    (a, sa), (b, sb), (c, sc) = runs
    assert sa["starting_seeds"] > 6 and len(sa["pruning"]) == 2
    assert torch.equal(a[0], b[0]) and sa["scores"][0] == sb["scores"][0]
    assert [p["scores"][0] for p in sa["pruning"]] == [p["scores"][0] for p in sb["pruning"]]
    assert not torch.equal(a[1], b[1])
    assert torch.equal(b, c) and sb == {**sc, "seconds": sb["seconds"]}


class Ticking:
    """A denoiser proxy whose every call takes one second of a fake clock (`ticks`)."""

    def __init__(self, model, ticks):
        self.__dict__.update(_model=model, _ticks=ticks)

    def __call__(self, *args, **kwargs):
        out = self._model(*args, **kwargs)
        self._ticks[0] += 1.0
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_pruned_search_seconds_budget_stops_within_one_model_call():
    """sample_pruned with budget_seconds 5 per image (2 items: 10 s) on a fake clock where each batched model call
    takes 1 s: euler_ancestral, 4 candidates per item, 12 steps, pruning at step 6 keeping half.  Calls: steps 0-5
    (6 s), the pruning step's scoring call (7 s), steps 6, 7, 8 (10 s): the clock reaches the budget at the end of
    step 8's call, so the run stops there, spending no further model call, and returns the two survivors' clean
    estimates D(x, sigma_8) of that call, bit for bit.  Without the budget the run finishes (a different latent)."""
    import comfy.k_diffusion.sampling as kd
    pruning = harness.pack_submodule("samplers.pruning")
    ticks, seen = [0.0], []

    def timed_inner(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
        def record(d):
            seen.append(d["denoised"].clone())
            callback(d)
        return kd.sample_euler_ancestral(Ticking(model, ticks), x, sigmas, extra_args=extra_args, callback=record,
                                         disable=disable, **kw)

    real_denoise = pruning.denoise_alive

    def ticking_denoise(*args, **kwargs):
        out = real_denoise(*args, **kwargs)
        ticks[0] += 1.0
        return out

    options = dict(sampler=pruning.sample_pruned, batch=8, sampler_batch=2, seed=3, inner_function=timed_inner,
                   inner_options={}, prune_at=[6], keep_fraction=0.5)
    pruning.denoise_alive = ticking_denoise
    try:
        out, summary, _ = run_tree("eps", budget_seconds=5.0, clock=lambda: ticks[0], **options)
        calls_when_stopped = ticks[0]
        ticks[0], seen_timed = 0.0, list(seen)
        full, free, _ = run_tree("eps", **options)
    finally:
        pruning.denoise_alive = real_denoise
    assert summary["stopped_by"] == "budget_seconds" and summary["stopped_at_step"] == 8
    assert summary["seconds"] == calls_when_stopped == 10.0
    assert [(p["step"], p["candidates"], p["kept"]) for p in summary["pruning"]] == [(6, 4, 2)]
    assert out.shape == (4, 3, 8, 8) and torch.equal(out, seen_timed[-1].to(out))
    assert free["stopped_by"] == "steps" and free["stopped_at_step"] is None and ticks[0] == STEPS + 1
    assert not torch.allclose(out, full, atol=1e-3)
    with pytest.raises(pruning.SteeringInputError, match="budget_seconds"):
        run_tree("eps", budget_seconds=float("nan"), **options)


def test_best_of_n_seconds_budget_on_the_real_clock(executor):
    """Through the node on the real clock: 2000 euler steps (seconds of work on this CPU) with budget_seconds 0.5
    per image, batch 1, n 4: the run stops at the budget, within a generous 2 s (a model call here takes
    milliseconds), returns the best of the candidates' clean estimates, and says where it stopped."""
    import time
    prompt = best_of_n_prompt(sampler="euler", batch=1, budget_seconds=0.5)
    prompt["3"]["inputs"]["steps"] = 2000
    started = time.monotonic()
    best, candidates, scores = (lambda out: (out["3"][0][0]["samples"], out["3"][1][0]["samples"],
                                             json.loads(out["3"][2][0])))(executor.run(prompt, want=("3",)))
    wall = time.monotonic() - started
    print(f"stopped at step {scores['stopped_at_step']} after {scores['seconds']:.3f} s (wall {wall:.2f} s)")
    assert scores["stopped_by"] == "budget_seconds" and 0 <= scores["stopped_at_step"] < 1999
    assert 0.5 <= scores["seconds"] <= 2.5
    assert candidates.shape == (4, 3, 8, 8) and torch.isfinite(best).all()
    assert scores["best"] == [max(scores["scores"][0])] and torch.equal(best[0], candidates[scores["best_index"][0]])


# ---- the tree with rewards that compare candidates (manual pick, VLM), and the scorer's check -------------------

class ComparingReward:
    """Scores the red channel's mean, declares that it compares candidates, and records what it was shown."""
    name, differentiable, linear, needs_prompt, video, compares_candidates = ("comparing", False, False, False,
                                                                             "frame_mean", True)

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts=None, context=None):
        self.calls.append((images.clone(), context.groups, context.step))
        return images[..., 0].mean(dim=(1, 2)) - images[..., 2].mean(dim=(1, 2))

    def describe(self):
        return "comparing"


def test_a_comparing_reward_is_asked_once_per_round_about_real_leaves_only():
    """DTS*, batch 3, parallel 3, a 100-call budget per image: rounds of 3, 3, 3 leaves per item, then the budget
    leaves room for one more rollout of item 0 only, so the candidate-major layout pads items 1 and 2 in the last
    round.  A reward that compares candidates is asked once per round, about that round's real leaves only (all
    from the last step, at most `parallel` per item, never a pad): 9 + 9 + 9 + 1 images, 28 = the rollouts done."""
    reward = ComparingReward()
    _, summary, rounds = run_tree("eps", batch=3, seed=1, reward=reward, mode="dts_star", rollouts=100,
                                  parallel=3, max_calls=100)
    assert [r["rollouts"] for r in rounds] == [[3, 3, 3], [6, 6, 6], [9, 9, 9], [10, 9, 9]]
    assert len(reward.calls) == len(rounds)
    for images, groups, step in reward.calls:
        assert step == STEPS - 1
        assert max(list(groups).count(g) for g in set(groups)) <= 3
        flat = images.reshape(images.shape[0], -1)
        assert len({tuple(row.tolist()) for row in flat}) == flat.shape[0], "an image shown twice"
    assert [c[0].shape[0] for c in reward.calls] == [9, 9, 9, 1] and sum(summary["rollouts"]) == 28


def test_parallel_one_is_refused_for_a_comparing_reward_before_any_model_call():
    tree = harness.pack_submodule("samplers.tree")
    calls = [0]
    real = tree.denoise
    tree.denoise = lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), real(*a, **k))[1]
    try:
        with pytest.raises(tree.SteeringInputError, match="parallel to at least 2"):
            run_tree("eps", batch=2, reward=ComparingReward(), mode="dts_star", rollouts=4, parallel=1)
    finally:
        tree.denoise = real
    assert calls[0] == 0


def test_a_vae_of_another_layout_is_refused_before_any_model_call():
    """The tree runs the scorer's pre-sampling check first: a VAE that decodes 4-channel latents for the reference
    model's 3-channel ones is refused with the shared message, and the model is never called."""
    cm = harness.pack_submodule("reference.comfy_model")
    scoring = harness.pack_submodule("samplers.scoring")
    tree = harness.pack_submodule("samplers.tree")
    vae = cm.ReferenceVAE()
    vae.latent_channels = 4
    calls = [0]
    real = tree.denoise
    tree.denoise = lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), real(*a, **k))[1]
    try:
        with pytest.raises(tree.SteeringInputError, match="connect the VAE that belongs to the model"):
            run_tree("eps", batch=2, score_fn=scoring.make_latent_scorer(vae, linear_reward()), rollouts=2)
    finally:
        tree.denoise = real
    assert calls[0] == 0


def manual_pick_tree_prompt(parallel, rollouts=6, batch=2) -> dict:
    prompt = ksampler_tree_prompt(batch=batch, parallel=parallel, rollouts=rollouts)
    prompt["8"] = {"class_type": "RewardSteerManualPickReward",
                   "inputs": {"question": "Pick the reddest", "mode": "pick", "ask_every": 1, "timeout": 60,
                              "on_timeout": "uniform"}}
    return prompt


def test_manual_pick_on_the_tree_asks_once_per_round_and_item(executor):
    """KSampler (DTS*) with the Manual Pick Reward, batch 2, 6 rollouts, parallel 3, a helper thread playing the
    person (always the reddest): exactly 2 rounds x 2 items = 4 grids of 3 final images each (step = the last),
    and each item's output is a candidate the person picked.  parallel 1 is refused by name before any grid."""
    import threading
    import time

    import numpy as np
    from test_manual_pick import redness
    node = harness.pack_submodule("nodes.manual_pick")
    broker = node.broker()
    seen, stop = [], threading.Event()

    def person():
        while not stop.is_set():
            req = broker.pending
            if req is not None and req.token not in {s[0] for s in seen}:
                pick = int(np.argmax([redness(p) for p in req.images]))
                seen.append((req.token, req.item, req.items, len(req.images), req.step))
                broker.answer({"token": req.token, "prompt_id": req.prompt_id, "client_id": req.client_id,
                               "selected": [pick]})
            time.sleep(0.005)

    original = broker.is_connected
    broker.is_connected = lambda client_id: True      # the executor's client "tests" has no websocket
    thread = threading.Thread(target=person)
    thread.start()
    try:
        out = executor.run(manual_pick_tree_prompt(parallel=3), want=("3",))
        with pytest.raises(RuntimeError, match="parallel to at least 2"):
            executor.run(manual_pick_tree_prompt(parallel=1), want=("3",))
    finally:
        stop.set()
        thread.join(5)
        broker.is_connected = original
    trace = json.loads(out["3"][1][0])
    assert [s[1:] for s in seen] == [(0, 2, 3, STEPS - 1), (1, 2, 3, STEPS - 1)] * 2
    assert trace["rollouts"] == [6, 6] and trace["output_reward"] == [1.0, 1.0]


@pytest.fixture
def vlm_dirs(tmp_path, monkeypatch):
    nodes_vlm = harness.pack_submodule("nodes.vlm")
    monkeypatch.setattr(nodes_vlm, "cache_dir", lambda: str(tmp_path / "vlm_cache"))
    monkeypatch.setattr(nodes_vlm, "key_file_path", lambda: str(tmp_path / "vlm_keys.json"))


def test_the_vlm_ranks_each_rounds_leaves_of_an_item(executor, vlm_dirs):
    """KSampler (DTS*) with the VLM reward in ranking mode against a scripted OpenAI-compatible server (it ranks by
    redness), batch 2, 8 rollouts, parallel 4: one request per round and item (2 x 2), each a grid of that round's
    4 final images; the output is each item's top-ranked leaf."""
    from test_vlm import ScriptedVLM, text_of, vlm_node_inputs
    server = ScriptedVLM()
    try:
        prompt = ksampler_tree_prompt(parallel=4, rollouts=8)
        prompt["8"] = {"class_type": "RewardSteerVLMReward",
                       "inputs": vlm_node_inputs(server.url, mode="ranking", cache=False)}
        out = executor.run(prompt, want=("3",))
    finally:
        server.close()
    trace = json.loads(out["3"][1][0])
    assert len(server.requests) == 4
    assert all("The grid shows 4 images" in text_of(r["body"]) for r in server.requests)
    assert trace["rollouts"] == [8, 8] and trace["output_reward"] == trace["best_reward"]
    assert all(r == max(max(rr) for rr in (t["rollout_reward"][b] for t in trace["trace"]))
               for b, r in enumerate(trace["output_reward"]))
