"""Weight-free rewards give hand-computed values, validate their input, and declare what they are."""
from __future__ import annotations

import json
import math

import pytest
import torch

import harness


@pytest.fixture(scope="module")
def rw():
    return harness.pack_submodule("rewards")


def solid(rgb, h=4, w=6, batch=1):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 1, 1, 3).expand(batch, h, w, 3).clone()


def test_colour_reward_channel_weights_hand_computed(rw):
    reward = rw.LinearColorReward((1.0, 2.0, 3.0), bias=0.5)
    img = torch.cat([solid((0.2, 0.4, 0.6)), solid((1.0, 0.0, 0.0))])
    assert torch.allclose(reward(img), torch.tensor([0.2 + 0.8 + 1.8 + 0.5, 1.5]), atol=1e-6)
    # half red, half black: the mean colour is (0.5, 0, 0)
    half = torch.zeros(1, 2, 2, 3)
    half[0, 0, :, 0] = 1.0
    assert abs(float(reward(half)) - (0.5 + 0.5)) < 1e-6
    assert reward.linear and reward.differentiable and not reward.needs_prompt


def test_colour_reward_toward_colour_hand_computed(rw):
    reward = rw.LinearColorReward.toward((1.0, 0.0, 0.0))
    u = torch.tensor([0.5, -0.5, -0.5]) / math.sqrt(0.75)
    for rgb in [(0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.2, 0.9, 0.3)]:
        expected = float((torch.tensor(rgb) - 0.5) @ u)
        assert abs(float(reward(solid(rgb))) - expected) < 1e-6
    assert abs(float(reward(solid((1.0, 0.0, 0.0)))) - math.sqrt(0.75)) < 1e-6
    with pytest.raises(ValueError, match="grey"):
        rw.LinearColorReward.toward((0.5, 0.5, 0.5))


def test_similarity_neg_mse_and_cosine_hand_computed(rw):
    ref = solid((0.5, 0.5, 1.0))
    img = torch.cat([solid((0.5, 0.5, 1.0)), solid((0.0, 0.5, 1.0))])
    mse = rw.ImageSimilarityReward(ref, "neg_mse")(img)
    assert torch.allclose(mse, torch.tensor([0.0, -0.25 / 3]), atol=1e-7)
    cos = rw.ImageSimilarityReward(ref, "cosine")(img)
    # centred: ref -> (0, 0, .5); img2 -> (-.5, 0, .5): cos = .25 / (.5 * sqrt(.5))
    assert torch.allclose(cos, torch.tensor([1.0, 0.25 / (0.5 * math.sqrt(0.5))]), atol=1e-6)


def test_similarity_resizes_reference_and_pairs_batches(rw):
    ref = solid((0.1, 0.2, 0.3), h=2, w=2)
    img = solid((0.1, 0.2, 0.3), h=16, w=8, batch=3)
    assert torch.allclose(rw.ImageSimilarityReward(ref)(img), torch.zeros(3), atol=1e-7)
    pair = rw.ImageSimilarityReward(torch.cat([solid((0, 0, 0)), solid((1, 1, 1))]))
    out = pair(torch.cat([solid((0, 0, 0)), solid((0, 0, 0))]))
    assert torch.allclose(out, torch.tensor([0.0, -1.0]))
    with pytest.raises(rw.RewardInputError, match="2 reference images for 3 images"):
        pair(img)


def test_bad_images_get_clear_errors_and_alpha_is_dropped(rw):
    reward = rw.LinearColorReward((1.0, 1.0, 1.0))
    rgba = torch.cat([solid((0.2, 0.2, 0.2)), torch.zeros(1, 4, 6, 1)], dim=-1)
    assert abs(float(reward(rgba)) - 0.6) < 1e-6
    grey = torch.full((1, 4, 4, 1), 0.5)
    assert abs(float(reward(grey)) - 1.5) < 1e-6
    with pytest.raises(rw.RewardInputError, match="empty"):
        reward(torch.zeros(0, 4, 4, 3))
    with pytest.raises(rw.RewardInputError, match=r"\[B, H, W, C\]"):
        reward(torch.zeros(4, 4))
    with pytest.raises(rw.RewardInputError, match="channels"):
        reward(torch.zeros(1, 4, 4, 5))


def test_differentiable_rewards_pass_gradients(rw):
    for reward in [rw.LinearColorReward((1.0, -1.0, 0.0)), rw.ImageSimilarityReward(solid((0.3, 0.3, 0.3)))]:
        assert reward.differentiable
        img = torch.rand(2, 4, 4, 3, requires_grad=True)
        reward(img).sum().backward()
        assert img.grad is not None and img.grad.abs().sum() > 0


def test_prompt_needing_reward_refuses_missing_prompt(rw):
    class NeedsPrompt(rw.Reward):
        name = "needs-prompt"
        needs_prompt = True

        def score(self, images, prompts, context=None):
            return torch.tensor([float(len(p)) for p in prompts])

    r = NeedsPrompt()
    with pytest.raises(rw.RewardInputError, match="needs a prompt"):
        r(torch.zeros(2, 2, 2, 3))
    assert r(torch.zeros(2, 2, 2, 3), ["ab"]).tolist() == [2.0, 2.0]   # one prompt serves the batch
    with pytest.raises(rw.RewardInputError, match="3 prompts for 2 images"):
        r(torch.zeros(2, 2, 2, 3), ["a", "b", "c"])


