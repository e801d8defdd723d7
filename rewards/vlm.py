"""A reward from a vision-language model behind any OpenAI-compatible chat-completions endpoint (OpenAI, Gemini's
OpenAI-compatible endpoint, OpenRouter, a local vLLM / Ollama / LM Studio server).

Modes (every mode gives rewards in [0, 1]; candidates are compared only within their group of the ScoringContext):
  rubric              each image gets a number 0..max_score from the rubric (images_per_call > 1: several images
                      per request as a labelled grid, one score each); reward = score / max_score.
                      Requests per group of K: ceil(K / images_per_call).
  pairwise_top_half   the paper's tournament: the top half of each group gets 1, the rest 0.  Found exactly (for
                      a consistent judge) by quickselect on pairwise comparisons: a pivot is compared with all
                      other candidates in one parallel round, then only the side holding the boundary goes on.
                      The pivot is the median of three candidates (its comparisons are re-used).  Requests per
                      group, mean (max) over 4000 random orders: K=4 3.7 (4), K=8 11.3 (18), K=16 29.1 (60).
  pairwise_knockout   one knockout round: candidates paired off, each winner gets 1, each loser 0 (an odd one out
                      gets 0.5).  K / 2 requests per group in a single round; the cheapest pairwise judgement.
  ranking             one labelled grid of the whole group per request; the model returns an order, and the reward
                      is linear in rank (best 1, worst 0).  One request per group.

Reliability: requests go through a thread pool (`concurrency` at a time) and a sliding-window requests-per-minute
limiter; 429, 5xx, timeouts, connection errors and unreadable bodies are retried with exponential backoff and
jitter, waiting at least what Retry-After says; every reward call has an overall deadline.  An answer that cannot be
parsed (or has the wrong number of scores) is asked again once, then counts as a failure.  A failure of any request
fails its group, which then follows the failure policy: 'fail' raises a clear error (the ComfyUI prompt fails, the
queue goes on), 'neutral' gives the group 0.5 with a logged warning, 'fallback' scores the group with another reward.

Cache: answers are stored as small JSON files keyed by sha256 of endpoint, model, mode and the full request text
(rubric, prompt, instructions) with each image replaced by the hash of its pixels; a re-queued workflow with the same
seed re-uses them (no requests, same images).  Only answers that parsed are stored.

API key: resolved at each reward call, never stored in the workflow: the environment variable whose *name* the
user gives, else a JSON file (default `<ComfyUI user dir>/reward_steering/vlm_keys.json`) mapping a base URL, a
host[:port] or "*" to a key.  No key: no Authorization header (local servers).  The key never appears in messages,
logs or the cache: every text this module produces from server replies is scrubbed of it.
"""
from __future__ import annotations

import base64
import hashlib
import io as _io
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from email.utils import parsedate_to_datetime
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw, ImageFont

from .base import NO_CONTEXT, Reward, RewardInputError, ScoringContext

LOG = logging.getLogger(__name__)
LOG_PREFIX = "[reward-steering]"

MODES = ("rubric", "pairwise_top_half", "pairwise_knockout", "ranking")
FAILURE_POLICIES = ("fail", "neutral", "fallback")
STRUCTURED = ("auto", "off")
NEUTRAL = 0.5
KEY_FILE_NAME = os.path.join("reward_steering", "vlm_keys.json")
DEFAULT_RUBRIC = ("How well does the image match the prompt, and how good is it as a picture (composition, detail, "
                  "no artefacts)?")
SYSTEM_PROMPT = ("You are a careful, consistent judge of images. Follow the instructions exactly and answer only "
                 "with the JSON object requested, no other text.")
CACHE_VERSION = 1


class VLMError(RuntimeError):
    """The endpoint could not give a usable answer; the message names the host, the model and the problem."""


class VLMAnswerError(ValueError):
    """The model answered, but not in a form that gives the scores asked for."""


# ---- configuration and the API key ----------------------------------------------------------------------------

def normalise_base_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RewardInputError(f"VLM base URL must look like https://api.openai.com/v1 or http://127.0.0.1:8000/v1, "
                               f"got {url!r}")
    if parts.username or parts.password:
        raise RewardInputError("VLM base URL must not contain a user name or password: put the API key in an "
                               "environment variable or the key file")
    return url


def endpoint_host(base_url: str) -> str:
    return urlsplit(base_url).netloc


def resolve_api_key(env_var: str, base_url: str, key_file: str | None) -> tuple[str | None, str]:
    """(key or None, where it came from, for messages).  The environment variable named `env_var` wins; else
    `key_file`, a JSON object mapping a base URL, host[:port], host or "*" to a key."""
    env_var = (env_var or "").strip()
    if env_var:
        value = os.environ.get(env_var, "").strip()
        if value:
            return value, f"environment variable {env_var}"
    if key_file and os.path.isfile(key_file):
        try:
            with open(key_file, encoding="utf-8") as f:
                table = json.load(f)
        except json.JSONDecodeError as e:
            raise VLMError(f"the VLM key file {key_file} is not valid JSON (line {e.lineno}, column {e.colno}); "
                           'it should look like {"https://api.openai.com/v1": "sk-...", "*": "..."}') from None
        except OSError as e:
            raise VLMError(f"cannot read the VLM key file {key_file}: {type(e).__name__}") from None
        if not isinstance(table, dict):
            raise VLMError(f"the VLM key file {key_file} must hold a JSON object mapping base URLs or hosts to keys")
        parts = urlsplit(base_url)
        for candidate in (base_url, base_url + "/", parts.netloc, parts.hostname or "", "*"):
            value = table.get(candidate)
            if isinstance(value, str) and value.strip():
                return value.strip(), f"key file {key_file} (entry {candidate!r})"
    return None, "no key" + (f" (environment variable {env_var} is not set)" if env_var else "")


