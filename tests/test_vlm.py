"""VLM-API reward against a scripted OpenAI-compatible server on 127.0.0.1 (started here): request shape, the modes,
failures under each policy, the cache, the key never leaking (through a real ComfyUI server), Demon end to end."""
from __future__ import annotations

import copy
import json
import math
import random
import re
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness

vlm = harness.pack_submodule("rewards.vlm")
vlm_client = harness.pack_submodule("rewards.vlm_client")
base = harness.pack_submodule("rewards.base")

from scripted_vlm import (  # noqa: E402,F401  (re-exported: other tests import them from here)
    RED, _DIR, ScriptedVLM, completion, decode_data_url, grid_cells, images_of, red_judge, redness, text_of)


@pytest.fixture(scope="module")
def vlm_server():
    srv = ScriptedVLM()
    yield srv
    srv.close()


@pytest.fixture
def scripted(vlm_server):
    vlm_server.reset()
    yield vlm_server
    vlm_server.reset()


class FakeSleep:
    """Records the waits instead of sleeping (retry timing is checked exactly and the tests stay fast)."""

    def __init__(self):
        self.waits: list[float] = []

    def __call__(self, seconds, stop):
        self.waits.append(seconds)


def make_reward(server, tmp_path=None, fallback=None, sleep=None, **over):
    options = dict(base_url=server.url, model="scripted-vl", mode="rubric", rubric="How red is it?",
                   api_key_env="", key_file=None, cache_dir=None, max_retries=2, timeout=5.0, deadline=60.0,
                   backoff_base=0.01, backoff_cap=0.05)
    options.update(over)
    return vlm.VLMReward(vlm.VLMConfig(**options), fallback=fallback, sleep=sleep or FakeSleep())


def solid(colours, size=32) -> torch.Tensor:
    return torch.stack([torch.tensor(c, dtype=torch.float32).expand(size, size, 3) for c in colours])


def expected_rubric(colour) -> float:
    """The red judge's rubric reward for a solid colour."""
    pil = Image.new("RGB", (8, 8), tuple(round(c * 255) for c in colour))
    return round(10 * min(max(0.5 + redness(pil), 0.0), 1.0), 3) / 10


# eight colours from bluish to red; redness increases with the index
SHADES = [(0.1 + 0.1 * i, 0.3, 0.8 - 0.09 * i) for i in range(8)]


# ---- the request -------------------------------------------------------------------------------------------------

def test_request_carries_auth_model_data_url_images_and_rubric(scripted, monkeypatch):
    key = "sk-test-" + uuid.uuid4().hex
    monkeypatch.setenv("RS_VLM_TEST_KEY", key)
    reward = make_reward(scripted, api_key_env="RS_VLM_TEST_KEY", rubric="Judge the REDNESS-42 of {prompt}.",
                         image_size=24)
    scores = reward(solid([SHADES[7]], size=48), ["a red balloon"])
    assert len(scripted.requests) == 1
    req = scripted.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {key}"
    body = req["body"]
    assert body["model"] == "scripted-vl" and body["temperature"] == 0
    assert body["response_format"]["type"] == "json_schema"
    assert "Judge the REDNESS-42 of a red balloon." in text_of(body)
    (picture,) = images_of(body)
    assert picture.size == (24, 24)  # resized to image_size
    assert picture.getpixel((12, 12)) == tuple(round(c * 255) for c in SHADES[7])
    assert scores.tolist() == pytest.approx([expected_rubric(SHADES[7])], abs=1e-6)
    assert reward.counters.prompt_tokens == 100 and reward.counters.completion_tokens == 7


@pytest.mark.parametrize("pasted", ["sk-proj-abcdefghijklmnopqrstuvwxyz0123456789", "AIzaSyD-abcdefghijklmnop",
                                    "sk-or-v1-0123456789abcdef"])
def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it(scripted, pasted):
    with pytest.raises(base.RewardInputError, match="NAME of an environment variable") as info:
        make_reward(scripted, api_key_env=pasted)
    assert pasted not in str(info.value) and not scripted.requests
    make_reward(scripted, api_key_env="MY_OPENROUTER_KEY_2")  # a name is fine


def test_no_key_sends_no_authorization_header(scripted, monkeypatch):
    monkeypatch.delenv("RS_VLM_TEST_KEY", raising=False)
    make_reward(scripted, api_key_env="RS_VLM_TEST_KEY")(solid([SHADES[0]]))
    assert "Authorization" not in scripted.requests[0]["headers"]


