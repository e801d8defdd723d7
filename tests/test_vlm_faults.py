"""VLM reward transport against a misbehaving server: a raw-socket server on 127.0.0.1 (started here) that trickles
headers or bodies, never closes, sends huge bodies or redirects.  Each reward call must end by its deadline and
use no late answer; huge bodies are refused unread; redirects are failures.  Plus the pasted-key guard and
non-finite float inputs through ComfyUI (in-process executor and a real server)."""
from __future__ import annotations

import copy
import json
import math
import random
import socketserver
import string
import threading
import time
import tracemalloc
from collections import deque

import pytest
import requests

import harness
from test_vlm import (SHADES, ConstantReward, completion, demon_vlm_prompt, make_reward, node_dirs,  # noqa: F401
                      scripted, solid, vlm_server)

base = harness.pack_submodule("rewards.base")
vlm = harness.pack_submodule("rewards.vlm")
vlm_client = harness.pack_submodule("rewards.vlm_client")

LATE_ANSWER = completion('{"score": 10}')   # reward 1.0: a call that returns 1.0 used the late answer
# A reward call ends by its deadline plus this: DEADLINE_GRACE (0.5 s) and thread scheduling on a loaded 2-core
# machine.  The slow replies below last 6 s, so the old transport (no wall-clock bound) overshoots by seconds.
SLACK = 1.0
SLOW_FOR = 6.0


# ---- the fault server ----------------------------------------------------------------------------------------

def _send(wfile, data: bytes) -> None:
    wfile.write(data)
    wfile.flush()


def trickle_body(handler, seconds=SLOW_FOR):
    """Headers at once, then the body a byte at a time over `seconds` (each read gets data: never a read timeout)."""
    _send(handler.wfile, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(LATE_ANSWER))
    for i in range(len(LATE_ANSWER)):
        time.sleep(seconds / len(LATE_ANSWER))
        _send(handler.wfile, LATE_ANSWER[i:i + 1])


def slow_headers(handler, seconds=SLOW_FOR):
    """The status line, then one header a byte at a time over `seconds`, then the answer."""
    _send(handler.wfile, b"HTTP/1.1 200 OK\r\nX-Pad: ")
    for _ in range(60):
        time.sleep(seconds / 60)
        _send(handler.wfile, b"a")
    _send(handler.wfile, b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(LATE_ANSWER)
          + LATE_ANSWER)


def never_closing(handler, seconds=SLOW_FOR):
    """A body without a length (it ends when the connection closes): the answer at once, then a space every 50 ms
    for `seconds` (stands for a connection that never closes; the test server must end some time)."""
    _send(handler.wfile, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
          + LATE_ANSWER)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        _send(handler.wfile, b" ")


def huge(size, with_length=True):
    """A chat completion of `size` bytes (its content a long text), sent as fast as the client reads."""
    def reply(handler):
        head = b'{"choices": [{"message": {"role": "assistant", "content": "'
        tail = b'"}}]}'
        filler = size - len(head) - len(tail)
        headers = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        headers += b"Content-Length: %d\r\n\r\n" % size if with_length else b"Connection: close\r\n\r\n"
        _send(handler.wfile, headers + head)
        block = b"score 7 " * (2 ** 17)   # 1 MiB
        while filler > 0:
            _send(handler.wfile, block[:filler])
            filler -= len(block)
        _send(handler.wfile, tail)
    return reply


def redirect(status):
    def reply(handler):
        _send(handler.wfile, b"HTTP/1.1 %d Moved\r\nLocation: /v1/elsewhere/chat/completions\r\n"
                             b"Content-Length: 0\r\n\r\n" % status)
    return reply


def answer(handler):
    _send(handler.wfile, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
          % len(LATE_ANSWER) + LATE_ANSWER)


class FaultServer:
    """One scripted reply per request (a function writing raw HTTP), else `default`.  Records (method, path) of
    each request, and how each reply ended: "sent", or "cut" when the client hung up first."""

    def __init__(self):
        self.script: deque = deque()
        self.default = answer
        self.requests: list[tuple[str, str]] = []
        self.ended: list[str | None] = []
        self.generation = 0   # bumped by reset(): a reply still running from an earlier test records nothing
        self.lock = threading.Lock()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode("latin-1").split()
                if len(line) < 2:
                    return
                length = 0
                while True:
                    header = self.rfile.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.rfile.read(length)
                with owner.lock:
                    owner.requests.append((line[0], line[1]))
                    owner.ended.append(None)
                    index, generation = len(owner.ended) - 1, owner.generation
                    reply = owner.script.popleft() if owner.script else owner.default
                try:
                    reply(self)
                    ended = "sent"
                except OSError:   # the client hung up (BrokenPipe, ConnectionReset)
                    ended = "cut"
                with owner.lock:
                    if generation == owner.generation:
                        owner.ended[index] = ended

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reset(self):
        with self.lock:
            self.script.clear()
            self.requests.clear()
            self.ended.clear()
            self.generation += 1
        self.default = answer

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fault_server():
    srv = FaultServer()
    yield srv
    srv.close()


