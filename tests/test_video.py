"""Video latents on tiny Wan 2.1 (ComfyUI's real Wan DiT and causal Wan VAE at tiny size, random weights): one score
per clip, candidates grouped per batch item, decoding a few clips at a time, the latent-RGB decoder on 5-D
latents, Demon / SMC / Best-of-N through ComfyUI's executor, steering that raises a video reward, and the refusals
(a reward that cannot score video, a VAE of another latent layout).

Clips are 64x64 px, 5 frames (2 latent frames: the first latent frame decodes to 1 frame, each later one to 4)."""
from __future__ import annotations

import json

import pytest
import torch

import harness

WIDTH = HEIGHT = 64
FRAMES = 5                 # pixel frames; Wan's VAE: 1 + 4 * (latent frames - 1)
LATENT_FRAMES = 2


def modules():
    return (harness.pack_submodule("samplers.scoring"), harness.pack_submodule("rewards.base"),
            harness.pack_submodule("rewards"), harness.pack_submodule("reference.tiny_families"))


@pytest.fixture(scope="module")
def wan():
    """(MODEL, CLIP, VAE) of tiny Wan 2.1, built as the pack's tiny family node builds it."""
    return modules()[3].build_family("wan21", 0)


class _Sampled:
    """What a sampler function receives as `model`, as far as the scorer looks (the BaseModel behind it)."""

    def __init__(self, patcher):
        self.inner_model = type("Guider", (), {"inner_model": patcher.model})()


class RecordingReward:
    """Mixin: keeps every (number of images, context) a reward is called with."""

    def score(self, images, prompts=None, context=None):
        self.calls.append((images.shape[0], context))
        return super().score(images, prompts, context)


def red_reward():
    return modules()[2].LinearColorReward.toward((0.9, 0.2, 0.2))


def recording(reward_cls, *args, **kwargs):
    cls = type("Recording" + reward_cls.__name__, (RecordingReward, reward_cls), {})
    reward = cls(*args, **kwargs)
    reward.calls = []
    return reward


def wan_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 16, LATENT_FRAMES, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))


def ComputeCounter(batch):
    return harness.pack_submodule("samplers.model_calls").ComputeCounter(batch=batch)


def frames_of(vae, base_model, x0) -> torch.Tensor:
    """Every clip decoded in one core VAE.decode call: [n, F, H, W, 3]."""
    return vae.decode(base_model.process_latent_out(x0))


# ------------------------------------------------------------------------------------------------ scoring

def test_an_image_reward_scores_each_clip_by_the_mean_of_its_frames_grouped_per_item(wan):
    scoring, base, rewards, _ = modules()
    model, _, vae = wan
    k, batch = 3, 2
    x0 = wan_latents(k * batch)
    reward = recording(rewards.LinearColorReward, (1.0, 0.0, 0.0))
    scores = scoring.make_latent_scorer(vae, reward)(_Sampled(model), x0, batch, ComputeCounter(batch), step=(1, 4))
    clips = frames_of(vae, model.model, x0)
    assert clips.shape == (k * batch, FRAMES, HEIGHT, WIDTH, 3)
    expected = clips[..., 0].mean(dim=(2, 3)).mean(dim=1)          # red channel: mean per frame, then per clip
    assert scores.shape == (k * batch,)
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)
    # the frames reach the reward as images, each with the batch item of its clip (candidate-major: j % batch)
    images = sum(n for n, _ in reward.calls)
    groups = tuple(g for _, context in reward.calls for g in context.groups)
    assert images == k * batch * FRAMES
    assert groups == tuple(j % batch for j in range(k * batch) for _ in range(FRAMES))
    assert all(context.step == 1 and context.steps == 4 and context.clip_frames is None for _, context in reward.calls)