class Scrubber:
    """Removes a secret (and any 8+ character piece of it) from text."""

    def __init__(self, secret: str | None):
        self.secret = secret or ""

    def __call__(self, text: str) -> str:
        text = str(text)
        s = self.secret
        if len(s) < 4:
            return text
        text = text.replace(s, "[redacted]")
        if len(s) >= 8:
            def redact(m):
                token = m.group(0)
                if any(s[i:i + 8] in token for i in range(len(s) - 7)):
                    return "[redacted]"
                return token
            text = re.sub(r"[^\s\"'<>,;:=()\[\]{}]{8,}", redact, text)
        return text


@dataclass
class VLMConfig:
    base_url: str
    model: str
    mode: str = "rubric"
    rubric: str = DEFAULT_RUBRIC
    api_key_env: str = "OPENAI_API_KEY"
    key_file: str | None = None
    max_score: float = 10.0
    images_per_call: int = 1
    image_size: int = 512
    failure: str = "fail"
    cache_dir: str | None = None      # None: no cache
    concurrency: int = 4
    requests_per_minute: float = 0.0  # 0: no limit
    max_retries: int = 4
    timeout: float = 60.0             # seconds per request
    deadline: float = 600.0           # seconds per reward call
    structured_output: str = "auto"
    answer_retries: int = 1           # re-asks after an unparseable answer
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    max_tokens: int = 512

    def __post_init__(self):
        self.base_url = normalise_base_url(self.base_url)
        self.model = (self.model or "").strip()
        if not self.model:
            raise RewardInputError("VLM reward: give the model name the endpoint serves (e.g. gpt-4o-mini, "
                                   "gemini-2.0-flash, Qwen/Qwen2.5-VL-7B-Instruct)")
        for name, value, options in (("mode", self.mode, MODES), ("failure", self.failure, FAILURE_POLICIES),
                                     ("structured_output", self.structured_output, STRUCTURED)):
            if value not in options:
                raise RewardInputError(f"VLM reward: {name} must be one of {options}, got {value!r}")
        name = (self.api_key_env or "").strip()
        if name and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name) or name.lower().startswith("sk")
                     and len(name) > 24 or name.startswith("AIza")):
            raise RewardInputError("VLM reward: api_key_env takes the NAME of an environment variable (e.g. "
                                   "OPENAI_API_KEY), and this looks like a key itself. Remove it from the node - a "
                                   "saved workflow would carry it - and set the variable before starting ComfyUI, or "
                                   "use the key file in the user directory")
        if self.max_score <= 0:
            raise RewardInputError(f"VLM reward: max_score must be positive, got {self.max_score}")
        if self.images_per_call < 1 or self.concurrency < 1 or self.image_size < 16:
            raise RewardInputError("VLM reward: images_per_call and concurrency must be at least 1, image_size at "
                                   "least 16")
        if self.timeout <= 0 or self.deadline <= 0:
            raise RewardInputError("VLM reward: timeout and deadline must be positive (seconds)")


@dataclass
class Counters:
    calls: int = 0              # HTTP requests sent
    cache_hits: int = 0
    retries: int = 0            # transient failures retried (429, 5xx, timeouts, connection errors, bad bodies)
    bad_answers: int = 0        # answers that could not be parsed (re-asked or failed)
    failures: int = 0           # groups that fell to the failure policy
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0             # images scored
    reward_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts):
        with self.lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict:
        with self.lock:
            return {k: getattr(self, k) for k in ("calls", "cache_hits", "retries", "bad_answers", "failures",
                                                   "prompt_tokens", "completion_tokens", "images", "reward_calls")}


# ---- rate limiting ---------------------------------------------------------------------------------------------

class RateLimiter:
    """At most `per_minute` request starts in any 60 s window (0: unlimited).  Thread-safe."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.per_minute = int(per_minute) if per_minute and per_minute > 0 else 0
        self.clock = clock
        self.starts: deque[float] = deque()
        self.lock = threading.Lock()

    def delay(self) -> float:
        """Reserve a slot; seconds the caller must wait before starting (0 = now)."""
        if not self.per_minute:
            return 0.0
        with self.lock:
            now = self.clock()
            while self.starts and self.starts[0] <= now - 60.0:
                self.starts.popleft()
            if len(self.starts) < self.per_minute:
                self.starts.append(now)
                return 0.0
            start = self.starts[-self.per_minute] + 60.0  # when the oldest of the last `per_minute` leaves
            start = max(start, now)
            self.starts.append(start)
            return start - now


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d] for d = min(cap, base * 2^attempt)."""
    d = min(cap, base * (2 ** attempt))
    return d * (0.5 + 0.5 * rng.random())


# ---- images ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedImage:
    pil: Image.Image
    digest: str        # sha256 of the pixels sent (size + RGB bytes)

    @cached_property
    def data_url(self) -> str:  # encoded once, however many comparisons the image is in
        return png_data_url(self.pil)


