"""Manual pick reward: the waiting room (answer / timeout / cancel / interrupt / stale and foreign answers /
unattended runs / one request at a time), the reward built on it, the node inside ComfyUI's executor, and the
HTTP routes and page script on a real server.  The browser itself: tests/test_manual_pick_browser.py."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import build_workflows
import harness

mp = harness.pack_submodule("rewards.manual_pick")
base = harness.pack_submodule("rewards.base")
LinearColorReward = harness.pack_submodule("rewards.linear_color").LinearColorReward
RED = (0.9, 0.2, 0.2)


class Interrupted(Exception):
    pass


class FakePage:
    """Records what the broker sends; `connected` says whether the tab's websocket is open."""

    def __init__(self, connected=True):
        self.events: list[tuple[str, dict, str | None]] = []
        self.connected = connected
        self.interrupt = False

    def send(self, event, data, client_id):
        self.events.append((event, data, client_id))

    def is_connected(self, client_id):
        return self.connected

    def check_interrupt(self):
        if self.interrupt:
            self.interrupt = False
            raise Interrupted()

    def requests(self):
        return [d for e, d, _ in self.events if e == mp.REQUEST_EVENT]

    def closes(self):
        return [d for e, d, _ in self.events if e == mp.CLOSE_EVENT]


def make_broker(page: FakePage, poll=0.01):
    return mp.PickBroker(send=page.send, is_connected=page.is_connected, check_interrupt=page.check_interrupt,
                         poll=poll)


def request(k=4, **kw):
    defaults = dict(images=[b"png%d" % i for i in range(k)], prompt_id="p1", node_id="9", client_id="tab1",
                    step=2, steps=8, timeout=5.0)
    return mp.PickRequest(**{**defaults, **kw})


def answer_of(req: mp.PickRequest, **kw):
    return {"token": req.token, "prompt_id": req.prompt_id, "client_id": req.client_id, "action": "submit",
            "selected": [1], **kw}