def test_candidate_comparisons_stay_within_a_batch_item_for_video(wan):
    """z-score in Combine Rewards compares the candidates of one item only: shifting every clip of item 1 by a
    constant leaves item 0's scores unchanged, and each item's scores have mean 0."""
    scoring, base, rewards, _ = modules()
    model, _, vae = wan
    k, batch = 3, 2
    x0 = wan_latents(k * batch, seed=1)
    combined = rewards.CompositeReward([(red_reward(), 1.0)], "zscore")
    assert combined.compares_candidates
    scores = scoring.make_latent_scorer(vae, combined, decoder="latent_rgb")(_Sampled(model), x0, batch,
                                                                              ComputeCounter(batch))
    table = scores.reshape(k, batch)
    assert torch.allclose(table.mean(dim=0), torch.zeros(batch), atol=1e-5)
    shifted = x0.clone()
    shifted[1::batch] += 0.5                                         # item 1's candidates only
    again = scoring.make_latent_scorer(vae, combined, decoder="latent_rgb")(_Sampled(model), shifted, batch,
                                                                             ComputeCounter(batch)).reshape(k, batch)
    assert torch.allclose(again[:, 0], table[:, 0], atol=1e-6)


def test_a_clip_reward_gets_whole_clips_and_returns_one_score_each(wan):
    scoring, base, rewards, _ = modules()
    model, _, vae = wan

    class LastFrameRed(base.Reward):
        """Scores a clip by its last frame's red: only a reward that sees whole clips can."""
        name = "last frame red"
        video = "clip"

        def __init__(self):
            self.contexts = []

        def score(self, images, prompts=None, context=base.NO_CONTEXT):
            self.contexts.append(context)
            clips = images.reshape(-1, context.clip_frames, *images.shape[1:])
            return clips[:, -1, ..., 0].mean(dim=(1, 2))

    reward = LastFrameRed()
    batch, k = 2, 2
    x0 = wan_latents(k * batch, seed=2)
    scores = scoring.make_latent_scorer(vae, reward)(_Sampled(model), x0, batch, ComputeCounter(batch))
    clips = frames_of(vae, model.model, x0)
    assert torch.allclose(scores, clips[:, -1, ..., 0].mean(dim=(1, 2)), atol=1e-5)
    assert all(c.clip_frames == FRAMES for c in reward.contexts)
    groups = tuple(g for c in reward.contexts for g in c.groups)
    assert groups == tuple(j % batch for j in range(k * batch) for _ in range(FRAMES))   # per frame, its item


class CountingVAE:
    """The tiny Wan VAE, recording how many clips each decode call gets."""

    def __init__(self, vae):
        self.vae, self.calls = vae, []

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def decode(self, latents):
        self.calls.append(latents.shape[0])
        return self.vae.decode(latents)


def test_clips_are_decoded_a_few_at_a_time_and_score_as_decoded_all_at_once(wan):
    """chunk_bytes of decoded frames bounds the clips per VAE call (here one clip); the scores equal those of one
    decode of every clip (stated tolerance 1e-5: batched convolutions round differently).  A reward that compares
    candidates gets the K clips of one item per call."""
    scoring, _, rewards, _ = modules()
    model, _, vae = wan
    k, batch = 3, 2
    x0 = wan_latents(k * batch, seed=3)
    clips = frames_of(vae, model.model, x0)
    one_clip = clips[0].numel() * clips.element_size()
    whole = red_reward()(clips.reshape(-1, HEIGHT, WIDTH, 3)).reshape(k * batch, FRAMES).mean(dim=1)
    for chunk_bytes, expected_calls in ((one_clip, [1] * 6), (2 * one_clip, [1, 2, 2, 1]), (10 ** 12, [1, 5])):
        counting = CountingVAE(vae)
        scores = scoring.make_latent_scorer(counting, red_reward(), chunk_bytes=chunk_bytes)(
            _Sampled(model), x0, batch, ComputeCounter(batch))
        assert counting.calls == expected_calls
        assert torch.allclose(scores, whole, atol=1e-5), (scores - whole).abs().max()
    counting = CountingVAE(vae)
    combined = rewards.CompositeReward([(red_reward(), 1.0)], "rank")
    scoring.make_latent_scorer(counting, combined, chunk_bytes=one_clip)(_Sampled(model), x0, batch,
                                                                         ComputeCounter(batch))
    assert counting.calls == [k] * batch