def test_score_node_through_executor(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "channel weights", "red": 2.0, "green": 1.0, "blue": 1.0, "bias": -0.5}},
        "3": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["1", 0], "reward": ["2", 0]}},
    }
    executor.run(prompt)
    ui = executor.history["outputs"]["3"]
    assert ui["scores"] == pytest.approx([1.5, 1.5], abs=1e-6)
    assert "mean 1.5000" in ui["text"][0]


def test_bad_widget_value_is_a_readable_error_not_a_lost_queue(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "toward colour", "red": 2.0, "green": 0.0, "blue": 0.0, "bias": 0.0}},
        "3": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["1", 0], "reward": ["2", 0]}},
    }
    with pytest.raises(RuntimeError, match="colour component in 0..1"):
        executor.run(prompt)
    # the executor is still usable afterwards
    prompt["2"]["inputs"]["red"] = 1.0
    executor.run(prompt)


def test_composition_and_normalisation_maths_exact(rw):
    comp = harness.pack_submodule("rewards.composite")
    s = torch.tensor([1.0, 3.0, 3.0, 7.0])
    assert torch.allclose(comp.normalise(s, "zscore"), (s - 3.5) / s.std(unbiased=False))
    assert torch.allclose(comp.normalise(s, "rank"), torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert torch.equal(comp.normalise(torch.full((3,), 2.0), "zscore"), torch.zeros(3))
    red = rw.LinearColorReward((1.0, 0.0, 0.0))
    blue = rw.LinearColorReward((0.0, 0.0, 10.0))
    images = torch.cat([solid((0.2, 0.0, 0.1)), solid((0.4, 0.0, 0.5)), solid((0.9, 0.0, 0.3))])
    r, b = red(images), blue(images)
    raw = rw.CompositeReward([(red, 2.0), (blue, -1.0)], "none")
    assert torch.allclose(raw(images), 2 * r - b) and raw.linear and raw.differentiable
    z = rw.CompositeReward([(red, 2.0), (blue, -1.0)], "zscore")
    assert torch.allclose(z(images), 2 * comp.normalise(r, "zscore") - comp.normalise(b, "zscore"), atol=1e-6)
    assert not z.linear and z.differentiable
    ranked = rw.CompositeReward([(red, 1.0), (blue, 1.0)], "rank")
    assert torch.allclose(ranked(images), torch.tensor([0.0, 0.5 + 1.0, 1.0 + 0.5]))
    assert not ranked.differentiable
    with pytest.raises(ValueError, match="at least one reward"):
        rw.CompositeReward([], "none")


def test_normalisation_is_within_each_group_of_candidates(rw):
    """A sampler scores K candidates for B items in one call: z-score and rank compare only an item's own
    candidates, so one item's high scores cannot drown another's."""
    red = rw.LinearColorReward((1.0, 0.0, 0.0))
    values = [0.1, 0.8, 0.3, 0.9, 0.2, 0.85]          # candidate-major: item 0 gets 0.1, 0.3, 0.2; item 1 the rest
    images = torch.cat([solid((v, 0.0, 0.0)) for v in values])
    context = rw.ScoringContext(groups=(0, 1, 0, 1, 0, 1), step=3, steps=10)
    ranked = rw.CompositeReward([(red, 1.0)], "rank")(images, None, context)
    assert torch.allclose(ranked, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5]))
    z = rw.CompositeReward([(red, 1.0)], "zscore")(images, None, context)
    for group in ([0, 2, 4], [1, 3, 5]):
        assert abs(float(z[group].mean())) < 1e-6 and abs(float(z[group].std(unbiased=False)) - 1) < 1e-5
    with pytest.raises(rw.RewardInputError, match="groups for 2 images"):
        rw.CompositeReward([(red, 1.0)], "rank")(images, None, rw.ScoringContext(groups=(0, 1)))


def test_combine_node_through_executor(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "channel weights", "red": 1.0, "green": 0.0, "blue": 0.0, "bias": 0.0}},
        "3": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "channel weights", "red": 0.0, "green": 0.0, "blue": 1.0, "bias": 0.5}},
        "4": {"class_type": "RewardSteerCombineRewards",
              "inputs": {"normalisation": "none", "reward_1": ["2", 0], "weight_1": 3.0, "reward_2": ["3", 0],
                         "weight_2": -2.0}},
        "5": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["1", 0], "reward": ["4", 0]}},
    }
    executor.run(prompt)
    assert executor.history["outputs"]["5"]["scores"] == pytest.approx([3.0 * 1.0 - 2.0 * 0.5], abs=1e-6)


def test_score_node_sorts_and_keeps_the_top(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x330000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x990000}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["3", 0]}},
        "6": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "channel weights", "red": 1.0, "green": 0.0, "blue": 0.0, "bias": 0.0}},
        "7": {"class_type": "RewardSteerScoreImages",
              "inputs": {"images": ["5", 0], "reward": ["6", 0], "prompt": "", "order": "best first",
                         "keep_top": 2}},
    }
    out = executor.run(prompt)
    result = json.loads(out["7"][0][0])
    assert result["kept_indices"] == [1, 2]
    kept = out["7"][2][0]
    assert kept.shape[0] == 2 and float(kept[0, 0, 0, 0]) == pytest.approx(1.0) and \
        float(kept[1, 0, 0, 0]) == pytest.approx(0x99 / 255, abs=1e-3)
    assert out["7"][3] == pytest.approx([1.0, 0x99 / 255], abs=1e-3)