def ask_in_thread(broker, req, **kw):
    box = {}

    def run():
        try:
            box["outcome"] = broker.ask(req, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 5
    while broker.pending is not req and "outcome" not in box and "error" not in box and time.time() < deadline:
        time.sleep(0.005)
    return thread, box


# ---- the waiting room ----------------------------------------------------------------------------------------

def test_answer_returns_the_selection_in_click_order_and_closes_the_grid():
    page = FakePage()
    broker = make_broker(page)
    req = request()
    thread, box = ask_in_thread(broker, req)
    payload = page.requests()[0]
    assert payload["token"] == req.token and payload["client_id"] == "tab1" and payload["k"] == 4
    assert payload["step"] == 2 and payload["steps"] == 8 and payload["steps_left"] == 5
    assert 4.0 < payload["remaining"] <= 5.0
    time.sleep(0.3)
    assert 4.0 < broker.pending_for("tab1")["remaining"] < 4.8    # a reloaded page gets the time really left
    assert payload["images"][3].endswith(f"token={req.token}&index=3")
    assert broker.image(req.token, 2) == b"png2" and broker.image("other", 2) is None
    assert broker.pending_for("tab1")["token"] == req.token and broker.pending_for("tab2") is None
    assert broker.answer(answer_of(req, selected=[3, 0])) == (200, {"ok": True})
    thread.join(5)
    assert box["outcome"].kind == "answered" and box["outcome"].selected == [3, 0]
    assert page.closes() == [{"token": req.token, "prompt_id": "p1", "reason": "answered"}]
    assert broker.pending is None and broker.image(req.token, 0) is None


@pytest.mark.parametrize("change", [{"token": "0" * 32}, {"prompt_id": "p0"}, {"client_id": "another-tab"},
                                    {"token": None}])
def test_stale_or_foreign_answers_are_refused_and_harmless(change):
    page = FakePage()
    broker = make_broker(page)
    req = request(timeout=0.3)
    thread, box = ask_in_thread(broker, req)
    status, body = broker.answer(answer_of(req, **change))
    assert status == 409 and body["error"] == "stale"
    thread.join(5)
    assert box["outcome"].kind == "timeout"      # the foreign answer did not count


def test_an_answer_after_the_request_is_over_is_refused():
    page = FakePage()
    broker = make_broker(page)
    req = request()
    thread, box = ask_in_thread(broker, req)
    assert broker.answer(answer_of(req))[0] == 200
    thread.join(5)
    assert broker.answer(answer_of(req))[0] == 409        # double submit, or a click on a stale grid
    assert broker.answer(answer_of(req, action="cancel"))[0] == 409


@pytest.mark.parametrize("bad", [{"selected": [4]}, {"selected": [1, 1]}, {"selected": [-1]}, {"selected": "1"},
                                 {"selected": [True]}, {"action": "maybe"}])
def test_malformed_answers_are_rejected_and_the_request_keeps_waiting(bad):
    page = FakePage()
    broker = make_broker(page)
    req = request()
    thread, box = ask_in_thread(broker, req)
    assert broker.answer(answer_of(req, **bad))[0] == 400
    assert broker.pending is req
    assert broker.answer(answer_of(req, selected=[2]))[0] == 200
    thread.join(5)
    assert box["outcome"].selected == [2]
    assert broker.answer("not a dict")[0] == 400


def test_timeout():
    page = FakePage()
    broker = make_broker(page)
    t = time.monotonic()
    outcome = broker.ask(request(timeout=0.3))
    assert outcome.kind == "timeout" and 0.3 <= time.monotonic() - t < 2
    assert page.closes()[0]["reason"] == "timeout" and broker.pending is None


def test_cancel_in_the_page():
    page = FakePage()
    broker = make_broker(page)
    req = request()
    thread, box = ask_in_thread(broker, req)
    assert broker.answer(answer_of(req, action="cancel", selected=[1, 2]))[0] == 200
    thread.join(5)
    assert box["outcome"].kind == "cancelled" and box["outcome"].selected == []
    assert page.closes()[0]["reason"] == "cancelled"


def test_an_interrupt_ends_the_wait_at_once_and_withdraws_the_request():
    page = FakePage()
    broker = make_broker(page)
    req = request(timeout=60)
    thread, box = ask_in_thread(broker, req)
    t = time.monotonic()
    page.interrupt = True
    thread.join(5)
    assert isinstance(box["error"], Interrupted) and time.monotonic() - t < 1
    assert broker.pending is None and page.closes()[0]["reason"] == "withdrawn"
    assert broker.answer(answer_of(req))[0] == 409


def test_unattended_runs_never_wait():
    page = FakePage(connected=False)
    broker = make_broker(page)
    t = time.monotonic()
    assert broker.ask(request(client_id=None, timeout=60)).kind == "unattended"    # queued over the API
    assert page.events == [] and time.monotonic() - t < 0.2
    outcome = broker.ask(request(timeout=60), grace=0.2)                           # the tab is gone
    assert outcome.kind == "unattended" and 0.2 <= outcome.waited < 2


def test_a_tab_that_reconnects_within_the_grace_period_can_still_answer():
    page = FakePage(connected=False)
    broker = make_broker(page)
    req = request(timeout=10)
    thread, box = ask_in_thread(broker, req, grace=0.5)
    time.sleep(0.1)
    page.connected = True
    time.sleep(0.6)
    assert broker.pending is req
    assert broker.answer(answer_of(req))[0] == 200
    thread.join(5)
    assert box["outcome"].kind == "answered"


def test_one_request_at_a_time_in_order():
    page = FakePage()
    broker = make_broker(page)
    first, second = request(prompt_id="p1"), request(prompt_id="p2")
    t1, b1 = ask_in_thread(broker, first)
    t2 = threading.Thread(target=lambda: broker.ask(second))
    t2.start()
    time.sleep(0.2)
    assert broker.pending is first and len(page.requests()) == 1      # the second waits its turn
    assert broker.answer(answer_of(second))[0] == 409                  # not shown yet: not answerable
    assert broker.answer(answer_of(first))[0] == 200
    deadline = time.time() + 5
    while broker.pending is not second and time.time() < deadline:
        time.sleep(0.005)
    assert [r["prompt_id"] for r in page.requests()] == ["p1", "p2"]
    assert broker.answer(answer_of(second))[0] == 200
    t1.join(5)
    t2.join(5)


# ---- the reward ----------------------------------------------------------------------------------------------

class AutoPage(FakePage):
    """A page that answers every request at once with `choose(request payload) -> (action, selected)`."""

    def __init__(self, choose, connected=True):
        super().__init__(connected)
        self.choose = choose
        self.broker = None

    def send(self, event, data, client_id):
        super().send(event, data, client_id)
        if event == mp.REQUEST_EVENT and self.choose is not None:
            action, selected = self.choose(data)
            threading.Timer(0.01, lambda: self.broker.answer(
                {"token": data["token"], "prompt_id": data["prompt_id"], "client_id": client_id, "action": action,
                 "selected": selected})).start()


def auto_reward(choose, connected=True, client_id="tab1", **kw):
    page = AutoPage(choose, connected)
    broker = make_broker(page)
    page.broker = broker
    info = mp.RunInfo(prompt_id="p1", node_id="9", client_id=client_id)
    return mp.ManualPickReward(broker, run_info=lambda: info, **kw), page


def test_pick_scores():
    assert mp.pick_scores([2, 0], 4).tolist() == [1, 0, 1, 0]
    assert mp.pick_scores([2, 0], 4, "ranked").tolist() == [0.5, 0, 1, 0]
    assert mp.pick_scores([], 3).tolist() == [0, 0, 0]


def test_one_grid_per_batch_item_labelled_with_step_and_prompt():
    reward, page = auto_reward(lambda d: ("submit", [d["item"]]), question="which is red?")
    images = torch.rand(6, 8, 8, 3)                      # K=3 candidates x B=2 items, candidate-major
    context = base.ScoringContext(groups=(0, 1, 0, 1, 0, 1), step=3, steps=10)
    scores = reward(images, ["a", "b"] * 3, context)
    assert scores.tolist() == [1, 0, 0, 1, 0, 0]          # item 0 picked its candidate 0, item 1 its candidate 1
    sent = page.requests()
    assert [(d["item"], d["items"], d["k"], d["prompt"], d["step"], d["steps_left"], d["seq"]) for d in sent] == \
        [(0, 2, 3, "a", 3, 6, 1), (1, 2, 3, "b", 3, 6, 2)]
    assert sent[0]["question"] == "which is red?" and sent[0]["node_id"] == "9"


def test_ranked_mode():
    reward, _ = auto_reward(lambda d: ("submit", [3, 1]), mode="ranked")
    assert reward(torch.rand(4, 4, 4, 3), None, base.ScoringContext(step=0, steps=2)).tolist() == [0, 0.5, 0, 1]


def test_ask_only_every_nth_step():
    reward, page = auto_reward(lambda d: ("submit", [0]), ask_every=3)
    asked = []
    for step in range(7):
        scores = reward(torch.rand(2, 4, 4, 3), None, base.ScoringContext(step=step, steps=7))
        asked.append(bool(scores.abs().sum() > 0))
    assert asked == [True, False, False, True, False, False, True] and len(page.requests()) == 3


def test_timeout_policy_uniform_and_no_more_asking_in_that_run():
    reward, page = auto_reward(None, connected=False, grace=0.05, on_timeout="uniform")
    for step in range(3):
        assert reward(torch.rand(4, 4, 4, 3), None, base.ScoringContext(step=step, steps=3)).tolist() == [0] * 4
    assert len(page.requests()) == 1          # gave up after the first unanswered request


def test_timeout_policy_fallback_reward():
    red = LinearColorReward.toward(RED)
    reward, page = auto_reward(None, client_id=None, on_timeout="fallback reward", fallback=red)
    images = torch.rand(4, 4, 4, 3)
    assert torch.allclose(reward(images, None, base.ScoringContext(groups=(0, 1, 0, 1))), red(images))
    assert page.events == []                  # no client id: nobody asked, nothing waited for


def test_timeout_policy_abort():
    reward, _ = auto_reward(None, client_id=None, on_timeout="abort")
    with pytest.raises(mp.ManualPickTimeout, match="abort"):
        reward(torch.rand(2, 4, 4, 3))


def test_cancel_raises_the_cancel_exception():
    reward, page = auto_reward(lambda d: ("cancel", []))
    with pytest.raises(mp.ManualPickCancelled):
        reward(torch.rand(2, 4, 4, 3))
    assert page.closes()[0]["reason"] == "cancelled"


def test_bad_settings_are_named():
    broker = mp.PickBroker()
    with pytest.raises(ValueError, match="no fallback reward is connected"):
        mp.ManualPickReward(broker, on_timeout="fallback reward")
    with pytest.raises(ValueError, match="ask_every"):
        mp.ManualPickReward(broker, ask_every=0)


def test_png_encoding_keeps_colours_and_caps_the_size():
    image = torch.zeros(600, 300, 3)
    image[..., 0] = 0.8
    picture = Image.open(io.BytesIO(mp.encode_png(image)))
    assert picture.size == (256, 512)
    assert np.allclose(np.asarray(picture)[..., 0], 204)


# ---- inside ComfyUI ------------------------------------------------------------------------------------------

def redness(png: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0
    return float(LinearColorReward.toward(RED)(torch.from_numpy(pixels)[None]).item())


def test_the_node_steers_demon_in_comfyui_executor(executor, monkeypatch):
    """The example workflow run by ComfyUI's executor; a helper thread plays the person and always picks the
    reddest candidate.  Picking steers: the results are redder than the same seed with nobody answering."""
    node = harness.pack_submodule("nodes.manual_pick")
    monkeypatch.setattr(node, "RECONNECT_GRACE", 1.0)
    broker = node.broker()
    graph = build_workflows.example_reference_manual_pick()
    graph["3"]["inputs"]["on_timeout"] = "uniform"
    items = 6   # the example's batch of 2 is too few to compare means on (one seed's luck decides)
    graph["2"]["inputs"]["batch_size"] = items
    seen, stop = [], threading.Event()

    def person():
        while not stop.is_set():
            req = broker.pending
            if req is not None and req.token not in {s[0] for s in seen}:
                pick = int(np.argmax([redness(p) for p in req.images]))
                seen.append((req.token, req.step, req.item, req.prompt_id, req.client_id))
                broker.answer({"token": req.token, "prompt_id": req.prompt_id, "client_id": req.client_id,
                               "selected": [pick]})
            time.sleep(0.005)

    original = broker.is_connected
    broker.is_connected = lambda client_id: True       # the executor's client "tests" has no websocket
    thread = threading.Thread(target=person)
    thread.start()
    try:
        steered = json.loads(executor.run(graph)["7"][0][0])
    finally:
        stop.set()
        thread.join(5)
        broker.is_connected = original
    assert [(s[1], s[2]) for s in seen] == [(step, item) for step in range(4) for item in range(items)]
    assert all(s[3] is not None and s[4] == "tests" for s in seen)      # the prompt id and the queuing client
    broker_events = [m for m in executor.messages if m[0] == mp.REQUEST_EVENT]
    assert len(broker_events) == 4 * items and broker_events[0][1]["node_id"] == "4"
    # nobody watching (the tab is gone): the policy applies after the grace period and the run completes
    t = time.monotonic()
    plain = json.loads(executor.run(graph)["7"][0][0])
    assert time.monotonic() - t < 30
    assert np.mean(steered["scores"]) > np.mean(plain["scores"]) + 0.05, (steered, plain)


def test_cancel_interrupts_the_run_cleanly(executor):
    node = harness.pack_submodule("nodes.manual_pick")
    broker = node.broker()
    graph = build_workflows.example_reference_manual_pick()
    stop = threading.Event()

    def person():
        while not stop.is_set():
            req = broker.pending
            if req is not None:
                broker.answer({"token": req.token, "prompt_id": req.prompt_id, "client_id": req.client_id,
                               "action": "cancel"})
                return
            time.sleep(0.005)

    original = broker.is_connected
    broker.is_connected = lambda client_id: True
    thread = threading.Thread(target=person)
    thread.start()
    try:
        with pytest.raises(RuntimeError):
            executor.run(graph)
    finally:
        stop.set()
        thread.join(5)
        broker.is_connected = original
    events = [m[0] for m in executor.messages]
    assert "execution_interrupted" in events and "execution_error" not in events
    assert broker.pending is None


# ---- the real server -----------------------------------------------------------------------------------------

def _request(server, path, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_routes_and_page_script_are_served(server):
    status, body = _request(server, "/reward_steering/manual_pick/answer",
                            {"token": "x", "prompt_id": "p", "client_id": "c", "selected": [0]})
    assert status == 409 and json.loads(body)["error"] == "stale"
    assert _request(server, "/api/reward_steering/manual_pick/answer", {"token": "x"})[0] == 409
    assert _request(server, "/reward_steering/manual_pick/image?token=x&index=0")[0] == 404
    status, body = _request(server, "/reward_steering/manual_pick/pending?client_id=c")
    assert status == 200 and json.loads(body) == {"request": None}
    assert "/extensions/comfyui-reward-steering/manual_pick.js" in server.get("/extensions")
    status, script = _request(server, "/extensions/comfyui-reward-steering/manual_pick.js")
    assert status == 200 and b"registerExtension" in script


def test_unattended_api_run_completes_with_the_fallback(server):
    """Queued over the API with no client id: nobody is asked, the fallback colour reward steers, no waiting."""
    graph = build_workflows.example_reference_manual_pick()
    prompt_id = server.post("/prompt", {"prompt": graph})["prompt_id"]
    t = time.monotonic()
    entry = server.wait(prompt_id, timeout=120)
    assert time.monotonic() - t < 60
    text = entry["outputs"]["7"]["scores"]
    assert len(text) == 2


def test_api_queued_runs_without_a_client_id_do_not_wait_for_a_page(server, capsys):
    """scripts/comfy_client.py queues without a client id unless given one, so no page is expected: the policy
    applies at once instead of after the 15 s reconnect grace (a made-up client id used to cost that grace).
    Bound: 10 s for the whole run, which takes about 1 s here; the grace alone is 15 s."""
    node = harness.pack_submodule("nodes.manual_pick")
    assert node.RECONNECT_GRACE == 15.0
    graph = build_workflows.example_reference_manual_pick()
    graph["3"]["inputs"]["on_timeout"] = "uniform"
    t = time.monotonic()
    entry = server.run(graph, timeout=120)
    seconds = time.monotonic() - t
    assert len(entry["outputs"]["7"]["scores"]) == 2 and seconds < 10, seconds
    assert "client_id" not in entry["prompt"][3]          # extra_data: queued without one
    graph["3"]["inputs"]["on_timeout"] = "abort"
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="abort"):
        server.run(graph, timeout=120)
    aborted = time.monotonic() - t
    with capsys.disabled():
        print(f"\nAPI-queued manual pick: uniform run {seconds:.1f} s, abort {aborted:.1f} s (grace 15 s)")
    assert aborted < 10


@pytest.mark.parametrize("name", ["timeout", "grace"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_times_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        mp.ManualPickReward(mp.PickBroker(), **{name: value})


def test_a_nan_timeout_on_the_node_is_refused_by_name(executor):
    """The node's timeout is an INT: ComfyUI itself refuses a NaN there, naming the input."""
    graph = build_workflows.example_reference_manual_pick()
    graph["3"]["inputs"]["timeout"] = float("nan")
    valid, _, _, node_errors = executor.validate(graph)
    assert not valid and node_errors["3"]["errors"][0]["extra_info"]["input_name"] == "timeout"