def test_the_latent_rgb_decoder_keeps_every_frame_of_video_latents_as_core_previews_them(wan):
    """[n, 16, T, h, w] -> [n, T, h, w, 3] with Wan's latent_rgb_factors; each frame is core's Latent2RGBPreviewer
    image of that frame (which previews item 0, frame 0), to one 8-bit level."""
    scoring = modules()[0]
    import latent_preview
    import numpy as np
    model = wan[0].model
    fmt = model.latent_format
    x0 = 0.5 * wan_latents(3, seed=4)
    ours = scoring.latent_rgb_decode(model, x0)
    assert ours.shape == (3, LATENT_FRAMES, HEIGHT // 8, WIDTH // 8, 3)
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    for item in range(3):
        for frame in range(LATENT_FRAMES):
            core = np.asarray(previewer.decode_latent_to_preview(x0[item:item + 1, :, frame:frame + 1]))
            assert np.abs(ours[item, frame].numpy() * 255 - core).max() <= 1.0


# ------------------------------------------------------------------------------------------ through ComfyUI

def wan_graph(batch: int = 2, seed: int = 3, steps: int = 4) -> dict:
    """Tiny Wan (node "1": MODEL, CLIP, VAE), prompt "2" / negative "3", a core empty video latent "4" of 5 frames
    at 64x64, the colour reward "toward red" "5"."""
    return {
        "1": {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": "wan21", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red apple"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": batch}},
        "5": harness.red_reward_node(),
    }


def ksampler_inputs(seed=3, steps=4, cfg=1.0) -> dict:
    return {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "scheduler": "simple", "positive": ["2", 0],
            "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}


def demon_node(k: int, beta: float = 0.5, vae=("1", 2), reward=("5", 0), decoder: str = "vae", **ks) -> dict:
    return {"class_type": "RewardSteerKSamplerDemon",
            "inputs": {**ksampler_inputs(**ks), "reward": list(reward), "vae": list(vae), "k": k, "beta": beta,
                       "weighting": "tanh", "tau": 0.0, "estimator": "tweedie", "max_rollout_steps": 20,
                       "min_sigma": 0.0, "start": 0.0, "end": 1.0, "chunk_items": 0, "budget": 0,
                       "decoder": decoder}}


def smc_node(particles: int, lam: float, **ks) -> dict:
    return {"class_type": "RewardSteerKSamplerSMC",
            "inputs": {**ksampler_inputs(**ks), "reward": ["5", 0], "vae": ["1", 2], "particles": particles,
                       "lam": lam, "potential": "difference", "tempering": "none", "gamma": 0.008,
                       "resampling": "systematic", "ess_threshold": 0.5, "reward_start": 0, "reward_end": -1,
                       "reward_interval": 1, "eta": 1.0, "gradient_guidance": False, "output": "weighted_draw",
                       "chunk_items": 0, "decoder": "vae"}}


def decoded(node: str) -> dict:
    return {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["1", 2]}}


def test_demon_smc_and_best_of_n_on_tiny_wan_give_finite_clips_of_the_right_size(executor):
    batch = 2
    graph = wan_graph(batch)
    graph.update({
        "10": demon_node(k=3), "11": decoded("10"),
        "12": smc_node(particles=3, lam=50.0), "13": decoded("12"),
        "14": {"class_type": "RewardSteerBestOfN",
               "inputs": {**ksampler_inputs(), "sampler_name": "euler", "reward": ["5", 0], "vae": ["1", 2],
                          "n": 3}},
        "15": decoded("14"),
    })
    out = executor.run(graph, want=("10", "11", "12", "13", "14", "15"))
    for latent_node, image_node in (("10", "11"), ("12", "13"), ("14", "15")):
        latent = out[latent_node][0][0]["samples"]
        assert latent.shape == (batch, 16, LATENT_FRAMES, HEIGHT // 8, WIDTH // 8), latent_node
        images = out[image_node][0][0]
        assert images.shape == (batch * FRAMES, HEIGHT, WIDTH, 3), image_node   # core VAEDecode: frames in batch
        assert torch.isfinite(latent).all() and torch.isfinite(images).all()
    demon = json.loads(out["10"][1][0])
    assert demon["k"] == 3 and demon["steered_steps"] == 3    # the last step (to sigma 0) is not steered
    assert [len(t["reward_mean"]) for t in demon["trace"] if t["steered"]] == [batch] * 3
    assert demon["decodes_per_image"] == 3 * 3                 # one decode per candidate clip
    smc = json.loads(out["12"][1][0])
    assert all(len(t["ess"]) == batch and all(0 < e <= 3 + 1e-9 for e in t["ess"]) for t in smc["trace"])
    best = json.loads(out["14"][2][0])
    assert len(best["scores"]) == batch and all(len(row) == 3 for row in best["scores"])
    assert best["best"] == [max(row) for row in best["scores"]]


def test_demon_with_one_candidate_is_core_euler_on_tiny_wan(executor):
    """K = 1: ComfyUI's Euler on a flow video model, same seed; stated tolerance 1e-5 (float32 rounding)."""
    graph = wan_graph(batch=2)
    graph["10"] = demon_node(k=1)
    graph["11"] = {"class_type": "KSampler", "inputs": {**ksampler_inputs(), "sampler_name": "euler"}}
    out = executor.run(graph, want=("10", "11"))
    demon, euler = out["10"][0][0]["samples"], out["11"][0][0]["samples"]
    assert demon.shape == (2, 16, LATENT_FRAMES, HEIGHT // 8, WIDTH // 8)
    assert torch.allclose(demon, euler, atol=1e-5), (demon - euler).abs().max()


def clip_rewards(out, node: str, batch: int) -> torch.Tensor:
    """The colour reward of each clip VAEDecode gave: the mean of its frames' rewards."""
    images = out[node][0][0]
    return red_reward()(images).reshape(batch, FRAMES).mean(dim=1)


def latent_rgb_clip_rewards(out, node: str) -> torch.Tensor:
    """The colour reward of each clip of a LATENT, decoded by the latent-RGB decoder: the mean over its frames."""
    scoring, _, _, families = modules()
    latents = out[node][0][0]["samples"]
    frames = scoring.latent_rgb_decode(families.build_family_model("wan21", 0).model, latents)
    return red_reward()(frames.reshape(-1, *frames.shape[-3:])).reshape(latents.shape[0], -1).mean(dim=1)


def paired_gain(steered: torch.Tensor, plain: torch.Tensor, what: str) -> tuple[float, float]:
    """Mean and standard error of the per-item differences."""
    gain = steered - plain
    mean, se = float(gain.mean()), float(gain.std(unbiased=True)) / gain.numel() ** 0.5
    print(f"{what}: plain {float(plain.mean()):.4f}, gain {mean:.4f} +- {se:.4f} (SE over {gain.numel()} items); "
          f"per item {[round(float(g), 4) for g in gain]}")
    return mean, se


def test_demon_raises_a_video_reward_over_plain_sampling(executor):
    """Paired over 8 batch items (8 initial noises, each item steered on its own): Demon (K = 8, beta 0.5,
    candidates decoded by tiny Wan's VAE) against core Euler from the same noise, 4 steps, on the colour reward
    "toward red" as the mean over each clip's frames.  Asserted: the mean gain exceeds 3 standard errors of the
    paired differences and 0.005."""
    batch = 8
    graph = wan_graph(batch)
    graph.update({"10": {"class_type": "KSampler", "inputs": {**ksampler_inputs(), "sampler_name": "euler"}},
                  "11": decoded("10"), "12": demon_node(k=8), "13": decoded("12")})
    out = executor.run(graph, want=("11", "13"))
    mean, se = paired_gain(clip_rewards(out, "13", batch), clip_rewards(out, "11", batch), "Demon K=8")
    assert mean > max(3 * se, 0.005)


def test_smc_raises_a_video_reward_over_the_same_sampler_unsteered(executor):
    """Paired over 16 batch items: SMC (8 particles, lambda 300, 8 steps, candidates decoded by the latent-RGB
    decoder) against the same SMC with lambda 0 (no reweighting, no resampling: plain ancestral sampling from the
    same initial noise), on the colour reward of the latent-RGB clips, mean over frames.  Asserted: the mean gain
    exceeds 3 standard errors and 0.01.  (16 items: over 8 items the gain was 2.1 to 5.2 SE across three random
    models, its spread over items being about 0.7 of its mean.)"""
    batch, steps = 16, 8
    graph = wan_graph(batch)
    for node, lam in (("10", 0.0), ("12", 300.0)):
        graph[node] = smc_node(particles=8, lam=lam, steps=steps)
        graph[node]["inputs"]["decoder"] = "latent_rgb"
    out = executor.run(graph, want=("10", "12"))
    mean, se = paired_gain(latent_rgb_clip_rewards(out, "12"), latent_rgb_clip_rewards(out, "10"), "SMC N=8")
    assert mean > max(3 * se, 0.01)


# ------------------------------------------------------------------------------------------------ refusals

def test_a_reward_that_cannot_score_video_is_refused_before_sampling_naming_it_and_the_latent(executor):
    graph = wan_graph(batch=1)
    graph["6"] = {"class_type": "RewardSteerManualPickReward",
                  "inputs": {"question": "which clip?", "mode": "pick", "ask_every": 1, "timeout": 1,
                             "on_timeout": "abort"}}
    graph["10"] = demon_node(k=2, reward=("6", 0))
    with pytest.raises(RuntimeError) as error:
        executor.run(graph, want=("10",))
    message = str(error.value)
    assert "manual pick" in message and "cannot score video" in message
    assert "(1, 16, 2, 8, 8)" in message
    assert not [p for p in executor.progress if p[1] == 4], "refused after sampling started"


@pytest.mark.parametrize("model_family, vae_family, says", [
    ("wan21", "sd3", ("TAESD", "16-channel image latents", "WAN21", "16-channel video latents", "(1, 16, 2, 8, 8)")),
    ("sd3", "wan21", ("WanVAE", "16-channel video latents", "SD3", "16-channel image latents", "(1, 16, 8, 8)")),
])
@pytest.mark.parametrize("sampler", ["demon", "best_of_n"])
def test_a_vae_of_another_latent_layout_is_refused_before_sampling_naming_both(executor, model_family, vae_family,
                                                                                says, sampler):
    """Same channels (16), but one has a time axis: a 16-channel image TAESD on Wan, Wan's VAE on SD3."""
    graph = wan_graph(batch=1)
    graph["1"]["inputs"]["family"] = model_family
    if model_family != "wan21":
        graph["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT,
                                                                      "batch_size": 1}}
    graph["6"] = {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": vae_family, "seed": 0}}
    if sampler == "demon":
        graph["10"] = demon_node(k=2, vae=("6", 2))
    else:
        graph["10"] = {"class_type": "RewardSteerBestOfN",
                       "inputs": {**ksampler_inputs(), "sampler_name": "euler", "reward": ["5", 0],
                                  "vae": ["6", 2], "n": 2}}
    with pytest.raises(RuntimeError) as error:
        executor.run(graph, want=("10",))
    message = str(error.value)
    assert all(part in message for part in says), message
    assert "connect the VAE that belongs to the model" in message
    assert not [p for p in executor.progress if p[1] == 4], "refused after sampling started"