def test_key_file_in_user_dir_by_base_url_host_or_star(scripted, tmp_path, monkeypatch):
    monkeypatch.delenv("RS_VLM_TEST_KEY", raising=False)
    host = scripted.url.split("//")[1].split("/")[0]
    path = tmp_path / "vlm_keys.json"
    for entry in (scripted.url, host, "*"):
        path.write_text(json.dumps({entry: "sk-from-file-" + entry[-5:], "https://other.example/v1": "nope"}))
        key, source = vlm_client.resolve_api_key("RS_VLM_TEST_KEY", scripted.url, str(path))
        assert key == "sk-from-file-" + entry[-5:] and str(path) in source and key not in source
    monkeypatch.setenv("RS_VLM_TEST_KEY", "sk-env-wins")
    assert vlm_client.resolve_api_key("RS_VLM_TEST_KEY", scripted.url, str(path))[0] == "sk-env-wins"
    path.write_text("{not json")
    monkeypatch.delenv("RS_VLM_TEST_KEY")
    with pytest.raises(vlm_client.VLMError, match="not valid JSON"):
        vlm_client.resolve_api_key("RS_VLM_TEST_KEY", scripted.url, str(path))


def test_structured_output_dropped_when_endpoint_rejects_it(scripted):
    scripted.reject_response_format = True
    reward = make_reward(scripted, concurrency=1)
    scores = reward(solid([SHADES[7], SHADES[0]]))
    bodies = [r["body"] for r in scripted.requests]
    assert "response_format" in bodies[0] and all("response_format" not in b for b in bodies[1:])
    assert len(bodies) == 3  # one rejected, then the two images in plain mode (remembered)
    assert scores[0] > scores[1]


def test_reasoning_models_get_max_completion_tokens_and_no_temperature(scripted):
    scripted.reasoning_model = True
    reward = make_reward(scripted, concurrency=1)
    scores = reward(solid([SHADES[7], SHADES[0]]))
    bodies = [r["body"] for r in scripted.requests]
    assert len(bodies) == 4  # two rejected (max_tokens, then temperature), then one per image
    last = bodies[-1]
    assert last["max_completion_tokens"] == 512 and "max_tokens" not in last and "temperature" not in last
    assert last["response_format"]["type"] == "json_schema"  # kept: it was not the problem
    assert scores[0] > scores[1]


def test_urls_with_paths_or_credentials():
    assert vlm_client.normalise_base_url("https://api.openai.com/v1/chat/completions/") == "https://api.openai.com/v1"
    with pytest.raises(base.RewardInputError, match="user name or password"):
        vlm_client.normalise_base_url("https://user:secret@example.com/v1")
    with pytest.raises(base.RewardInputError, match="base URL"):
        vlm_client.normalise_base_url("api.openai.com")


# ---- parsing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n, expected", [
    ('{"score": 7}', 1, [7.0]),
    ('```json\n{"score": 8.5}\n```', 1, [8.5]),
    ("I'd give it 6/10 overall.", 1, [6.0]),
    ("Score: 4", 1, [4.0]),
    ('{"image_1": 3, "image_2": 9}', 2, [3.0, 9.0]),
    ('{"scores": [1, 2, 12]}', 3, [1.0, 2.0, 10.0]),  # clamped to the scale
    ("Image 1: 5\nImage 2: 7.5\nImage 3: 2", 3, [5.0, 7.5, 2.0]),
    ('Sure! {"1": 2, "2": 4}', 2, [2.0, 4.0]),
])
def test_parse_scores(text, n, expected):
    assert vlm.parse_scores(text, n, 10.0) == expected


@pytest.mark.parametrize("text, n", [('{"scores": [1, 2]}', 3), ("Image 1: 5, Image 2: 6", 3), ("", 1),
                                     ("no idea", 1), ('{"image_1": 3}', 2)])
def test_parse_scores_wrong_count_is_a_clear_error(text, n):
    with pytest.raises(vlm.VLMAnswerError, match="empty|expected"):
        vlm.parse_scores(text, n, 10.0)


@pytest.mark.parametrize("text, expected", [('{"better": 2}', 2), ('{"better": "Image 1"}', 1), ("2", 2),
                                            ("Image 2 is better than image 1.", 2), ("Answer: 1", 1),
                                            ('{"winner": "second"}', 2)])
def test_parse_choice(text, expected):
    assert vlm.parse_choice(text) == expected


@pytest.mark.parametrize("text, expected", [('{"ranking": [3, 1, 2]}', [2, 0, 1]), ("[2, 1, 3]", [1, 0, 2]),
                                            ("Best: Image 3, then Image 1, then Image 2", [2, 0, 1])])
def test_parse_ranking(text, expected):
    assert vlm.parse_ranking(text, 3) == expected


@pytest.mark.parametrize("text", ['{"ranking": [3, 1]}', '{"ranking": [1, 2, 5]}', "hmm", '{"ranking": ["x"]}'])
def test_parse_ranking_rejects_partial_orders(text):
    with pytest.raises(vlm.VLMAnswerError):
        vlm.parse_ranking(text, 3)


