"""Demon sampler on the exact oracle and through ComfyUI's real sampling paths."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from scipy import stats

import harness

PARAMS = ["eps", "v_prediction", "flow"]
RED = {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}


def demon_inputs(**over):
    inputs = {"k": 4, "beta": 0.1, "weighting": "tanh", "tau": 0.0, "estimator": "tweedie", "max_rollout_steps": 20,
              "min_sigma": 0.0, "start": 0.0, "end": 1.0, "chunk_items": 0, "budget": 0, "decoder": "vae",
              "prompt": ""}
    inputs.update(over)
    return inputs


def ksampler_demon_prompt(parametrization="eps", batch=8, seed=1, steps=20, scheduler="normal", **steer):
    return {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": parametrization, "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "RewardSteerColorReward", "inputs": dict(RED)},
        "3": {"class_type": "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": seed, "steps": steps, "cfg": 1.0, "scheduler": scheduler, "denoise": 1.0,
                         "reward": ["5", 0], "vae": ["1", 1], **demon_inputs(**steer)}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        "6": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["4", 0], "reward": ["5", 0]}},
    }


def run_scores(executor, prompt):
    out = executor.run(prompt, want=("3",))
    return torch.tensor(executor.history["outputs"]["6"]["scores"]), out


@pytest.mark.parametrize("parametrization", PARAMS)
def test_k1_beta0_is_comfys_euler_through_samplercustomadvanced(executor, parametrization):
    """Stated tolerance: 1e-5 absolute (our step is computed in float64, ComfyUI's Euler in float32)."""
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": parametrization, "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "RewardSteerColorReward", "inputs": dict(RED)},
        "6": {"class_type": "RewardSteerDemonSampler",
              "inputs": {"reward": ["5", 0], "vae": ["1", 1], **demon_inputs(k=1, beta=0.0)}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 15,
                                                         "denoise": 1.0}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}},
        "10": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["1", 2]}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["10", 0],
                                                                 "sampler": ["6", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["2", 0]}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["10", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["2", 0]}},
    }
    out = executor.run(prompt, want=("11", "12"))
    demon, euler = out["11"][0][0]["samples"], out["12"][0][0]["samples"]
    assert torch.allclose(demon, euler, atol=1e-5), (demon - euler).abs().max()


@pytest.mark.parametrize("parametrization", PARAMS)
def test_k1_at_the_default_beta_is_core_ksampler_euler(executor, parametrization):
    """Steering off (K = 1) at the node's default beta = 0.1 is the user's plain sampler: KSampler (Demon) equals the
    core KSampler with euler, same seed, steps and scheduler.  Stated tolerance: 1e-5 absolute (float32 rounding;
    our step runs in float64).  Before the fix K = 1 ran the stochastic step inside the window (max difference 1.74
    eps, 1.87 flow)."""
    prompt = ksampler_demon_prompt(parametrization, batch=4, seed=7, steps=20, k=1)
    assert prompt["3"]["inputs"]["beta"] == 0.1
    prompt["7"] = {"class_type": "KSampler",
                   "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                              "seed": 7, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                              "denoise": 1.0}}
    out = executor.run(prompt, want=("3", "7"))
    demon, euler = out["3"][0][0]["samples"], out["7"][0][0]["samples"]
    assert torch.allclose(demon, euler, atol=1e-5), (demon - euler).abs().max()
    trace = json.loads(out["3"][1][0])
    assert trace["steered_steps"] == 0 and trace["model_calls_per_image"] == 20


def img2img_batch_prompt(second_colour: int, sampler_node: dict) -> dict:
    """A batch of two encoded images, each with its red channel as its noise mask: item 0 white (free everywhere),
    item 1 `second_colour` (white: free, black: kept as it is), into node "9" = sampler_node (a KSampler-style node
    reading its latent from node "7"); the red reward is node "8"."""
    return {
        "1": harness.reference_model_node("eps"),
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFFFFFF}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": second_colour}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "ImageToMask", "inputs": {"image": ["4", 0], "channel": "red"}},
        "7": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["6", 0]}},
        "8": harness.red_reward_node(),
        "9": sampler_node,
    }