@pytest.fixture
def faults(fault_server):
    fault_server.reset()
    yield fault_server
    fault_server.reset()


def policy_reward(server, policy, **over):
    fallback = ConstantReward() if policy == "fallback" else None
    return make_reward(server, failure=policy, fallback=fallback, **over)


def check_policy(reward, policy, images):
    """Runs the reward call under `policy`; returns (seconds, error message or None).  The answer the server
    trickled in scores 1.0: it must not be used."""
    started = time.monotonic()
    if policy == "fail":
        with pytest.raises(vlm_client.VLMError) as info:
            reward(images)
        return time.monotonic() - started, str(info.value)
    scores = reward(images).tolist()
    seconds = time.monotonic() - started
    assert scores == ([0.5] if policy == "neutral" else [100.0]), scores
    return seconds, None


# ---- D1: wall-clock bounds -------------------------------------------------------------------------------------

SLOW_REPLIES = {"trickle_body": trickle_body, "slow_headers": slow_headers, "never_closing": never_closing}


@pytest.mark.parametrize("policy", ["fail", "neutral", "fallback"])
@pytest.mark.parametrize("kind", list(SLOW_REPLIES))
def test_a_slow_server_cannot_hold_a_reward_call_past_its_deadline(faults, kind, policy, capsys):
    """timeout 1 s, deadline 2.5 s, retries allowed: every attempt is cut at 1 s, the call ends by the deadline,
    and the answer (complete after 6 s) is never used."""
    faults.default = SLOW_REPLIES[kind]
    deadline = 2.5
    reward = policy_reward(faults, policy, timeout=1.0, deadline=deadline, max_retries=10)
    seconds, message = check_policy(reward, policy, solid([SHADES[3]]))
    with capsys.disabled():
        print(f"\n{kind}, {policy}: reward call {seconds:.2f} s (deadline {deadline} s)")
    assert seconds <= deadline + SLACK
    assert 2 <= reward.counters.calls <= 4      # attempts of <= 1 s each, cut by the watch, then the deadline
    if message is not None:
        assert "timeout" in message and "deadline" in message and "127.0.0.1" in message


def test_the_timeout_bounds_one_whole_request(faults):
    """A body trickled over 6 s with timeout 1 s and no retries: the request ends after 1 s, not 6."""
    faults.default = trickle_body
    reward = make_reward(faults, timeout=1.0, deadline=60.0, max_retries=0)
    seconds, message = check_policy(reward, "fail", solid([SHADES[3]]))
    assert seconds <= 1.0 + SLACK and "no complete answer within 1 s" in message
    time.sleep(0.5)
    assert faults.ended == ["cut"]    # the client hung up at 1 s: the connection does not linger


def test_a_request_stuck_anywhere_does_not_hold_the_reward_call(faults, monkeypatch):
    """Even where no socket can be shut (here: the POST blocks in the client, like a DNS lookup that hangs), the
    reward call stops waiting at its deadline and applies its policy."""
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(10)
        raise requests.ConnectionError("released")
    reward = make_reward(faults, failure="neutral", timeout=30.0, deadline=1.5, max_retries=0)
    monkeypatch.setattr(reward.client.session, "post", stuck)
    try:
        seconds, _ = check_policy(reward, "neutral", solid([SHADES[3]]))
    finally:
        release.set()
    assert seconds <= 1.5 + SLACK