# ---- the modes ---------------------------------------------------------------------------------------------------

def two_groups(k: int):
    """k candidates for each of 2 batch items, candidate-major like the samplers: item 0 gets shades in a shuffled
    order, item 1 the same shades reversed; the context says which item each image belongs to."""
    rng = random.Random(k)
    shades = [SHADES[i % 8] for i in range(k)] if k <= 8 else \
        [(0.05 + 0.9 * i / (k - 1), 0.3, 0.9 - 0.8 * i / (k - 1)) for i in range(k)]
    order0 = list(range(k))
    rng.shuffle(order0)
    order1 = order0[::-1]
    colours, groups, rank = [], [], {}
    for c in range(k):
        for item, order in ((0, order0), (1, order1)):
            rank[len(colours)] = order[c]  # higher = redder
            colours.append(shades[order[c]])
            groups.append(item)
    return solid(colours, size=16), base.ScoringContext(groups=tuple(groups)), rank


def test_rubric_mode_one_image_per_request_and_grids(scripted):
    images = solid([SHADES[0], SHADES[7], SHADES[3]])
    expected = [expected_rubric(c) for c in (SHADES[0], SHADES[7], SHADES[3])]
    single = make_reward(scripted)(images)
    assert len(scripted.requests) == 3
    assert single.tolist() == pytest.approx(expected, abs=1e-6)
    scripted.reset()
    grid = make_reward(scripted, images_per_call=2)(images)
    assert len(scripted.requests) == 2  # ceil(3 / 2) grids
    assert any("labelled with its number (1 to 2)" in text_of(r["body"]) for r in scripted.requests)
    assert grid.tolist() == pytest.approx(expected, abs=0.02)  # the labels and resizing blur the cells a little
    scripted.reset()
    scripted.script.extend([{"content": '{"score": 7}'}, {"content": "Looks like a 3/10 to me"},
                            {"content": '{"score": 10}'}])
    assert make_reward(scripted, concurrency=1)(images).tolist() == pytest.approx([0.7, 0.3, 1.0])


@pytest.mark.parametrize("k", [4, 8])
def test_pairwise_top_half_is_the_red_half_within_each_group(scripted, k):
    images, context, rank = two_groups(k)
    scores = make_reward(scripted, mode="pairwise_top_half")(images, None, context)
    for j, value in enumerate(scores.tolist()):
        assert value == (1.0 if rank[j] >= k // 2 else 0.0), (j, rank[j], value)
    for req in scripted.requests:  # comparisons never mix the batch items
        assert len(images_of(req["body"])) == 2
    assert sum(scores.tolist()) == k  # k/2 winners in each of 2 groups


def test_pairwise_knockout_one_round_of_pairs(scripted):
    images, context, rank = two_groups(8)
    scores = make_reward(scripted, mode="pairwise_knockout")(images, None, context)
    assert len(scripted.requests) == 8  # K/2 per group
    pairs = {}
    for req in scripted.requests:
        a, b = images_of(req["body"])
        pairs[(a.getpixel((0, 0)), b.getpixel((0, 0)))] = 1
    values = scores.tolist()
    for group in (0, 1):
        members = [j for j in range(16) if context.groups[j] == group]
        assert sorted(values[j] for j in members) == [0.0] * 4 + [1.0] * 4
        assert max(members, key=lambda j: rank[j]) in [j for j in members if values[j] == 1.0]  # the best wins


def test_ranking_mode_one_grid_per_group_linear_in_rank(scripted):
    images, context, rank = two_groups(4)
    scores = make_reward(scripted, mode="ranking")(images, None, context)
    assert len(scripted.requests) == 2
    for j, value in enumerate(scores.tolist()):
        assert value == pytest.approx(rank[j] / 3)
    scripted.reset()
    scripted.script.append({"content": '{"ranking": [2, 3, 1]}'})
    assert make_reward(scripted, mode="ranking")(solid(SHADES[:3])).tolist() == pytest.approx([0.0, 1.0, 0.5])


def count_calls(scripted, mode, k, trials=1, **over):
    counts = []
    for trial in range(trials):
        scripted.reset()
        rng = random.Random(1000 * k + trial)
        colours = [(rng.random(), rng.random(), rng.random()) for _ in range(k)]
        make_reward(scripted, mode=mode, **over)(solid(colours, size=8))
        counts.append(len(scripted.requests))
    return counts


def test_requests_per_group_of_k(scripted, capsys):
    """The costs the README quotes; printed with -s.  Top half: K-1 requests at least, about 2K at most on average."""
    table = {}
    for k in (4, 8, 16):
        table[k] = {"rubric": count_calls(scripted, "rubric", k)[0],
                    "rubric_grid4": count_calls(scripted, "rubric", k, images_per_call=4)[0],
                    "knockout": count_calls(scripted, "pairwise_knockout", k)[0],
                    "ranking": count_calls(scripted, "ranking", k)[0]}
        top = count_calls(scripted, "pairwise_top_half", k, trials=10)
        table[k]["top_half_mean"] = sum(top) / len(top)
        table[k]["top_half_max"] = max(top)
        assert table[k]["rubric"] == k and table[k]["rubric_grid4"] == math.ceil(k / 4)
        assert table[k]["knockout"] == k // 2 and table[k]["ranking"] == 1
        assert min(top) >= k - 1 and table[k]["top_half_mean"] <= 2.2 * k
    with capsys.disabled():
        print("\nVLM requests per group of K candidates:", json.dumps(table))


# ---- failures ----------------------------------------------------------------------------------------------------

class ConstantReward(base.Reward):
    name = "constant fallback"

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts=None, context=base.NO_CONTEXT):
        self.calls += 1
        return torch.arange(images.shape[0], dtype=torch.float32) + 100.0