def test_batch_items_do_not_influence_each_other(executor):
    """A batch of two where only item 1's image (and so its noise mask) differs: item 0's result is bit-identical."""
    node = {"class_type": "RewardSteerKSamplerDemon",
            "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["7", 0],
                       "seed": 3, "steps": 12, "cfg": 1.0, "scheduler": "normal", "denoise": 1.0,
                       "reward": ["8", 0], "vae": ["1", 1], **demon_inputs(k=4)}}
    a = executor.run(img2img_batch_prompt(0xFFFFFF, node), want=("9",))["9"][0][0]["samples"]
    b = executor.run(img2img_batch_prompt(0x000000, node), want=("9",))["9"][0][0]["samples"]
    assert (a[1] - b[1]).abs().max() > 0.1      # item 1 did change
    assert torch.equal(a[0], b[0]), (a[0] - b[0]).abs().max()


@pytest.mark.parametrize("parametrization", PARAMS)
def test_mean_reward_rises_with_k(executor, parametrization):
    ks = [1, 2, 4, 8, 16]
    batch = 48
    results = {k: run_scores(executor, ksampler_demon_prompt(parametrization, batch=batch, seed=100 + k, k=k))[0]
               for k in ks}
    means = {k: float(v.mean()) for k, v in results.items()}
    ses = {k: float(v.std() / math.sqrt(batch)) for k, v in results.items()}
    # a significant positive trend of reward in log K ...
    x = torch.cat([torch.full((batch,), math.log2(k)) for k in ks]).numpy()
    y = torch.cat([results[k] for k in ks]).numpy()
    trend = stats.linregress(x, y)
    assert trend.slope > 0 and trend.pvalue < 1e-3, (means, trend)
    # ... K=16 clearly above K=1, and no step down that is more than noise
    assert means[16] > means[1] + 5 * math.hypot(ses[16], ses[1]), means
    for a, b in zip(ks, ks[1:]):
        assert means[b] > means[a] - 2.5 * math.hypot(ses[a], ses[b]), (a, b, means, ses)


def test_boltzmann_tau_to_zero_is_greedy_best_candidate():
    demon = harness.pack_submodule("samplers.demon")
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 3, generator=gen)
    noises = torch.randn(8, 3, 4, 5, 5, generator=gen)
    w = demon.demon_weights(rewards, "boltzmann", 1e-9)
    best = rewards.argmax(0)
    assert torch.equal(w, torch.nn.functional.one_hot(best, 8).T.float())
    greedy = torch.stack([noises[best[b], b] for b in range(3)])
    greedy = greedy * math.sqrt(100) / greedy.reshape(3, -1).norm(dim=1).view(3, 1, 1, 1)
    assert torch.allclose(demon.combine_noises(noises, w), greedy, atol=1e-5)
    # tanh with adaptive tau; flat rewards give equal weights; the result sits on the sqrt(N) sphere
    flat = demon.demon_weights(torch.ones(8, 3), "tanh", None)
    assert torch.equal(flat, torch.ones(8, 3))
    z = demon.combine_noises(noises, demon.demon_weights(rewards, "tanh", None))
    assert torch.allclose(z.reshape(3, -1).norm(dim=1), torch.full((3,), 10.0), atol=1e-4)


def test_boltzmann_small_tau_run_equals_greedy_run(executor, monkeypatch):
    demon = harness.pack_submodule("samplers.demon")
    # the window stops at 60% of the steps: later, candidates can tie to float precision and greedy is ambiguous
    prompt = ksampler_demon_prompt("flow", batch=4, seed=3, k=6, weighting="boltzmann", tau=1e-9, end=0.6)
    _, boltz = run_scores(executor, prompt)
    real = demon.demon_weights

    def greedy(rewards, weighting, tau):
        return torch.nn.functional.one_hot(rewards.argmax(0), rewards.shape[0]).T.to(rewards.dtype)

    monkeypatch.setattr(demon, "demon_weights", greedy)
    _, greedy_out = run_scores(executor, prompt)
    monkeypatch.setattr(demon, "demon_weights", real)
    assert torch.allclose(boltz["3"][0][0]["samples"], greedy_out["3"][0][0]["samples"], atol=1e-5)