# ---- D2: the size cap ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "streamed"])
def test_a_huge_answer_is_refused_unread(faults, with_length):
    faults.script.append(huge(20 * 2 ** 20, with_length))
    reward = make_reward(faults, timeout=30.0, deadline=60.0)
    tracemalloc.start()
    try:
        seconds, message = check_policy(reward, "fail", solid([SHADES[3]]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "4 MiB cap" in message and "MAX_ANSWER_BYTES" in message and faults.url in message
    assert reward.counters.calls == 1            # not retried, not re-asked
    assert seconds < 5.0                         # the old transport read all 20 MB, twice
    assert peak < 3 * vlm_client.MAX_ANSWER_BYTES, peak
    faults.script.append(huge(vlm_client.MAX_ANSWER_BYTES - 1024, with_length))  # under the cap: read, used
    assert make_reward(faults)(solid([SHADES[3]])).tolist() == pytest.approx([0.7])   # "score 7 score 7 ..."


# ---- redirects -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failure_and_is_not_followed(faults, status):
    faults.script.append(redirect(status))
    with pytest.raises(vlm_client.VLMError) as info:
        make_reward(faults)(solid([SHADES[3]]))
    message = str(info.value)
    assert f"HTTP {status} redirect" in message and "/v1/elsewhere/chat/completions" in message
    assert "not followed" in message and "base_url" in message
    assert faults.requests == [("POST", "/v1/chat/completions")]   # nothing sent to the new address
    faults.reset()
    faults.script.append(redirect(status))
    assert make_reward(faults, failure="neutral")(solid([SHADES[3]])).tolist() == [0.5]


# ---- D3: a key pasted into api_key_env ---------------------------------------------------------------------------

def key_shapes() -> dict:
    """Keys that are letters, digits and underscores only, so they pass for a variable name by their characters."""
    rng = random.Random(2024)
    b62 = string.ascii_letters + string.digits
    pick = lambda chars, n: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    return {"groq": "gsk_" + pick(b62, 52), "huggingface": "hf_" + pick(string.ascii_letters, 34),
            "github": "ghp_" + pick(b62, 36), "hex": "f" + pick("0123456789abcdef", 39),
            "aws_id": "AKIA" + pick(string.ascii_uppercase + string.digits, 16)}


KEYS = key_shapes()
NAMES = ["OPENAI_API_KEY", "MY_OPENROUTER_KEY_2", "HF_TOKEN", "hf_token", "GROQ_API_KEY", "GEMINI_API_KEY",
         "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_OPENAI_API_KEY", "sk_api_key", "_X"]


@pytest.mark.parametrize("name", NAMES)
def test_variable_names_are_accepted(name):
    assert vlm_client.plausible_env_name(name)
    assert vlm.api_key_env_problem(name) is None


@pytest.mark.parametrize("kind", list(KEYS))
def test_key_shapes_are_refused_in_the_executor_without_echo(executor, scripted, node_dirs, kind, caplog):
    key = KEYS[kind]
    prompt = demon_vlm_prompt(scripted.url, batch=1, steps=2, k=2, vlm_over={"api_key_env": key})
    with caplog.at_level("DEBUG"):
        valid, error, _, node_errors = executor.validate(prompt)
        with pytest.raises(ValueError) as info:
            executor.run(prompt)
    assert not valid and node_errors["3"]["errors"][0]["extra_info"]["input_name"] == "api_key_env"
    assert "NAME of an environment variable" in json.dumps(node_errors)
    texts = [json.dumps(error), json.dumps(node_errors), str(info.value)] + [r.getMessage() for r in caplog.records]
    assert not any(key in text or key[4:20] in text for text in texts)
    assert not scripted.requests
    assert not vlm_client.plausible_env_name(key)


def test_key_shapes_never_reach_the_queue_history_or_log_of_a_server(server, scripted):
    """Queued over HTTP: /prompt refuses each prompt (HTTP 400, the message names api_key_env only), so the key is
    in no history entry, queue or log line.  (The old check let these through: the run failed on the endpoint's
    401 with "environment variable <the key> is not set" and the prompt, key included, stayed in /history.)"""
    scripted.script.extend([{"status": 401, "message": "Incorrect API key provided"}] * 20)
    for kind, key in KEYS.items():
        prompt = demon_vlm_prompt(scripted.url, batch=1, steps=2, k=2, vlm_over={"api_key_env": key, "cache": False})
        with pytest.raises(RuntimeError) as info:
            server.post("/prompt", {"prompt": prompt})
        assert "HTTP 400" in str(info.value) and "api_key_env" in str(info.value), kind
        assert key not in str(info.value) and key[4:20] not in str(info.value), kind
    time.sleep(0.5)
    texts = [json.dumps(server.get("/history")), json.dumps(server.get("/queue")),
             server.log_path.read_text(errors="replace")]
    for key in KEYS.values():
        assert not any(key in text or key[4:20] in text for text in texts)
    assert not scripted.requests


# ---- D5: non-finite floats ---------------------------------------------------------------------------------------

def names_non_finite(message: str, name: str) -> bool:
    """The error of the reward's own check, or of the pack's check on every node's FLOAT inputs (which runs first
    when the node is executed by ComfyUI): either names the input."""
    return (f"{name} must be a finite number" in message
            or f"the input '{name}' is nan; it must be a finite number" in message)


@pytest.mark.parametrize("name", ["deadline", "timeout", "max_score"])
def test_non_finite_float_inputs_are_named_in_the_executor(executor, scripted, node_dirs, name):
    prompt = demon_vlm_prompt(scripted.url, batch=1, steps=2, k=2, vlm_over={name: math.nan, "cache": False})
    with pytest.raises(RuntimeError) as info:
        executor.run(prompt, want=("4",))
    assert names_non_finite(str(info.value), name)
    assert not scripted.requests
    for value in (math.inf, -math.inf):
        with pytest.raises(base.RewardInputError, match=f"{name} must be a finite number"):
            make_reward(scripted, **{name: value})


def test_nan_deadline_over_the_api_is_refused_with_its_name(server, scripted):
    """NaN travels in a JSON prompt (Python's json writes NaN, ComfyUI's aiohttp reads it) and passes ComfyUI's
    min/max checks (every comparison with NaN is false); it used to switch the deadline off."""
    prompt = demon_vlm_prompt(scripted.url, batch=1, steps=2, k=2, vlm_over={"deadline": math.nan, "cache": False})
    prompt_id = server.post("/prompt", {"prompt": prompt})["prompt_id"]
    with pytest.raises(RuntimeError):
        server.wait(prompt_id, timeout=120)
    messages = server.get(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]
    (error,) = [m[1] for m in messages if m[0] == "execution_error"]
    assert names_non_finite(error["exception_message"], "deadline") and error["node_id"] == "3"
    assert not scripted.requests