FAILURES = {
    # kind: (scripted replies, extra config, text the 'fail' error must contain)
    "429_retry_after": ([{"status": 429, "headers": {"Retry-After": "7"}}] * 3, {}, "HTTP 429"),
    "500": ([{"status": 500}] * 3, {}, "HTTP 500"),
    "timeout": ([{"sleep": 1.0}] * 3, {"timeout": 0.25}, "timeout"),
    "malformed_json": ([{"body": b'{"choices": [{"message": '}] * 3, {}, "malformed JSON"),
    "wrong_count": ([{"content": '{"image_1": 4}'}] * 2, {"images_per_call": 2}, "expected 2 scores"),
    "empty_body": ([{"body": b""}] * 3, {}, "empty body"),
}


@pytest.mark.parametrize("policy", ["fail", "neutral", "fallback"])
@pytest.mark.parametrize("kind", list(FAILURES))
def test_failure_policies(scripted, kind, policy, caplog):
    replies, extra, problem = FAILURES[kind]
    scripted.script.extend(copy.deepcopy(replies))
    fallback = ConstantReward()
    sleep = FakeSleep()
    reward = make_reward(scripted, failure=policy, fallback=fallback if policy == "fallback" else None, sleep=sleep,
                         **{"images_per_call": 2, **extra})  # one request per call: the script is its attempts
    images = solid([SHADES[7], SHADES[0]])
    host = scripted.url.split("//")[1].split("/")[0]
    if policy == "fail":
        with pytest.raises(vlm_client.VLMError) as info:
            reward(images)
        message = str(info.value)
        assert host in message and problem in message and "scripted-vl" in message
        assert "neutral" in message  # says how to keep going
    else:
        with caplog.at_level("WARNING"):
            scores = reward(images)
        if policy == "neutral":
            assert scores.tolist() == [0.5, 0.5]
        else:
            assert scores.tolist() == [100.0, 101.0] and fallback.calls == 1
        assert any(problem in r.getMessage() and host in r.getMessage() for r in caplog.records)
    if kind == "429_retry_after":
        assert sleep.waits == [7.0, 7.0]  # Retry-After beats the (tiny) backoff
    if kind in ("429_retry_after", "500", "malformed_json", "empty_body", "timeout"):
        assert reward.counters.retries == 2 and reward.counters.calls == 3
    if kind == "wrong_count":
        assert reward.counters.bad_answers == 2 and reward.counters.calls == 2
    # the endpoint is still up and the same reward object recovers
    scripted.script.clear()
    assert reward(images).tolist()[0] > 0.9


def test_retry_after_then_success(scripted):
    scripted.script.extend([{"status": 429, "headers": {"Retry-After": "3"}}, {"status": 503}, {"status": 502}])
    sleep = FakeSleep()
    reward = make_reward(scripted, max_retries=4, backoff_base=1.0, backoff_cap=60.0, sleep=sleep)
    scores = reward(solid([SHADES[7]]))
    assert scores.tolist()[0] > 0.9
    assert reward.counters.retries == 3 and reward.counters.calls == 4
    assert sleep.waits[0] == 3.0                       # Retry-After (backoff would be 0.5..1)
    assert 1.0 <= sleep.waits[1] <= 2.0                # 2^1, jittered down to half
    assert 2.0 <= sleep.waits[2] <= 4.0


def test_backoff_and_retry_after_helpers():
    rng = random.Random(0)
    for attempt in range(8):
        d = min(30.0, 2.0 ** attempt)
        values = [vlm_client.backoff_delay(attempt, 1.0, 30.0, rng) for _ in range(50)]
        assert all(d / 2 <= v <= d for v in values) and len(set(values)) > 40  # jittered
    assert vlm_client.retry_after_seconds("12") == 12.0
    assert vlm_client.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert vlm_client.retry_after_seconds(None) is None and vlm_client.retry_after_seconds("soon") is None