class PromptColourReward:
    """Test reward: the prompt names the colour each image should lean toward."""
    name = "prompt colour"
    needs_prompt = True
    differentiable = linear = False
    targets = {"red": (0.9, 0.2, 0.2), "blue": (0.2, 0.2, 0.9)}

    def __init__(self):
        self.contexts = []

    def __call__(self, images, prompts, context=None):
        self.contexts.append(context)
        rewards = harness.pack_submodule("rewards")
        return torch.stack([rewards.LinearColorReward.toward(self.targets[p])(img[None])[0]
                            for img, p in zip(images, prompts)])


def run_demon_direct(parametrization, prompts, chunk_items, k=8, batch=2, seed=0, reward=None):
    import comfy.sample
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    demon = harness.pack_submodule("samplers.demon")
    scoring = harness.pack_submodule("samplers.scoring")
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization=parametrization))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 20)
    latent = torch.zeros(batch, 3, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = cm.neutral_conditioning()
    score = scoring.make_latent_scorer(cm.ReferenceVAE(), reward or PromptColourReward(), prompts)
    sampler = comfy.samplers.KSAMPLER(demon.sample_demon, extra_options={
        "score_fn": score, "k": k, "beta": 0.2, "chunk_items": chunk_items})
    with torch.inference_mode():
        return comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                          disable_pbar=True, seed=seed)


def test_batch_items_follow_their_own_prompt_and_chunking_agrees():
    cm = harness.pack_submodule("reference.comfy_model")
    rewards = harness.pack_submodule("rewards")
    red, blue = rewards.LinearColorReward.toward((0.9, 0.2, 0.2)), rewards.LinearColorReward.toward((0.2, 0.2, 0.9))
    reds, blues = [], []
    for seed in range(6):
        out = run_demon_direct("eps", ["red", "blue"], chunk_items=0, seed=seed)
        img = cm.latent_to_image(out)
        reds.append(float(red(img[:1]) - red(img[1:])))
        blues.append(float(blue(img[1:]) - blue(img[:1])))
    # item 0 is steered to red, item 1 to blue
    assert sum(r > 0 for r in reds) >= 5 and sum(b > 0 for b in blues) >= 5, (reds, blues)
    reward = PromptColourReward()
    whole = run_demon_direct("flow", ["red", "blue"], chunk_items=0, seed=9, reward=reward)
    # the reward is told which candidates belong to which item, and at which step
    assert [c.groups for c in reward.contexts] == [(0, 1) * 8] * len(reward.contexts)
    assert [c.step for c in reward.contexts] == list(range(len(reward.contexts))) and reward.contexts[0].steps == 20
    chunked = run_demon_direct("flow", ["red", "blue"], chunk_items=2, seed=9)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_tiny_unet_batch_of_two_prompts_chunked_equals_unchunked(executor):
    """The real UNet with a batch-2 conditioning: candidates stay aligned with their prompt in any chunking."""
    import comfy.sample
    import comfy.samplers
    tiny = harness.pack_submodule("reference.tiny_unet")
    demon = harness.pack_submodule("samplers.demon")
    scoring = harness.pack_submodule("samplers.scoring")
    rewards = harness.pack_submodule("rewards")
    model, vae = tiny.build_tiny_unet_model(0), tiny.build_tiny_vae(0)
    cond = [[torch.cat([tiny.prompt_conditioning("a red apple")[0][0], tiny.prompt_conditioning("a blue car")[0][0]]),
             {}]]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 6)
    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 1)
    score = scoring.make_latent_scorer(vae, rewards.LinearColorReward((1.0, 0.0, 0.0)))

    def run(chunk):
        sampler = comfy.samplers.KSAMPLER(demon.sample_demon, extra_options={"score_fn": score, "k": 4,
                                                                             "chunk_items": chunk})
        with torch.inference_mode():
            return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                              disable_pbar=True, seed=1)

    a, b = run(0), run(2)
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_same_seed_same_output_and_trace(executor):
    prompt = ksampler_demon_prompt("v_prediction", batch=3, seed=5, k=4)
    s1, o1 = run_scores(executor, prompt)
    s2, o2 = run_scores(executor, prompt)
    assert torch.equal(o1["3"][0][0]["samples"], o2["3"][0][0]["samples"])
    trace = json.loads(o1["3"][1][0])
    assert trace["k"] == 4 and trace["model_calls_per_image"] == 20 + 4 * 19
    assert trace["decodes_per_image"] == 4 * 19 and trace["reward_calls_per_image"] == 4 * 19
    plot = o1["3"][2][0]
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.min() < 0.5  # something was drawn


