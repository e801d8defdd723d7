"""The live candidate view (samplers/live.py): per scored step, the tab that queued a Demon or SMC run gets one
'reward_steering.live' event on ComfyUI's websocket with the candidates' rewards, weights, kept / resampled marks and
a small latent-RGB grid; nothing when REWARD_STEER_LIVE=0.  A real server, listened to as the page does."""
import asyncio
import base64
import json
import math
import threading
import time
import uuid

import pytest

import harness
from comfy_client import ComfyServer

EVENT = "reward_steering.live"
STEPS, K, BATCH = 6, 4, 2


class LiveEvents:
    """The pack's live events sent to this websocket's client id."""

    def __init__(self, url: str):
        self.client_id = uuid.uuid4().hex
        self.events: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(url),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the server's websocket did not open"

    async def _listen(self, url: str):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, max_msg_size=0) as ws:
                self._ws = ws
                self._ready.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(msg.data)
                        if event.get("type") == EVENT:
                            self.events.append(event["data"])

    def close(self):
        asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(10)
        self._thread.join(10)


def graph(kind: str) -> dict:
    common = {"model": ["1", 0], "seed": 3, "steps": STEPS, "cfg": 1.0, "scheduler": "simple",
              "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
              "reward": ["3", 0], "vae": ["1", 1], "prompt": "", "chunk_items": 0}
    if kind == "demon":
        node = {"class_type": "RewardSteerKSamplerDemon",
                "inputs": {**common, "k": K, "beta": 0.1, "weighting": "tanh", "tau": 0.0, "estimator": "tweedie",
                           "max_rollout_steps": 20, "min_sigma": 0.0, "start": 0.0, "end": 1.0, "budget": 0,
                           "decoder": "latent_rgb"}}
    elif kind == "tree":   # 3 rounds of 4 leaves per item
        node = {"class_type": "RewardSteerKSamplerTree",
                "inputs": {**common, "mode": "dts_star", "lam": 10.0, "rollouts": 3 * K, "max_calls": 0,
                           "max_seconds": 0.0, "parallel": K, "widening": 1.0, "alpha": 0.5, "exploration": 1.0,
                           "eta": 1.0, "decoder": "latent_rgb"}}
    else:
        node = {"class_type": "RewardSteerKSamplerSMC",
                "inputs": {**common, "particles": K, "lam": 200.0, "potential": "difference", "tempering": "none",
                           "gamma": 0.008, "resampling": "systematic", "ess_threshold": 0.5, "reward_start": 0,
                           "reward_end": -1, "reward_interval": 1, "eta": 1.0, "gradient_guidance": False,
                           "output": "weighted_draw", "decoder": "latent_rgb"}}
    return {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "flow", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "3": harness.red_reward_node(),
        "9": node,
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 2]}},   # an output, so the graph runs
    }


def run_and_listen(server, kind: str, seed: int):
    listener = LiveEvents(server.url)
    try:
        prompt = graph(kind)
        prompt["9"]["inputs"]["seed"] = seed   # a new seed: never served from ComfyUI's cache
        outputs = server.wait(server.queue(prompt, client_id=listener.client_id), timeout=300)["outputs"]
        time.sleep(0.5)   # the last send_sync is delivered by the server's loop after the prompt's history is written
        return outputs, list(listener.events)
    finally:
        listener.close()


def check_events(events: list[dict], kind: str, mark: str) -> None:
    for event in events:
        assert event["node"] == "9" and event["kind"] == kind and event["mark"] == mark
        assert event["k"] == K and event["shown"] == K and event["steps"] == STEPS
        assert len(event["rewards"]) == len(event["weights"]) == len(event["marks"]) == K
        assert all(math.isfinite(r) for r in event["rewards"])
        if kind == "tree":   # a round's leaves: equal weights, the best marked
            assert event["marks"] == [r == max(event["rewards"]) for r in event["rewards"]]
        elif kind == "smc":   # particle weights are normalised; Demon's are the noise-combination weights (tanh: +/-)
            assert sum(event["weights"]) == pytest.approx(1.0, abs=1e-4)
        else:
            assert event["marks"] == [w > 0 for w in event["weights"]]
        png = base64.b64decode(event["image"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if kind != "tree":   # (the tree scores leaves only, at the last step, once per round)
        assert [e["step"] for e in events] == sorted({e["step"] for e in events})   # one event per step, in order


def test_demon_sends_one_event_per_steered_step(server):
    outputs, events = run_and_listen(server, "demon", seed=101)
    steered = outputs["9"]["demon"][0]["steered_steps"]
    assert steered >= 3 and len(events) == steered
    check_events(events, "demon", "kept")


def test_smc_sends_one_event_per_scored_step(server):
    outputs, events = run_and_listen(server, "smc", seed=102)
    assert len(events) == STEPS   # reward_interval 1, start 0, end -1: every step is scored
    check_events(events, "smc", "resampled")
    assert any(any(e["marks"]) for e in events[:-1]) and not any(events[-1]["marks"])   # no resampling at the end


def test_tree_sends_one_event_per_round(server):
    outputs, events = run_and_listen(server, "tree", seed=104)
    assert len(events) == 3
    check_events(events, "tree", "best")


def test_switched_off_on_the_server_sends_nothing(tmp_path):
    with ComfyServer(output_dir=tmp_path, log_path=tmp_path / "server.log", env={"REWARD_STEER_LIVE": "0"}) as off:
        for kind in ("demon", "smc"):
            outputs, events = run_and_listen(off, kind, seed=103)
            assert outputs["9"] and events == []