def test_deadline_bounds_a_reward_call(scripted):
    scripted.script.extend([{"status": 503, "headers": {"Retry-After": "30"}}] * 5)
    reward = make_reward(scripted, deadline=2.0, max_retries=10, sleep=None)  # real sleeping
    reward.client.sleep = lambda s, stop: stop.wait(s)
    started = time.monotonic()
    with pytest.raises(vlm_client.VLMError, match="deadline of 2 s"):
        reward(solid([SHADES[1]]))
    assert time.monotonic() - started < 1.5  # gave up at once: the Retry-After lies past the deadline
    assert reward.counters.calls == 1


def test_concurrency_and_requests_per_minute(scripted):
    scripted.judge = lambda body: (time.sleep(0.15), red_judge(body))[1]
    make_reward(scripted, concurrency=2)(solid(SHADES))
    assert scripted.max_active == 2 and len(scripted.requests) == 8
    clock = [0.0]
    limiter = vlm_client.RateLimiter(3, clock=lambda: clock[0])
    assert [limiter.delay() for _ in range(5)] == [0.0, 0.0, 0.0, 60.0, 60.0]
    clock[0] = 30.0
    assert limiter.delay() == 30.0  # a third start at 60 keeps every 60 s window at 3
    assert limiter.delay() == 90.0  # 60, 60, 60 taken: the next at 120
    assert vlm_client.RateLimiter(0).delay() == 0.0


def test_interrupt_stops_a_reward_call(scripted):
    scripted.judge = lambda body: (time.sleep(0.5), red_judge(body))[1]
    reward = make_reward(scripted, concurrency=1)

    class Interrupted(Exception):
        pass

    def check():
        if len(scripted.requests) >= 1:
            raise Interrupted()
    reward.cancel_check = check
    started = time.monotonic()
    with pytest.raises(Interrupted):
        reward(solid(SHADES))
    assert time.monotonic() - started < 2.0 and len(scripted.requests) <= 2


# ---- the key never leaks: scrubbing ------------------------------------------------------------------------------

def test_key_echoed_by_the_endpoint_is_scrubbed(scripted, monkeypatch, caplog):
    key = "sk-proj-" + uuid.uuid4().hex + uuid.uuid4().hex
    monkeypatch.setenv("RS_VLM_TEST_KEY", key)
    scripted.script.append({"status": 401, "message": f"Incorrect API key provided: {key}. Also {key[:12]}...{key[-6:]}"
                                                      f" and {key[5:30]}"})
    with pytest.raises(vlm_client.VLMError) as info:
        make_reward(scripted, api_key_env="RS_VLM_TEST_KEY")(solid([SHADES[0]]))
    message = str(info.value)
    assert "HTTP 401" in message and "refused the API key" in message and "RS_VLM_TEST_KEY" in message
    assert key not in message and key[5:30] not in message and key[:12] not in message
    scripted.script.append({"content": f"score 5 ({key})"})
    with caplog.at_level("DEBUG"):
        with pytest.raises(vlm_client.VLMError):
            make_reward(scripted, api_key_env="RS_VLM_TEST_KEY", answer_retries=0, failure="fail",
                        mode="pairwise_knockout")(solid([SHADES[0], SHADES[1]]))
    assert all(key[8:20] not in r.getMessage() for r in caplog.records)


# ---- the cache ---------------------------------------------------------------------------------------------------

def test_cache_second_call_makes_no_requests(scripted, tmp_path):
    images, context, _ = two_groups(4)
    for mode in ("rubric", "pairwise_top_half", "ranking"):
        scripted.reset()
        first = make_reward(scripted, mode=mode, cache_dir=str(tmp_path / "cache"))(images, None, context)
        n = len(scripted.requests)
        assert n > 0
        again = make_reward(scripted, mode=mode, cache_dir=str(tmp_path / "cache"))
        assert torch.equal(again(images, None, context), first)
        assert len(scripted.requests) == n and again.counters.calls == 0
        assert again.counters.cache_hits >= n  # (identical asks of the first call already shared an answer)
    files = list((tmp_path / "cache").rglob("*.json"))
    assert files and all("sk-" not in f.read_text() for f in files)
    # a different rubric is a different question; cache off asks again
    make_reward(scripted, mode="ranking", rubric="How blue?", cache_dir=str(tmp_path / "cache"))(images, None, context)
    assert len(scripted.requests) == n + 2
    make_reward(scripted, mode="ranking", cache_dir=None)(images, None, context)
    assert len(scripted.requests) == n + 4