def test_ode_estimator_and_budget(executor):
    _, out = run_scores(executor, ksampler_demon_prompt("eps", batch=2, k=4, estimator="ode", max_rollout_steps=6))
    ode = json.loads(out["3"][1][0])
    assert ode["model_calls_per_image"] > 20 + 4 * 19  # rollouts cost more than one call per candidate
    assert ode["model_calls_per_image"] == ode["planned_calls_per_image"]
    _, out = run_scores(executor, ksampler_demon_prompt("eps", batch=2, k=16, budget=200))
    fitted = json.loads(out["3"][1][0])
    assert fitted["model_calls_per_image"] <= 200 and fitted["k"] < 16
    assert fitted["model_calls_per_image"] == fitted["planned_calls_per_image"]


def rollout_calls_per_image(executor, sigma_max, sigma_min, steps=8, k=2):
    """Model calls per image that the Demon SAMPLER node reports (text on SamplerCustomAdvanced) for the ODE
    estimator on a Karras schedule sigma_max -> sigma_min of `steps` steps, on the reference eps model."""
    prompt = {
        "1": harness.reference_model_node("eps"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": harness.red_reward_node(),
        "4": {"class_type": "RewardSteerDemonSampler",
              "inputs": {"reward": ["3", 0], "vae": ["1", 1], **demon_inputs(k=k, estimator="ode")}},
        **harness.sampler_custom_advanced_nodes("4", "karras", steps),
    }
    prompt["5"] = {"class_type": "KarrasScheduler",
                   "inputs": {"steps": steps, "sigma_max": sigma_max, "sigma_min": sigma_min, "rho": 7.0}}
    executor.run(prompt, want=("8",))
    texts = [m[1].decode("utf-8", errors="replace") for m in executor.messages if isinstance(m[1], (bytes, bytearray))]
    calls = [int(c) for t in texts for c in re.findall(r"spent: (\d+) model calls per image", t)]
    planned = [int(c) for t in texts for c in re.findall(r"planned: (\d+) model calls per image", t)]
    assert calls and planned[:1] == calls[-1:], texts   # the plan, shown before the first call, is what it spends
    return calls[-1]


def test_ode_rollout_length_is_measured_on_the_run_schedule(executor):
    """The rollout of a candidate at relative position j/7 of an 8-step Karras schedule has ceil(20 j / 7) + 1
    intervals (max_rollout_steps 20), whatever the model's own sigma range: SD's schedule (14.6 -> 0.029) on the
    reference model (sigma_max ~ 4500) gets the same rollouts as the reference model's full schedule.  Before the fix
    the position was measured on the model's range: the first candidate of SD's schedule got 7 intervals, not 19,
    and the run 110 model calls per image instead of 274."""
    estimators = harness.pack_submodule("samplers.estimators")
    cm = harness.pack_submodule("reference.comfy_model")
    import comfy.k_diffusion.sampling as kds
    ms = cm.build_reference_model(cm.ReferenceSpec()).get_model_object("model_sampling")
    sd_like = kds.get_sigmas_karras(8, 0.0291675, 14.614642)
    own = kds.get_sigmas_karras(8, float(ms.sigma_min), float(ms.sigma_max))
    expected = [math.ceil(20 * j / 7) + 1 for j in range(6, -1, -1)]   # candidates at sigmas[1..7]
    for sigmas in (sd_like, own):
        span = estimators.schedule_span(sigmas)
        assert [estimators.rollout_steps(float(s), span, 20) for s in sigmas[1:8]] == expected
    # one call per step, and per candidate (K = 2) Heun's 2 calls per interval but 1 for the jump to sigma = 0
    calls = 8 + 2 * sum(2 * (n - 1) + 1 for n in expected)
    assert rollout_calls_per_image(executor, 14.614642, 0.0291675) == calls
    assert rollout_calls_per_image(executor, float(ms.sigma_max), float(ms.sigma_min)) == calls


def test_budget_below_the_number_of_steps_is_refused(executor):
    """Every step costs one model call: budget 2 for 4 steps cannot be met (before: ran silently with 4 calls per
    image).  A budget of exactly the steps runs them unsteered."""
    with pytest.raises(RuntimeError, match=r"budget \(2 model calls per image\) is below the minimum for 4 steps.*"
                                           r"at least 4"):
        executor.run(ksampler_demon_prompt("eps", batch=1, steps=4, k=4, budget=2))
    _, out = run_scores(executor, ksampler_demon_prompt("eps", batch=1, steps=4, k=4, budget=4))
    trace = json.loads(out["3"][1][0])
    assert trace["model_calls_per_image"] == 4 and trace["steered_steps"] == 0


def test_one_step_says_that_its_step_lands_on_sigma_zero(executor):
    """With steps = 1 the window is full, but the only step jumps to sigma = 0 and cannot be steered."""
    with pytest.raises(RuntimeError) as error:
        executor.run(ksampler_demon_prompt("eps", batch=1, steps=1, k=4))
    message = re.search(r"'exception_message': '([^']*)'", str(error.value)).group(1)
    assert "the only step lands on sigma = 0" in message and "use at least 2 steps" in message, message
    assert "min_sigma" not in message and "widen the window" not in message, message


def test_steering_window_and_bad_inputs_give_clear_errors(executor):
    demon = harness.pack_submodule("samplers.demon")
    sig = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.0])
    assert demon.steering_steps(sig, min_sigma=1.0) == [True, True, True, False]
    # the final jump to sigma = 0 adds no noise, so it is never steered
    assert demon.steering_steps(sig, start=0.5, end=1.0) == [False, False, True, False]
    with pytest.raises(RuntimeError, match="selects no step"):
        executor.run(ksampler_demon_prompt("eps", batch=1, min_sigma=9000.0))
    with pytest.raises(ValueError, match="invalid prompt"):   # K < 1 is refused by ComfyUI's own validation
        executor.run(ksampler_demon_prompt("eps", batch=1, k=0))
    mismatched = ksampler_demon_prompt("eps", batch=1)
    mismatched["7"] = {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": "x"}}
    mismatched["3"]["inputs"]["vae"] = ["7", 1]
    with pytest.raises(RuntimeError, match=r"VAE \(TAESD\) decodes 4-channel image latents.*makes 3-channel"):
        executor.run(mismatched)
    # the queue goes on
    run_scores(executor, ksampler_demon_prompt("eps", batch=1, k=2))


def test_nan_rewards_warn_and_fall_back_to_equal_weights(caplog):
    scoring = harness.pack_submodule("samplers.scoring")
    scores = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    clean, ok = scoring.finite_or_flat(scores, "test reward")
    assert ok.tolist() == [True, False] and torch.isfinite(clean).all()
    assert any("NaN" in r.getMessage() for r in caplog.records)


def test_wrong_shape_reward_is_named():
    rewards = harness.pack_submodule("rewards")

    class Broken(rewards.Reward):
        name = "broken reward"

        def score(self, images, prompts, context=None):
            return torch.zeros(images.shape[0], 2)

    with pytest.raises(RuntimeError, match="broken reward returned scores of shape"):
        Broken()(torch.zeros(3, 4, 4, 3))


def test_interrupt_stops_the_run_and_the_queue_continues(executor):
    import comfy.model_management
    rewards = harness.pack_submodule("rewards")
    calls = {"n": 0}
    original = rewards.LinearColorReward.score

    def interrupting(self, images, prompts=None, context=None):
        calls["n"] += 1
        if calls["n"] == 3:
            comfy.model_management.interrupt_current_processing(True)
        return original(self, images, prompts, context)

    rewards.LinearColorReward.score = interrupting
    try:
        with pytest.raises(RuntimeError, match="execution failed|interrupt"):
            executor.run(ksampler_demon_prompt("eps", batch=2, k=4, steps=20))
    finally:
        rewards.LinearColorReward.score = original
    assert any(m[0] == "execution_interrupted" for m in executor.executor.status_messages)
    assert calls["n"] < 19          # it stopped early, not at the end
    run_scores(executor, ksampler_demon_prompt("eps", batch=1, k=2))   # and the next prompt runs


def test_inpainting_mask_and_img2img_with_batch_of_two(executor):
    """denoise < 1 from an encoded image, with a noise mask on the left half and B = 2 (the inpainting wrapper's
    batch-B latent and mask are tiled to K*B): the unmasked half comes back exactly as it went in."""
    prompt = {
        **harness.masked_img2img_graph("eps"),
        "8": {"class_type": "RewardSteerColorReward", "inputs": dict(RED)},
        "9": {"class_type": "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["7", 0],
                         "seed": 2, "steps": 12, "cfg": 1.0, "scheduler": "normal", "denoise": 0.6,
                         "reward": ["8", 0], "vae": ["1", 1], **demon_inputs(k=4)}},
    }
    out = executor.run(prompt, want=("3", "9"))
    original, result = out["3"][0][0]["samples"], out["9"][0][0]["samples"]
    assert result.shape == (2, 3, 8, 8)
    assert torch.allclose(result[..., 4:], original[..., 4:], atol=1e-5)   # outside the mask: untouched
    assert (result[..., :4] - original[..., :4]).abs().max() > 0.05         # inside: resampled