def to_pil(image: torch.Tensor, size: int) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy())
    pil = Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")
    w, h = pil.size
    if max(w, h) > size:
        scale = size / max(w, h)
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return pil


def encode_image(image: torch.Tensor, size: int) -> EncodedImage:
    pil = to_pil(image, size)
    digest = hashlib.sha256(f"{pil.size}".encode() + pil.tobytes()).hexdigest()
    return EncodedImage(pil, digest)


def png_data_url(pil: Image.Image) -> str:
    buf = _io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


GRID_MAX_SIDE = 2048  # px; larger grids cost tokens and get downscaled by the providers anyway


def labelled_grid(images: Sequence[Image.Image], cell: int) -> Image.Image:
    """Images in a near-square grid, each scaled to fit `cell` px (less when the grid would pass GRID_MAX_SIDE),
    labelled 1..n in its top-left corner."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    while cell > 16 and cols * cell + (cols + 1) * max(4, cell // 64) > GRID_MAX_SIDE:
        cell -= 1
    gap = max(4, cell // 64)
    grid = Image.new("RGB", (cols * cell + (cols + 1) * gap, rows * cell + (rows + 1) * gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(max(12, cell // 8))
    for index, img in enumerate(images):
        r, c = divmod(index, cols)
        scale = cell / max(img.size)
        fitted = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.LANCZOS) \
            if scale < 1 or scale > 1 else img
        x0, y0 = gap + c * (cell + gap), gap + r * (cell + gap)
        grid.paste(fitted, (x0 + (cell - fitted.size[0]) // 2, y0 + (cell - fitted.size[1]) // 2))
        label = str(index + 1)
        box = draw.textbbox((0, 0), label, font=font)
        pad = max(3, cell // 48)
        draw.rectangle([x0, y0, x0 + box[2] - box[0] + 2 * pad, y0 + box[3] - box[1] + 2 * pad], fill=(0, 0, 0))
        draw.text((x0 + pad - box[0], y0 + pad - box[1]), label, fill=(255, 255, 255), font=font)
    return grid


# ---- parsing answers -------------------------------------------------------------------------------------------

_NUMBER = r"-?\d+(?:\.\d+)?"


def _json_values(text: str) -> list:
    """JSON values found in a model answer: the whole text, a fenced block, or the outermost {...} / [...]."""
    text = (text or "").strip()
    found = []
    candidates = [text]
    candidates += re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            found.append(json.loads(candidate))
        except (json.JSONDecodeError, ValueError):
            continue
    return found


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = re.search(_NUMBER, value)
        return float(m.group(0)) if m else None
    if isinstance(value, dict):
        for key in ("score", "value", "rating"):
            if key in value:
                return _as_number(value[key])
    return None


def parse_scores(text: str, n: int, max_score: float) -> list[float]:
    """n scores in 0..max_score from an answer (JSON preferred, then labelled or bare numbers)."""
    if not (text or "").strip():
        raise VLMAnswerError("the answer was empty")
    for value in _json_values(text):
        scores = None
        if isinstance(value, dict):
            lowered = {str(k).strip().lower(): v for k, v in value.items()}
            if isinstance(lowered.get("scores"), list):
                scores = [_as_number(v) for v in lowered["scores"]]
            elif n == 1 and "score" in lowered:
                scores = [_as_number(lowered["score"])]
            else:
                labelled = {}
                for key, v in lowered.items():
                    m = re.fullmatch(r"(?:image|img|picture)?[\s_#-]*(\d+)", key)
                    if m:
                        labelled[int(m.group(1))] = _as_number(v)
                if labelled:
                    scores = [labelled.get(i) for i in range(1, max(labelled) + 1)]
        elif isinstance(value, list):
            scores = [_as_number(v) for v in value]
        elif n == 1:
            scores = [_as_number(value)]
        if scores is not None:
            if len(scores) != n or any(s is None for s in scores):
                got = sum(s is not None for s in scores)
                raise VLMAnswerError(f"expected {n} score{'s' if n > 1 else ''}, the answer had {got}")
            return [min(max(s, 0.0), max_score) for s in scores]
    # free text
    m_max = re.escape(f"{max_score:g}")
    if n == 1:
        for pattern in (rf"({_NUMBER})\s*(?:/|out of)\s*{m_max}", rf"score\D{{0,20}}?({_NUMBER})"):
            m = re.search(pattern, text, flags=re.I)
            if m:
                return [min(max(float(m.group(1)), 0.0), max_score)]
    labelled = {}
    for m in re.finditer(rf"(?:image|img|picture|#)\s*(\d+)\s*(?:\)|:|=|-|–|is|scores?)?\s*:?\s*({_NUMBER})", text,
                         flags=re.I):
        labelled.setdefault(int(m.group(1)), float(m.group(2)))
    if set(labelled) >= set(range(1, n + 1)) and n > 1:
        return [min(max(labelled[i], 0.0), max_score) for i in range(1, n + 1)]
    stripped = re.sub(rf"(?:/|out of)\s*{m_max}", " ", text, flags=re.I)
    numbers = [float(x) for x in re.findall(_NUMBER, stripped)]
    if len(numbers) == n:
        return [min(max(s, 0.0), max_score) for s in numbers]
    raise VLMAnswerError(f"expected {n} score{'s' if n > 1 else ''}, could not read them from the answer "
                         f"({len(numbers)} numbers found)")


def parse_choice(text: str) -> int:
    """1 or 2: which of two images the answer prefers."""
    if not (text or "").strip():
        raise VLMAnswerError("the answer was empty")
    for value in _json_values(text):
        if isinstance(value, dict):
            lowered = {str(k).strip().lower(): v for k, v in value.items()}
            for key in ("better", "winner", "choice", "answer", "preferred", "best"):
                if key in lowered:
                    choice = _choice_value(lowered[key])
                    if choice is None:
                        raise VLMAnswerError(f"the answer's {key!r} was {str(lowered[key])[:40]!r}, not 1 or 2")
                    return choice
        else:
            choice = _choice_value(value)
            if choice is not None:
                return choice
    patterns = (r"(?:image|picture)\s*([12])\s*(?:is|was|looks|seems)\s*(?:clearly\s*)?(?:the\s*)?"
                r"(?:better|superior|preferred|winner|best)",
                r"(?:answer|winner|choice|better(?:\s*image)?|prefer(?:red)?|choose|pick)\s*(?:is|:)?\s*"
                r"(?:image|picture)?\s*#?\s*([12])\b")
    for pattern in patterns:
        m = re.search(pattern, text, flags=re.I)
        if m:
            return int(m.group(1))
    distinct = set(re.findall(r"(?<![\w.])([12])(?![\w.])", text))
    if len(distinct) == 1:
        return int(distinct.pop())
    raise VLMAnswerError("could not tell which image the answer prefers (expected 1 or 2)")


def _choice_value(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (1, 2):
        return int(value)
    if isinstance(value, str):
        v = value.strip().lower()
        words = {"first": 1, "a": 1, "left": 1, "second": 2, "b": 2, "right": 2}
        if v in words:
            return words[v]
        m = re.fullmatch(r"(?:image|picture)?\s*#?\s*([12])", v)
        if m:
            return int(m.group(1))
    return None


def parse_ranking(text: str, n: int) -> list[int]:
    """A best-first order of the labels 1..n (0-based indices returned)."""
    if not (text or "").strip():
        raise VLMAnswerError("the answer was empty")
    order = None
    for value in _json_values(text):
        items = None
        if isinstance(value, dict):
            lowered = {str(k).strip().lower(): v for k, v in value.items()}
            for key in ("ranking", "order", "rank", "ranked", "best_to_worst"):
                if isinstance(lowered.get(key), list):
                    items = lowered[key]
                    break
        elif isinstance(value, list):
            items = value
        if items is not None:
            order = []
            for item in items:
                number = _as_number(item)
                if number is None or number != int(number):
                    raise VLMAnswerError(f"the ranking holds {str(item)[:30]!r}, not an image label")
                order.append(int(number))
            break
    if order is None:
        mentions = re.findall(r"(?:image|picture|#)\s*(\d+)", text, flags=re.I)
        order = [int(x) for x in (mentions or re.findall(r"(?<![\w.])(\d+)(?![\w.])", text))]
    seen = []
    for label in order:
        if label not in seen:
            seen.append(label)
    if sorted(seen) != list(range(1, n + 1)):
        missing = sorted(set(range(1, n + 1)) - set(seen))
        extra = sorted(set(seen) - set(range(1, n + 1)))
        raise VLMAnswerError(f"expected a ranking of all {n} labels 1..{n}; "
                             + (f"missing {missing}" if missing else "") + (" and " if missing and extra else "")
                             + (f"unknown labels {extra}" if extra else ""))
    return [label - 1 for label in seen]


# ---- requests --------------------------------------------------------------------------------------------------

@dataclass
class Ask:
    """One request: the messages (images as data URLs), how to parse the answer, and the cache key."""
    messages: list
    schema: dict | None
    parse: Callable[[str], object]
    cache_key: str


def _schema(name: str, properties: dict) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": name, "strict": True,
                            "schema": {"type": "object", "properties": properties, "required": list(properties),
                                       "additionalProperties": False}}}


class VLMClient:
    """POSTs chat completions with retries, rate limits and a cache; thread-safe."""

    def __init__(self, config: VLMConfig, counters: Counters, sleep: Callable[[float, threading.Event], None] | None = None,
                 session: requests.Session | None = None, rng: random.Random | None = None):
        self.config = config
        self.counters = counters
        self.host = endpoint_host(config.base_url)
        self.url = config.base_url + "/chat/completions"
        self.limiter = RateLimiter(config.requests_per_minute)
        self.session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(4, config.concurrency))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.sleep = sleep or (lambda seconds, stop: stop.wait(seconds))
        self.rng = rng or random.Random()
        self.structured_supported = config.structured_output == "auto"
        self.token_param = "max_tokens"   # newer OpenAI models want max_completion_tokens
        self.send_temperature = True      # some reasoning models accept only their default temperature
        self.key: str | None = None
        self.key_source = "no key"
        self.scrub = Scrubber(None)

    def set_key(self, key: str | None, source: str) -> None:
        self.key, self.key_source, self.scrub = key, source, Scrubber(key)

    def what(self) -> str:
        return f"{self.host} (model {self.config.model})"

    # cache ------------------------------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> str | None:
        if not self.config.cache_dir:
            return None
        return os.path.join(self.config.cache_dir, key[:2], key + ".json")

    def cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            return entry["content"] if isinstance(entry.get("content"), str) else None
        except (OSError, ValueError, KeyError):
            return None

    def cache_put(self, key: str, content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "endpoint": self.config.base_url, "model": self.config.model,
                           "mode": self.config.mode, "content": self.scrub(content), "created": time.time()}, f)
            os.replace(tmp, path)
        except OSError as e:
            LOG.warning("%s VLM cache: cannot write %s (%s); going on without caching this answer", LOG_PREFIX,
                        path, type(e).__name__)

    # asking -----------------------------------------------------------------------------------------------------
    def answer(self, ask: Ask, deadline: float, stop: threading.Event):
        cached = self.cache_get(ask.cache_key)
        if cached is not None:
            try:
                result = ask.parse(cached)
                self.counters.add(cache_hits=1)
                return result
            except VLMAnswerError:
                pass  # an entry from an older parser: ask again
        problem = None
        for _ in range(1 + max(0, self.config.answer_retries)):
            content = self.post(ask, deadline, stop)
            try:
                result = ask.parse(content)
            except VLMAnswerError as e:
                self.counters.add(bad_answers=1)
                problem = e
                continue
            self.cache_put(ask.cache_key, content)
            return result
        excerpt = self.scrub(" ".join((content or "").split())[:200])
        raise VLMError(f"{self.what()} answered, but {problem} (answer: {excerpt!r}); asked "
                       f"{1 + max(0, self.config.answer_retries)} times")

    def _body(self, ask: Ask) -> dict:
        body = {"model": self.config.model, "messages": ask.messages, self.token_param: self.config.max_tokens}
        if self.send_temperature:
            body["temperature"] = 0
        if ask.schema is not None and self.structured_supported:
            body["response_format"] = ask.schema
        return body

    def post(self, ask: Ask, deadline: float, stop: threading.Event) -> str:
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        attempt = 0
        while True:
            if stop.is_set():
                raise VLMError(f"{self.what()}: the reward call was stopped")
            delay = self.limiter.delay()
            if delay > 0:
                if time.monotonic() + delay > deadline:
                    raise VLMError(f"{self.what()}: the requests-per-minute limit ({cfg.requests_per_minute:g}) "
                                   f"leaves no slot before the deadline of {cfg.deadline:g} s for this reward call")
                self.sleep(delay, stop)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VLMError(f"{self.what()}: the deadline of {cfg.deadline:g} s for this reward call passed")
            timeout = min(cfg.timeout, remaining)
            body = self._body(ask)
            retry_after = None
            try:
                self.counters.add(calls=1)
                response = self.session.post(self.url, json=body, headers=headers, timeout=(min(10.0, timeout), timeout))
            except requests.Timeout:
                problem = f"no answer within {timeout:.3g} s (timeout)"
            except requests.ConnectionError as e:
                problem = f"cannot connect ({type(e).__name__})"
            except requests.RequestException as e:
                raise VLMError(f"{self.what()}: request failed ({type(e).__name__})") from None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                        message = data["choices"][0]["message"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        text = response.text.strip()
                        problem = ("HTTP 200 with an empty body" if not text else
                                   "HTTP 200 but the body is not a chat completion (malformed JSON: "
                                   f"{self.scrub(' '.join(text.split())[:120])!r})")
                    else:
                        usage = data.get("usage") if isinstance(data, dict) else None
                        if isinstance(usage, dict):
                            self.counters.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                              completion_tokens=int(usage.get("completion_tokens") or 0))
                        return _message_text(message)
                elif status == 429 or status >= 500 or status == 408:
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                    problem = f"HTTP {status}{_reason(response, self.scrub)}"
                elif status in (400, 422) and self._adapt(body, response, status):
                    continue
                else:
                    raise VLMError(f"{self.what()}: HTTP {status}{_reason(response, self.scrub)}"
                                   f"{self._hint(status)}")
            if attempt >= cfg.max_retries:
                raise VLMError(f"{self.what()}: {problem}; gave up after {attempt} "
                               f"retr{'y' if attempt == 1 else 'ies'}" + self._hint_transient(problem))
            wait_s = backoff_delay(attempt, cfg.backoff_base, cfg.backoff_cap, self.rng)
            if retry_after is not None:
                wait_s = max(wait_s, retry_after)
            if time.monotonic() + wait_s > deadline:
                raise VLMError(f"{self.what()}: {problem}; the next retry (in {wait_s:.3g} s) would pass the deadline "
                               f"of {cfg.deadline:g} s for this reward call")
            self.counters.add(retries=1)
            LOG.debug("%s VLM %s: %s; retry %d in %.2f s", LOG_PREFIX, self.host, problem, attempt + 1, wait_s)
            self.sleep(wait_s, stop)
            attempt += 1

    def _adapt(self, body: dict, response, status: int) -> bool:
        """After a 400/422: drop or rename the optional parameter the endpoint objects to (each at most once, and
        remembered); True when the request should be sent again."""
        text = response.text.lower()
        change = None
        if "max_tokens" in body and "max_tokens" in text and "max_completion_tokens" in text:
            self.token_param, change = "max_completion_tokens", "max_tokens -> max_completion_tokens"
        elif "temperature" in body and "temperature" in text:
            self.send_temperature, change = False, "temperature dropped"
        elif "response_format" in body:  # servers word this one in many ways: any other 400 drops it
            self.structured_supported, change = False, "structured output (response_format) off"
        if change:
            LOG.info("%s VLM %s: HTTP %d for a request parameter; %s", LOG_PREFIX, self.host, status, change)
        return change is not None

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return (f" - the endpoint refused the API key ({self.key_source}); set the environment variable named on "
                    "the node before starting ComfyUI, or put the key in the key file")
        if status == 404:
            return f" - check the base URL (POSTed to {self.url}) and the model name"
        return ""

    @staticmethod
    def _hint_transient(problem: str) -> str:
        if "429" in problem:
            return " (rate limited: lower requests_per_minute or concurrency)"
        return ""


def _reason(response, scrub) -> str:
    text = ""
    try:
        data = response.json()
        err = data.get("error") if isinstance(data, dict) else None
        text = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else "")
    except ValueError:
        text = response.text
    text = " ".join(str(text or "").split())[:200]
    return f" {response.reason or ''}".rstrip() + (f": {scrub(text)}" if text else "")


def _message_text(message) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers answer in parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


# ---- the reward ------------------------------------------------------------------------------------------------

class VLMReward(Reward):
    differentiable = False
    needs_prompt = False  # uses the prompt when the caller gives one

    def __init__(self, config: VLMConfig, fallback: Reward | None = None,
                 report: Callable[[str], None] | None = None, cancel_check: Callable[[], None] | None = None,
                 sleep=None, session: requests.Session | None = None, seed: int = 0):
        if config.failure == "fallback" and fallback is None:
            raise RewardInputError("VLM reward: failure policy 'fallback' needs a reward connected to 'fallback' "
                                   "(or pick 'fail' or 'neutral')")
        self.config = config
        self.fallback = fallback
        self.report = report
        self.cancel_check = cancel_check
        self.counters = Counters()
        self.client = VLMClient(config, self.counters, sleep=sleep, session=session, rng=random.Random(seed))
        self.name = f"VLM {config.mode} ({config.model} @ {self.client.host})"
        self.last: dict = {}

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"VLMReward({self.name})"

    # requests per mode ------------------------------------------------------------------------------------------
    def _key(self, kind: str, texts: list[str], digests: list[str], extra: dict | None = None) -> str:
        payload = {"v": CACHE_VERSION, "endpoint": self.config.base_url, "model": self.config.model, "kind": kind,
                   "texts": texts, "images": digests, "max_tokens": self.config.max_tokens, **(extra or {})}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _criteria(self, prompt: str | None) -> str:
        rubric = (self.config.rubric or DEFAULT_RUBRIC).strip()
        if "{prompt}" in rubric:
            return rubric.replace("{prompt}", prompt or "")
        if prompt:
            rubric += f'\nThe image was generated from the prompt: "{prompt}"'
        return rubric

    def _rubric_ask(self, images: list[EncodedImage], prompt: str | None) -> Ask:
        n, top = len(images), f"{self.config.max_score:g}"
        criteria = self._criteria(prompt)
        if n == 1:
            text = (f"Score the image from 0 to {top} (higher is better) by these criteria:\n{criteria}\n\n"
                    f'Answer with JSON only: {{"score": <number from 0 to {top}>}}')
            schema = _schema("score", {"score": {"type": "number"}})
            picture = images[0].pil
        else:
            fields = ", ".join(f'"image_{i}": <number>' for i in range(1, n + 1))
            text = (f"The grid shows {n} images, each labelled with its number (1 to {n}) in its top-left corner. "
                    f"Score each image on its own from 0 to {top} (higher is better) by these criteria:\n{criteria}\n\n"
                    f"Answer with JSON only: {{{fields}}}")
            schema = _schema("scores", {f"image_{i}": {"type": "number"} for i in range(1, n + 1)})
            picture = labelled_grid([im.pil for im in images], self.config.image_size)
        max_score = self.config.max_score
        return Ask(messages=_messages(text, [picture]), schema=schema,
                   parse=lambda t: parse_scores(t, n, max_score),
                   cache_key=self._key("rubric", [SYSTEM_PROMPT, text], [im.digest for im in images],
                                       {"grid": n > 1, "size": self.config.image_size}))

    def _pair_ask(self, first: EncodedImage, second: EncodedImage, prompt: str | None) -> Ask:
        text = (f"Compare Image 1 and Image 2 by these criteria:\n{self._criteria(prompt)}\n\n"
                'Which image is better? Answer with JSON only: {"better": 1} or {"better": 2}')
        schema = _schema("choice", {"better": {"type": "integer", "enum": [1, 2]}})
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "text", "text": text},
                                                 {"type": "text", "text": "Image 1:"}, _image_part(first.data_url),
                                                 {"type": "text", "text": "Image 2:"}, _image_part(second.data_url)]}]
        return Ask(messages=messages, schema=schema, parse=parse_choice,
                   cache_key=self._key("pair", [SYSTEM_PROMPT, text], [first.digest, second.digest]))

    def _ranking_ask(self, images: list[EncodedImage], prompt: str | None) -> Ask:
        n = len(images)
        text = (f"The grid shows {n} images, each labelled with its number (1 to {n}) in its top-left corner. "
                f"Rank all {n} images from best to worst by these criteria:\n{self._criteria(prompt)}\n\n"
                f'Answer with JSON only: {{"ranking": [the {n} labels, best first, each exactly once]}}')
        schema = _schema("ranking", {"ranking": {"type": "array",
                                                 "items": {"type": "integer", "enum": list(range(1, n + 1))}}})
        grid = labelled_grid([im.pil for im in images], self.config.image_size)
        return Ask(messages=_messages(text, [grid]), schema=schema, parse=lambda t: parse_ranking(t, n),
                   cache_key=self._key("ranking", [SYSTEM_PROMPT, text], [im.digest for im in images],
                                       {"size": self.config.image_size}))

    # group algorithms: generators that yield rounds of Asks and receive their answers -----------------------------
    def _rubric_group(self, members, enc, prompt):
        per = self.config.images_per_call
        chunks = [members[i:i + per] for i in range(0, len(members), per)]
        answers = yield [self._rubric_ask([enc[j] for j in chunk], prompt) for chunk in chunks]
        scores = {}
        for chunk, values in zip(chunks, answers):
            for j, value in zip(chunk, values):
                scores[j] = value / self.config.max_score
        return scores

    def _presented(self, a: int, b: int, enc) -> tuple[int, int]:
        """Which of two candidates is shown first: fixed by their pixels (reproducible), unbiased over pairs."""
        lo, hi = sorted((enc[a].digest, enc[b].digest))
        flip = int(hashlib.sha256((lo + hi).encode()).hexdigest(), 16) & 1
        first = a if (enc[a].digest == lo) != bool(flip) else b
        return first, (b if first == a else a)

    def _compare_round(self, pairs, enc, prompt):
        """Round of comparisons; yields Asks, returns for each pair (x, y) True when x wins."""
        shown = [self._presented(x, y, enc) for x, y in pairs]
        choices = yield [self._pair_ask(enc[f], enc[s], prompt) for f, s in shown]
        return [(f if c == 1 else s) == x for (x, _), (f, s), c in zip(pairs, shown, choices)]

    def _beats(self, pairs, known: dict, enc, prompt):
        """For each pair (x, y): does x beat y?  Only pairs not compared before are asked (in one round)."""
        todo = list(dict.fromkeys((x, y) for x, y in pairs if (x, y) not in known))
        if todo:
            wins = yield from self._compare_round(todo, enc, prompt)
            for (x, y), w in zip(todo, wins):
                known[(x, y)], known[(y, x)] = w, not w
        return [known[(x, y)] for x, y in pairs]

    def _select_top(self, candidates, m, enc, prompt, known):
        """The best m of candidates, by quickselect on pairwise comparisons.  The pivot is the median of three
        candidates fixed by their pixels (its comparisons with the other two are re-used in the partition)."""
        if m <= 0:
            return []
        if m >= len(candidates):
            return list(candidates)
        ordered = sorted(candidates, key=lambda j: hashlib.sha256(enc[j].digest.encode()).hexdigest())
        pivot = ordered[0]
        if len(candidates) >= 3:
            a, b, c = ordered[:3]
            ab, bc = yield from self._beats([(a, b), (b, c)], known, enc, prompt)
            if ab == bc:
                pivot = b
            else:
                (ac,) = yield from self._beats([(a, c)], known, enc, prompt)
                pivot = (c if ac else a) if ab else (a if ac else c)
        others = [j for j in candidates if j != pivot]
        wins = yield from self._beats([(j, pivot) for j in others], known, enc, prompt)
        above = [j for j, w in zip(others, wins) if w]
        below = [j for j, w in zip(others, wins) if not w]
        if len(above) >= m:
            return (yield from self._select_top(above, m, enc, prompt, known))
        if len(above) == m - 1:
            return above + [pivot]
        rest = yield from self._select_top(below, m - len(above) - 1, enc, prompt, known)
        return above + [pivot] + rest

    def _top_half_group(self, members, enc, prompt):
        if len(members) == 1:
            return {members[0]: NEUTRAL}
        top = set((yield from self._select_top(list(members), len(members) // 2, enc, prompt, {})))
        return {j: (1.0 if j in top else 0.0) for j in members}

    def _knockout_group(self, members, enc, prompt):
        order = sorted(members, key=lambda j: hashlib.sha256(("ko" + enc[j].digest).encode()).hexdigest())
        pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
        scores = {j: NEUTRAL for j in members}
        if pairs:
            wins = yield from self._compare_round(pairs, enc, prompt)
            for (x, y), w in zip(pairs, wins):
                scores[x], scores[y] = (1.0, 0.0) if w else (0.0, 1.0)
        return scores

    def _ranking_group(self, members, enc, prompt):
        if len(members) == 1:
            return {members[0]: NEUTRAL}
        (order,) = yield [self._ranking_ask([enc[j] for j in members], prompt)]
        n = len(members)
        return {members[pos]: (n - 1 - rank) / (n - 1) for rank, pos in enumerate(order)}

    # driving -----------------------------------------------------------------------------------------------------
    def _run_groups(self, gens: dict, deadline: float, stop: threading.Event) -> dict:
        """Runs each group's generator, sending its rounds of requests through one pool; {group: scores or error}."""
        results: dict = {}
        waiting: dict = {}
        futures: dict = {}
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="vlm-reward")

        def advance(gid, answers):
            while True:
                try:
                    asks = gens[gid].send(answers)
                except StopIteration as done:
                    results[gid] = done.value
                    return
                except Exception as e:  # noqa: BLE001  (a bug or bad answer in one group's logic)
                    results[gid] = e
                    return
                if asks:
                    break
                answers = []
            waiting[gid] = [[None] * len(asks), len(asks)]
            for index, ask in enumerate(asks):
                futures[pool.submit(self.client.answer, ask, deadline, stop)] = (gid, index)

        try:
            for gid in gens:
                advance(gid, None)
            while futures:
                if self.cancel_check is not None:
                    self.cancel_check()
                done, _ = wait(list(futures), timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in done:
                    gid, index = futures.pop(fut)
                    if gid in results:
                        continue
                    try:
                        value = fut.result()
                    except Exception as e:  # noqa: BLE001
                        results[gid] = e
                        gens[gid].close()
                        continue
                    slot = waiting[gid]
                    slot[0][index] = value
                    slot[1] -= 1
                    if slot[1] == 0:
                        del waiting[gid]
                        advance(gid, slot[0])
                if self.config.failure == "fail" and any(isinstance(r, Exception) for r in results.values()):
                    break
        finally:
            stop.set()
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    def score(self, images, prompts=None, context: ScoringContext = NO_CONTEXT) -> torch.Tensor:
        cfg = self.config
        n = images.shape[0]
        groups = context.group_indices(n)
        key, source = resolve_api_key(cfg.api_key_env, cfg.base_url, cfg.key_file)
        self.client.set_key(key, source)
        before = self.counters.snapshot()
        started = time.monotonic()
        deadline = started + cfg.deadline
        enc = [encode_image(images[j], cfg.image_size) for j in range(n)]
        algorithm = {"rubric": self._rubric_group, "pairwise_top_half": self._top_half_group,
                     "pairwise_knockout": self._knockout_group, "ranking": self._ranking_group}[cfg.mode]
        if prompts is not None and len(prompts) == 1:
            prompts = list(prompts) * n
        if prompts is not None and len(prompts) not in (0, n):
            raise RewardInputError(f"{self.name}: {len(prompts)} prompts for {n} images")
        gens = {g: algorithm(members, enc, prompts[members[0]] if prompts else None)
                for g, members in enumerate(groups)}
        stop = threading.Event()
        results = self._run_groups(gens, deadline, stop)
        scores = torch.full((n,), NEUTRAL, dtype=torch.float32)
        failed = {g: r for g, r in results.items() if isinstance(r, Exception)}
        for g, r in results.items():
            if not isinstance(r, Exception):
                for j, v in r.items():
                    scores[j] = float(v)
        self.counters.add(images=n, reward_calls=1, failures=len(failed))
        if failed:
            first = next(iter(failed.values()))
            message = self.client.scrub(str(first) if isinstance(first, (VLMError, VLMAnswerError)) else
                                        f"{self.client.what()}: {type(first).__name__}: {first}")
            where = f"{len(failed)} of {len(groups)} candidate group{'s' if len(groups) > 1 else ''}"
            if cfg.failure == "fail":
                self._report(started, before)
                raise VLMError(f"VLM reward ({cfg.mode}) failed: {message}. Failure policy 'fail' stops this "
                               "prompt (the queue goes on); pick 'neutral' or 'fallback' on the VLM reward node to "
                               "keep sampling through API errors.") from None
            if cfg.failure == "neutral":
                LOG.warning("%s VLM reward: %s; %s scored neutral (%.1f)", LOG_PREFIX, message, where, NEUTRAL)
            else:
                LOG.warning("%s VLM reward: %s; %s scored by the fallback reward %s", LOG_PREFIX, message, where,
                            self.fallback.describe())
                for g in failed:
                    members = groups[g]
                    sub = ScoringContext(groups=None, step=context.step, steps=context.steps)
                    idx = torch.tensor(members, device=images.device)
                    sub_prompts = [prompts[j] for j in members] if prompts else None
                    values = self.fallback(images[idx], sub_prompts if self.fallback.needs_prompt else None, sub)
                    scores[torch.tensor(members)] = values.detach().float().cpu()
        self._report(started, before)
        return scores

    def stats(self) -> dict:
        return {**self.counters.snapshot(), "last_call": dict(self.last)}

    def _report(self, started: float, before: dict) -> None:
        now = self.counters.snapshot()
        delta = {k: now[k] - before[k] for k in now}
        delta["seconds"] = round(time.monotonic() - started, 3)
        self.last = delta
        if self.report is None:
            return
        tokens = (f", tokens {now['prompt_tokens']} in / {now['completion_tokens']} out"
                  if now["prompt_tokens"] or now["completion_tokens"] else "")
        text = (f"{self.name}\n"
                f"last call: {delta['images']} images, {delta['calls']} requests, {delta['cache_hits']} cached, "
                f"{delta['retries']} retries, {delta['failures']} failed groups, {delta['seconds']:.1f} s\n"
                f"total: {now['calls']} requests, {now['cache_hits']} cache hits, {now['retries']} retries, "
                f"{now['bad_answers']} bad answers, {now['failures']} failed groups{tokens}")
        try:
            self.report(self.client.scrub(text))
        except Exception:  # noqa: BLE001  (a courtesy; never break a run)
            pass


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _messages(text: str, pictures: list[Image.Image]) -> list:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": text}, *[_image_part(png_data_url(p)) for p in pictures]]}]