def test_failed_answers_are_not_cached(scripted, tmp_path):
    scripted.script.extend([{"content": "nonsense"}, {"content": "nonsense"}])
    reward = make_reward(scripted, failure="neutral", cache_dir=str(tmp_path))
    assert reward(solid([SHADES[7]])).tolist() == [0.5]
    assert reward(solid([SHADES[7]])).tolist()[0] > 0.9
    assert len(scripted.requests) == 3


# ---- through ComfyUI ---------------------------------------------------------------------------------------------

def vlm_node_inputs(url, **over):
    import build_workflows
    inputs = dict(build_workflows.VLM_REWARD_DEFAULTS, base_url=url, model="scripted-vl", api_key_env="",
                  rubric="Which picture is more strongly red?", image_size=64, max_retries=1, timeout=10.0)
    inputs.update(over)
    return inputs


def demon_vlm_prompt(url, batch=4, seed=7, steps=6, k=4, vlm_over=None, **steer):
    import build_workflows
    demon = {**build_workflows.DEMON_DEFAULTS, "k": k, **build_workflows.VLM_DEMON, **steer}
    return {
        "1": harness.reference_model_node(),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "3": {"class_type": "RewardSteerVLMReward", "inputs": vlm_node_inputs(url, **(vlm_over or {}))},
        "4": {"class_type": "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": seed, "steps": steps, "cfg": 1.0, "scheduler": "normal", "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1], **demon}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "toward colour", "red": RED[0], "green": RED[1], "blue": RED[2], "bias": 0.0}},
        "7": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["5", 0], "reward": ["6", 0]}},
    }


@pytest.fixture
def node_dirs(tmp_path, monkeypatch):
    nodes_vlm = harness.pack_submodule("nodes.vlm")
    monkeypatch.setattr(nodes_vlm, "cache_dir", lambda: str(tmp_path / "vlm_cache"))
    monkeypatch.setattr(nodes_vlm, "key_file_path", lambda: str(tmp_path / "vlm_keys.json"))
    return tmp_path


def test_demon_steered_by_the_scripted_vlm(executor, scripted, node_dirs):
    """End to end: Demon on the reference model, the VLM's pairwise tournament picks the redder half at each step;
    the results are redder than Demon with K=1 (no steering: plain Euler) from the same seed."""
    batch, steps, k = 8, 8, 4
    steered = demon_vlm_prompt(scripted.url, batch=batch, steps=steps, k=k)
    executor.run(steered, want=("4",))
    red_steered = executor.history["outputs"]["7"]["scores"]
    calls = len(scripted.requests)
    plain = demon_vlm_prompt(scripted.url, batch=batch, steps=steps, k=1)
    executor.run(plain, want=("4",))
    red_plain = executor.history["outputs"]["7"]["scores"]
    assert len(scripted.requests) == calls  # K=1 never asks
    # K = 1 is plain Euler (same seed); measured: steered 0.087 against unsteered 0.015 mean redness
    assert sum(red_steered) / batch > sum(red_plain) / batch + 0.05, (red_steered, red_plain)
    assert sum(s > p for s, p in zip(red_steered, red_plain)) >= batch - 1
    # calls per image: steps * (K-1 .. 2K) comparisons
    assert steps * (k - 1) <= calls / batch <= steps * 2 * k
    print(f"\nDemon K={k}, {steps} steps, pairwise_top_half: {calls / batch:.1f} requests per image")