def test_step_statistics_are_shown_on_the_node(executor):
    run_scores(executor, ksampler_demon_prompt("eps", batch=1, k=2, steps=5))
    texts = [m[1] for m in executor.messages if isinstance(m[1], (bytes, bytearray))]
    decoded = [t.decode("utf-8", errors="replace") for t in texts]
    assert any("candidates' mean" in t for t in decoded)
    assert any("model calls" in t for t in decoded)
    # the progress bar reached the end (ComfyUI throttles updates since v0.9.2, so their count means nothing)
    assert executor.progress and executor.progress[-1][:2] == (5, 5), executor.progress


def test_nan_rewards_do_not_lose_the_run(executor, caplog):
    """A reward that returns NaN for every candidate: the run completes with finite latents (equal weights)."""
    rewards = harness.pack_submodule("rewards")
    original = rewards.LinearColorReward.score
    rewards.LinearColorReward.score = lambda self, images, prompts=None, context=None: torch.full((images.shape[0],), float("nan"))
    try:
        with caplog.at_level("WARNING"):
            out = executor.run(ksampler_demon_prompt("flow", batch=2, k=3, steps=6), want=("3",))
    finally:
        rewards.LinearColorReward.score = original
    assert torch.isfinite(out["3"][0][0]["samples"]).all()
    assert any("NaN/inf rewards" in r.getMessage() for r in caplog.records)


