"""Manual pick: a person chooses among the candidates in the ComfyUI page while a sampler waits.

The sampler calls the reward with K candidates for each of its B batch items (ScoringContext.groups).  For each
item in turn the reward posts one *request* -- the K images, the step, the prompt -- to the browser tab that
queued the run, and waits for the answer: the indices the person selected (in click order).  Selected
candidates score 1, the rest 0 ("pick"), or in "ranked" mode the first pick scores 1 and later picks less.

Never hang a queue, never take a click meant for something else:
  - one request at a time (a lock), each with a fresh random token; an answer counts only if its token, prompt
    id and client (tab) id match the request waiting now -- stale or foreign answers are refused, harmlessly;
  - the wait polls ComfyUI's interrupt flag, so the page's stop button ends it at once;
  - "Cancel" in the grid interrupts the run cleanly (the queue goes on with the next prompt);
  - a timeout applies a policy: a fallback reward, uniform scores (no preference), or abort the run;
  - unattended runs (queued over the API without a client id, or the tab is gone) apply the same policy
    without waiting (after a short grace period for a tab that reconnects); after a timeout the rest of that
    run does not ask again.

`PickBroker` is the waiting room (pure Python, no ComfyUI: unit-testable); the ComfyUI glue (events, routes,
executing context) lives in nodes/manual_pick.py.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .base import NO_CONTEXT, Reward, ScoringContext

LOG_PREFIX = "[reward-steering]"
MODES = ("pick", "ranked")
TIMEOUT_POLICIES = ("uniform", "fallback reward", "abort")
REQUEST_EVENT = "reward_steering.manual_pick"
CLOSE_EVENT = "reward_steering.manual_pick.close"
MAX_PREVIEW_SIDE = 512


class ManualPickTimeout(RuntimeError):
    """Nobody answered in time and the policy is 'abort'."""


class ManualPickCancelled(Exception):
    """The person pressed Cancel in the page (the ComfyUI glue turns this into an interrupt)."""


@dataclass
class PickRequest:
    """One grid shown to one tab: K candidates of one batch item at one step."""
    images: list[bytes]                 # PNG bytes, one per candidate
    prompt_id: str | None = None
    node_id: str | None = None          # the node asking (the sampler)
    client_id: str | None = None        # the tab that queued the run
    step: int | None = None             # 0-based
    steps: int | None = None
    item: int = 0                       # batch item (0-based) and number of items
    items: int = 1
    prompt: str = ""
    question: str = ""
    mode: str = "pick"
    timeout: float = 300.0
    seq: int = 1                        # request number within this run
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float | None = None        # time.time() when it was shown (set by PickBroker.ask)

    def payload(self, image_url: Callable[[str, int], str] | None = None, now: float | None = None) -> dict:
        """What the page receives (JSON): labels, the token, and where to fetch each image."""
        now = time.time() if now is None else now
        elapsed = 0.0 if self.started is None else max(0.0, now - self.started)
        url = image_url or (lambda token, i: f"/reward_steering/manual_pick/image?token={token}&index={i}")
        return {"token": self.token, "prompt_id": self.prompt_id, "node_id": self.node_id,
                "client_id": self.client_id, "step": self.step, "steps": self.steps,
                "steps_left": None if self.step is None or self.steps is None else self.steps - self.step - 1,
                "item": self.item, "items": self.items, "prompt": self.prompt, "question": self.question,
                "mode": self.mode, "k": len(self.images), "timeout": self.timeout, "seq": self.seq,
                "remaining": max(0.0, self.timeout - elapsed),   # seconds left (no clock shared with the page)
                "images": [url(self.token, i) for i in range(len(self.images))]}


@dataclass
class PickOutcome:
    kind: str                  # "answered" | "timeout" | "unattended" | "cancelled"
    selected: list[int] = field(default_factory=list)   # in the order the person picked them
    waited: float = 0.0


class PickBroker:
    """Holds the one request a person is being asked now and matches answers to it.

    send(event, data, client_id)   delivers an event to a tab (ComfyUI: PromptServer.send_sync)
    is_connected(client_id)        is that tab's websocket open now
    check_interrupt()              raises if the run was interrupted (ComfyUI's stop button)
    """

    def __init__(self, send: Callable[[str, dict, str | None], None] | None = None,
                 is_connected: Callable[[str], bool] | None = None,
                 check_interrupt: Callable[[], None] | None = None, poll: float = 0.1):
        self.send = send or (lambda event, data, client_id: None)
        self.is_connected = is_connected or (lambda client_id: False)
        self.check_interrupt = check_interrupt or (lambda: None)
        self.poll = poll
        self._turn = threading.Lock()        # one request at a time, first come first served
        self._state = threading.Lock()       # guards `pending` and the answer
        self.pending: PickRequest | None = None
        self._answered = threading.Event()
        self._answer: tuple[str, list[int]] | None = None
        self.log: list[tuple[str, str]] = []  # (token, what happened): for tests and debugging

    # ---- the sampler's side --------------------------------------------------------------------------------
    def ask(self, request: PickRequest, grace: float = 5.0) -> PickOutcome:
        """Show `request` to its tab and wait for the answer, the timeout, an interrupt, or the tab leaving.
        A run without a client id cannot be answered: 'unattended' at once.  A tab that is not connected gets
        `grace` seconds to (re)connect.  Raises whatever check_interrupt raises (the request is withdrawn)."""
        if request.client_id is None:
            self.log.append((request.token, "unattended"))
            return PickOutcome("unattended")
        with self._turn:
            with self._state:
                request.started = time.time()
                self.pending = request
                self._answer = None
                self._answered.clear()
            start = time.monotonic()
            reason = "withdrawn"
            try:
                self.send(REQUEST_EVENT, request.payload(), request.client_id)
                away_since = None
                while True:
                    self.check_interrupt()
                    if self._answered.wait(self.poll):
                        action, selected = self._answer
                        reason = "cancelled" if action == "cancel" else "answered"
                        return PickOutcome(reason, selected, time.monotonic() - start)
                    now = time.monotonic()
                    if self.is_connected(request.client_id):
                        away_since = None
                    elif away_since is None:
                        away_since = now
                    if away_since is not None and now - away_since >= min(grace, request.timeout):
                        reason = "unattended"
                        return PickOutcome("unattended", [], now - start)
                    if now - start >= request.timeout:
                        reason = "timeout"
                        return PickOutcome("timeout", [], now - start)
            finally:
                with self._state:
                    self.pending = None
                self.log.append((request.token, reason))
                try:
                    self.send(CLOSE_EVENT, {"token": request.token, "prompt_id": request.prompt_id,
                                            "reason": reason}, request.client_id)
                except Exception:  # the tab may be gone; the run goes on
                    pass

    # ---- the page's side -----------------------------------------------------------------------------------
    def answer(self, data) -> tuple[int, dict]:
        """An answer from a page: {token, prompt_id, client_id, action: submit|cancel, selected: [indices]}.
        Returns (HTTP status, JSON body).  Only an answer matching the waiting request is taken."""
        if not isinstance(data, dict):
            return 400, {"ok": False, "error": "expected a JSON object"}
        action = data.get("action", "submit")
        if action not in ("submit", "cancel"):
            return 400, {"ok": False, "error": f"action must be 'submit' or 'cancel', got {action!r}"}
        selected = data.get("selected", [])
        if action == "cancel":
            selected = []
        if not isinstance(selected, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                     for i in selected):
            return 400, {"ok": False, "error": "selected must be a list of candidate indices"}
        with self._state:
            request = self.pending
            if (request is None or data.get("token") != request.token or self._answered.is_set()
                    or data.get("prompt_id") != request.prompt_id or data.get("client_id") != request.client_id):
                self.log.append((str(data.get("token")), "refused stale or foreign answer"))
                return 409, {"ok": False, "error": "stale", "detail": "no request with this token is waiting for "
                                                                      "this tab; the answer was ignored"}
            k = len(request.images)
            if len(set(selected)) != len(selected) or any(not 0 <= i < k for i in selected):
                return 400, {"ok": False, "error": f"selected must be distinct indices in 0..{k - 1}"}
            self._answer = (action, list(selected))
            self._answered.set()
        return 200, {"ok": True}

    def pending_for(self, client_id: str | None) -> dict | None:
        """The waiting request's payload if it belongs to this tab (a reloaded page shows it again)."""
        with self._state:
            request = self.pending
            if request is None or client_id is None or request.client_id != client_id:
                return None
            return request.payload()

    def image(self, token: str, index: int) -> bytes | None:
        with self._state:
            request = self.pending
            if request is None or request.token != token or not 0 <= index < len(request.images):
                return None
            return request.images[index]


def encode_png(image: torch.Tensor, max_side: int = MAX_PREVIEW_SIDE) -> bytes:
    """[H, W, 3] float in [0, 1] -> PNG bytes, downscaled so the longer side is at most max_side."""
    import numpy as np
    from PIL import Image
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    picture = Image.fromarray(array)
    if max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def pick_scores(selected: Sequence[int], k: int, mode: str = "pick") -> torch.Tensor:
    """Scores [k]: pick -> selected 1, others 0; ranked -> the j-th pick of n scores (n - j) / n, others 0.
    Nothing selected -> all 0 (no preference)."""
    scores = torch.zeros(k)
    n = len(selected)
    for position, index in enumerate(selected):
        scores[index] = 1.0 if mode == "pick" else (n - position) / n
    return scores


@dataclass(frozen=True)
class RunInfo:
    """Who is asking: the running prompt, the node executing it, the tab that queued it."""
    prompt_id: str | None = None
    node_id: str | None = None
    client_id: str | None = None


class ManualPickReward(Reward):
    """The person's picks as a reward.  See the module docstring."""
    name = "manual pick"
    compares_candidates = True
    video = None    # the page shows still images: a person would pick frames, not clips

    def __init__(self, broker: PickBroker, question: str = "", mode: str = "pick", ask_every: int = 1,
                 timeout: float = 300.0, on_timeout: str = "uniform", fallback: Reward | None = None,
                 run_info: Callable[[], RunInfo] | None = None, grace: float = 5.0,
                 cancelled: Callable[[], BaseException] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_timeout not in TIMEOUT_POLICIES:
            raise ValueError(f"on_timeout must be one of {TIMEOUT_POLICIES}, got {on_timeout!r}")
        if on_timeout == "fallback reward" and fallback is None:
            raise ValueError("on_timeout is 'fallback reward' but no fallback reward is connected: connect one "
                             "(e.g. a Colour Reward) or choose 'uniform' or 'abort'")
        if ask_every < 1:
            raise ValueError(f"ask_every must be at least 1, got {ask_every}")
        for what, value in (("timeout", timeout), ("grace", grace)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"manual pick: {what} must be a finite number of seconds, got {value!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if grace < 0:
            raise ValueError(f"manual pick: grace must be >= 0 seconds, got {grace}")
        self.broker = broker
        self.question = question
        self.mode = mode
        self.ask_every = int(ask_every)
        self.timeout = float(timeout)
        self.on_timeout = on_timeout
        self.fallback = fallback
        self.run_info = run_info or RunInfo
        self.grace = grace
        self.cancelled = cancelled or (lambda: ManualPickCancelled("the person cancelled the run in the page"))
        self.needs_prompt = False
        self._given_up: set[str] = set()     # prompt ids whose person did not answer: do not ask again
        self._asked: dict[str | None, int] = {}
        self.name = f"manual pick ({mode}" + (f", every {ask_every} steps" if ask_every > 1 else "") + ")"

    def describe(self) -> str:
        return self.name

    def asks_at(self, context: ScoringContext) -> bool:
        return context.step is None or context.step % self.ask_every == 0

    def _policy_scores(self, images, prompts, context, members, why: str) -> torch.Tensor:
        if self.on_timeout == "abort":
            raise ManualPickTimeout(f"manual pick: {why}, and on_timeout is 'abort': the run stops. Choose "
                                    "'uniform' or 'fallback reward' to let unattended runs finish.")
        if self.on_timeout == "uniform":
            return torch.zeros(len(members))
        sub_prompts = [prompts[i] for i in members] if prompts is not None else None
        sub_context = ScoringContext(groups=None, step=context.step, steps=context.steps)
        return self.fallback(images[members], sub_prompts, sub_context).detach().float().cpu()

    def score(self, images, prompts=None, context: ScoringContext = NO_CONTEXT) -> torch.Tensor:
        n = images.shape[0]
        scores = torch.zeros(n)
        if not self.asks_at(context):
            return scores           # flat: the sampler treats it as "no preference" at this step
        info = self.run_info()
        groups = context.group_indices(n)
        for item, members in enumerate(groups):
            if len(members) < 2:
                continue            # one candidate: nothing to choose
            index = torch.tensor(members)
            if info.prompt_id is not None and info.prompt_id in self._given_up:
                scores[index] = self._policy_scores(images, prompts, context, members, "nobody answered earlier "
                                                                                       "in this run")
                continue
            self._asked[info.prompt_id] = self._asked.get(info.prompt_id, 0) + 1
            request = PickRequest(images=[encode_png(images[i]) for i in members], prompt_id=info.prompt_id,
                                  node_id=info.node_id, client_id=info.client_id, step=context.step,
                                  steps=context.steps, item=item, items=len(groups),
                                  prompt=str(prompts[members[0]]) if prompts else "", question=self.question,
                                  mode=self.mode, timeout=self.timeout, seq=self._asked[info.prompt_id])
            outcome = self.broker.ask(request, grace=self.grace)
            if outcome.kind == "answered":
                scores[index] = pick_scores(outcome.selected, len(members), self.mode)
            elif outcome.kind == "cancelled":
                raise self.cancelled()
            else:
                why = (f"nobody answered within {self.timeout:g} s" if outcome.kind == "timeout" else
                       "no browser tab is watching this run (queued without a client id, or the tab closed)")
                logging.warning("%s manual pick: %s; applying on_timeout=%r for the rest of this run",
                                LOG_PREFIX, why, self.on_timeout)
                if info.prompt_id is not None:
                    self._given_up.add(info.prompt_id)
                scores[index] = self._policy_scores(images, prompts, context, members, why)
        return scores