@pytest.mark.parametrize("mode, per_group", [("rubric", lambda k: k), ("pairwise_knockout", lambda k: k // 2),
                                              ("ranking", lambda k: 1), ("pairwise_top_half", None)])
def test_demon_requests_per_image_per_mode(executor, scripted, node_dirs, mode, per_group, capsys):
    """Requests per image of a Demon run = steered steps x requests per group of K (no cache)."""
    batch, steps, k = 2, 6, 4
    out = executor.run(demon_vlm_prompt(scripted.url, batch=batch, steps=steps, k=k,
                                        vlm_over={"mode": mode, "cache": False}), want=("4",))
    steered = json.loads(out["4"][1][0])["steered_steps"]
    per_image = len(scripted.requests) / batch
    if per_group is not None:
        assert per_image == steered * per_group(k)
    else:
        assert steered * (k - 1) <= per_image <= steered * 4  # K=4: 3 or 4 comparisons per group
    with capsys.disabled():
        print(f"\nDemon K={k}, {steered} steered steps, {mode}: {per_image:g} requests per image")


def test_smc_steered_by_vlm_ranking_compares_particles_of_each_item(executor, scripted, node_dirs):
    import build_workflows
    prompt = demon_vlm_prompt(scripted.url, batch=2, steps=4, vlm_over={"mode": "ranking", "cache": False})
    prompt["4"] = {"class_type": "RewardSteerKSamplerSMC",
                   "inputs": {**prompt["4"]["inputs"], **{**build_workflows.SMC_DEFAULTS, "particles": 4}}}
    for name in ("k", "beta", "weighting", "tau", "estimator", "max_rollout_steps", "min_sigma", "start", "end",
                 "budget"):
        prompt["4"]["inputs"].pop(name, None)
    executor.run(prompt, want=("4",))
    assert scripted.requests
    for req in scripted.requests:  # one grid of the 4 particles of one batch item per request
        assert "The grid shows 4 images" in text_of(req["body"])
    assert len(scripted.requests) % 2 == 0


def test_big_grids_are_capped():
    cells = [Image.new("RGB", (512, 512), (200, 10, 10))] * 16
    grid = vlm.labelled_grid(cells, 512)
    assert max(grid.size) <= vlm.GRID_MAX_SIDE and len(grid_cells(grid, 16)) == 16


def test_second_run_of_the_workflow_makes_zero_requests_and_the_same_image(executor, scripted, node_dirs):
    prompt = demon_vlm_prompt(scripted.url, batch=2, steps=5, k=4, vlm_over={"mode": "ranking"})
    first = executor.run(prompt, want=("4",))["4"][0][0]["samples"].clone()
    n = len(scripted.requests)
    assert n in (4 * 2, 5 * 2)  # one ranking grid per item per steered step (the last step may go unsteered)
    second = executor.run(prompt, want=("4",))["4"][0][0]["samples"]  # fresh: every node runs again
    assert len(scripted.requests) == n
    assert_same_latent(first, second)
    # the counters are shown on the VLM node: progress text for node "3", sent while the sampler (node "4") runs
    shown = []
    for event, data in executor.messages:
        if isinstance(data, (bytes, bytearray)):
            (length,) = struct.unpack(">I", data[:4])
            shown.append((data[4:4 + length].decode(), data[4 + length:].decode(errors="replace")))
    texts = [text for node, text in shown if node == "3" and "requests" in text]
    assert texts and "0 requests, 2 cached" in texts[-1] and f"{n} cache hits" in texts[-1], texts[-1:]
    outputs_cache = executor.executor.caches.outputs
    reward = (getattr(outputs_cache, "get_local", None) or outputs_cache.get)("3")  # `get` is async since v0.17
    reward = (reward.outputs if hasattr(reward, "outputs") else reward)[0][0]
    assert reward.counters.cache_hits == n and reward.counters.calls == 0


# Latents of two runs that score the same candidates the same way agree to this tolerance, not bit for bit:
# ComfyUI batches VAE decodes and this pack batches model calls by free memory, and the fallback reward scores
# each failed group as its own sub-batch, so float reductions may run over different batch shapes.  The VLM runs
# use tau = 1e-4, whose steep tanh weights pass a last-bit change of a reward on to the latents (measured on this
# workflow: reward noise of 1e-8 moves them by up to 3e-6, of 1e-7 by 2e-5); another reward moves them by > 1.
LATENT_ATOL = 1e-4


def assert_same_latent(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0.0, atol=LATENT_ATOL)


def test_fail_policy_fails_the_prompt_and_the_queue_goes_on(executor, scripted, node_dirs):
    scripted.script.extend([{"status": 500}] * 10)
    prompt = demon_vlm_prompt(scripted.url, batch=1, steps=3, k=2, vlm_over={"max_retries": 0, "cache": False})
    with pytest.raises(RuntimeError) as info:
        executor.run(prompt, want=("4",))
    assert "HTTP 500" in str(info.value) and "127.0.0.1" in str(info.value)
    scripted.script.clear()
    executor.run(prompt, want=("4",))  # the next prompt runs


def test_neutral_and_fallback_policies_in_a_workflow(executor, scripted, node_dirs):
    """Every request fails: 'neutral' gives the same image as a constant reward (equal weights), 'fallback' the
    same image as steering by the fallback reward itself."""
    def latent(prompt):
        return executor.run(prompt, want=("4",))["4"][0][0]["samples"].clone()

    prompt = demon_vlm_prompt(scripted.url, batch=2, steps=4, k=3,
                              vlm_over={"max_retries": 0, "cache": False, "failure": "neutral"})
    scripted.script.extend([{"status": 500}] * 1000)
    neutral = latent(prompt)
    fallback_prompt = copy.deepcopy(prompt)
    fallback_prompt["3"]["inputs"].update(failure="fallback", fallback=["6", 0])
    fallback = latent(fallback_prompt)
    assert len(scripted.requests) > 0
    scripted.script.clear()
    constant = copy.deepcopy(prompt)
    constant["8"] = {"class_type": "RewardSteerColorReward",
                     "inputs": {"mode": "channel weights", "red": 0.0, "green": 0.0, "blue": 0.0, "bias": 0.0}}
    constant["4"]["inputs"]["reward"] = ["8", 0]
    direct = copy.deepcopy(prompt)
    direct["4"]["inputs"]["reward"] = ["6", 0]
    assert_same_latent(neutral, latent(constant))
    assert_same_latent(fallback, latent(direct))
    assert (neutral - fallback).abs().max() > 0.1    # steering by the colour reward moves the latents by > 1
    prompt["3"]["inputs"]["failure"] = "fallback"  # nothing connected to 'fallback'
    with pytest.raises(RuntimeError, match="needs a reward connected to 'fallback'"):
        executor.run(prompt, want=("4",))


# ---- the key never leaks: a real server --------------------------------------------------------------------------

def png_text(path: Path) -> str:
    img = Image.open(path)
    img.load()
    return json.dumps({k: str(v) for k, v in {**img.info, **getattr(img, "text", {})}.items()})


def test_key_never_in_workflow_png_or_logs(scripted, tmp_path):
    import build_workflows
    from comfy_client import ComfyServer, api_to_ui, ui_to_api
    key = "sk-leaktest-" + uuid.uuid4().hex
    env_name = "RS_VLM_LEAK_TEST_KEY"
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    out = tmp_path / "out"
    log = tmp_path / "server.log"
    graph = build_workflows.example_reference_vlm_demon()
    graph["2"]["inputs"].update(width=64, height=64, batch_size=1)
    graph["3"]["inputs"].update(base_url=scripted.url, api_key_env=env_name, image_size=64)
    graph["4"]["inputs"].update(steps=4, k=4)
    with ComfyServer(output_dir=out, log_path=log, env={env_name: key},
                     extra_args=["--user-directory", str(user_dir), "--verbose", "DEBUG"]) as srv:
        info = srv.get("/object_info", timeout=120)
        ui = api_to_ui(graph, info)
        api = ui_to_api(ui, info)
        reply = srv.post("/prompt", {"prompt": api, "client_id": "leak-test",
                                     "extra_data": {"extra_pnginfo": {"workflow": ui}}})
        history = srv.wait(reply["prompt_id"], timeout=300)
        asked = len(scripted.requests)
        # the same workflow again with a setting outside the cache key changed (concurrency), so that ComfyUI
        # re-runs the VLM node, the sampler and SaveImage: every answer comes from the disk cache
        rerun = copy.deepcopy(api)
        rerun["3"]["inputs"]["concurrency"] = 3
        again = srv.wait(srv.post("/prompt", {"prompt": rerun, "client_id": "leak-test",
                                              "extra_data": {"extra_pnginfo": {"workflow": ui}}})["prompt_id"])
        assert len(scripted.requests) == asked > 0
        first_png, second_png = (again["outputs"]["6"]["images"][0]["filename"],
                                 history["outputs"]["6"]["images"][0]["filename"])
        assert first_png != second_png
        assert np.array_equal(np.asarray(Image.open(next(out.rglob(first_png)))),
                              np.asarray(Image.open(next(out.rglob(second_png)))))
        # a failing prompt whose endpoint echoes the key back; the server goes on
        scripted.script.extend([{"status": 401, "message": f"Incorrect API key provided: {key}"}])
        bad = copy.deepcopy(api)
        bad["3"]["inputs"].update(cache=False, rubric="another question")
        bad_id = srv.post("/prompt", {"prompt": bad, "client_id": "leak-test",
                                      "extra_data": {"extra_pnginfo": {"workflow": ui}}})["prompt_id"]
        with pytest.raises(RuntimeError) as info_bad:
            srv.wait(bad_id, timeout=120)
        bad_history = srv.get(f"/history/{bad_id}")
        srv.get("/system_stats")  # still up
    assert scripted.requests and all(r["headers"].get("Authorization") == f"Bearer {key}" for r in scripted.requests)
    errors = [m[1] for m in bad_history[bad_id]["status"]["messages"] if m[0] == "execution_error"]
    assert "HTTP 401" in errors[0]["exception_message"] and "refused the API key" in errors[0]["exception_message"]
    assert key not in str(info_bad.value)
    pngs = list(out.rglob("*.png"))
    assert pngs
    saved = [json.dumps(ui), json.dumps(api), json.dumps(history), json.dumps(bad_history), log.read_text()]
    saved += [png_text(p) for p in pngs]
    saved += [p.read_text(errors="replace") for p in user_dir.rglob("*") if p.is_file()]
    assert "workflow" in png_text(pngs[0]) and "RewardSteerVLMReward" in png_text(pngs[0])
    for text in saved:
        assert key not in text and key[3:20] not in text
    cache_files = list(user_dir.rglob("vlm_cache/**/*.json"))
    assert cache_files  # the server's own user directory holds the cache