def test_latent_rgb_decoder_is_the_preview_projection():
    cm = harness.pack_submodule("reference.comfy_model")
    scoring = harness.pack_submodule("samplers.scoring")
    spec = cm.ReferenceSpec()
    base = cm.build_reference_model(spec).model
    z = spec.mixture(4, 4).means[:3].clone()           # pictures: inside [-1, 1], so the clamp does nothing
    fast = scoring.latent_rgb_decode(base, z)
    exact = cm.latent_to_image(z)
    assert fast.shape == (3, 4, 4, 3)
    assert torch.allclose(fast, exact[:, ::8, ::8, :], atol=1e-6)   # the reference model's preview is exact
    import comfy.latent_formats

    class NoFactors:
        latent_format = comfy.latent_formats.LatentFormat()

    with pytest.raises(ValueError, match="use decoder 'vae'"):
        scoring.latent_rgb_decode(NoFactors, z)


def test_demon_runs_with_the_latent_rgb_decoder(executor):
    scores, out = run_scores(executor, ksampler_demon_prompt("eps", batch=4, k=8, decoder="latent_rgb"))
    plain, _ = run_scores(executor, ksampler_demon_prompt("eps", batch=4, k=1, decoder="latent_rgb"))
    assert json.loads(out["3"][1][0])["decodes_per_image"] == 8 * 19
    assert scores.mean() > plain.mean() + 0.05
