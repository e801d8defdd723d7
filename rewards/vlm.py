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

Reliability (the transport is rewards/vlm_client.py): requests go through a thread pool (`concurrency` at a time)
and a sliding-window requests-per-minute limiter; 429, 5xx, timeouts, connection errors and unreadable bodies are
retried with exponential backoff and jitter, waiting at least what Retry-After says.  Each request is bounded in
wall time (`timeout`, headers and body together, however slowly the server sends) and size (MAX_ANSWER_BYTES); a
reward call returns by its `deadline` (plus DEADLINE_GRACE at most, and a fallback reward's own time) whatever the
server does; redirects are failures, not followed.  An answer that cannot be parsed (or has the wrong number of
scores) is asked again once, then counts as a failure.  A failure of any request fails its group, which then follows
the failure policy: 'fail' raises a clear error (the ComfyUI prompt fails, the queue goes on), 'neutral' gives the
group 0.5 with a logged warning, 'fallback' scores the group with another reward.

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
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw, ImageFont

from .base import NO_CONTEXT, Reward, RewardInputError, ScoringContext
from .vlm_client import (CACHE_VERSION, Ask, Counters, VLMAnswerError, VLMClient, VLMError, normalise_base_url,
                         plausible_env_name, resolve_api_key, response_format_schema)

LOG = logging.getLogger(__name__)
LOG_PREFIX = "[reward-steering]"

MODES = ("rubric", "pairwise_top_half", "pairwise_knockout", "ranking")
FAILURE_POLICIES = ("fail", "neutral", "fallback")
STRUCTURED = ("auto", "off")
NEUTRAL = 0.5
DEADLINE_GRACE = 0.5  # s past the deadline before a reward call stops waiting for requests that did not end
DEFAULT_RUBRIC = ("How well does the image match the prompt, and how good is it as a picture (composition, detail, "
                  "no artefacts)?")
SYSTEM_PROMPT = ("You are a careful, consistent judge of images. Follow the instructions exactly and answer only "
                 "with the JSON object requested, no other text.")


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
        problem = api_key_env_problem(self.api_key_env)
        if problem:
            raise RewardInputError(f"VLM reward: {problem}")
        for name in ("max_score", "timeout", "deadline", "requests_per_minute", "backoff_base", "backoff_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardInputError(f"VLM reward: {name} must be a finite number, got {value!r}")
        if self.max_score <= 0:
            raise RewardInputError(f"VLM reward: max_score must be positive, got {self.max_score}")
        if self.images_per_call < 1 or self.concurrency < 1 or self.image_size < 16:
            raise RewardInputError("VLM reward: images_per_call and concurrency must be at least 1, image_size at "
                                   "least 16")
        if self.timeout <= 0 or self.deadline <= 0:
            raise RewardInputError("VLM reward: timeout and deadline must be positive (seconds)")


def api_key_env_problem(value) -> str | None:
    """Why `value` cannot go in api_key_env (None if it can), in words that never repeat it: anything that is not
    a plausible environment-variable name is treated as a pasted key."""
    name = (value or "").strip() if isinstance(value, str) else ""
    if not name or plausible_env_name(name):
        return None
    return ("api_key_env takes the NAME of an environment variable (e.g. OPENAI_API_KEY: letters, digits and "
            "underscores, at most 64), and the value given is not one - it may be a key, so it is not repeated "
            "here. Remove it from the node (a saved workflow would carry it) and set the variable before starting "
            "ComfyUI, or use the key file in the user directory")


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
        self.compares_candidates = config.mode != "rubric"   # tournaments and rankings compare an item's candidates
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
            schema = response_format_schema("score", {"score": {"type": "number"}})
            picture = images[0].pil
        else:
            fields = ", ".join(f'"image_{i}": <number>' for i in range(1, n + 1))
            text = (f"The grid shows {n} images, each labelled with its number (1 to {n}) in its top-left corner. "
                    f"Score each image on its own from 0 to {top} (higher is better) by these criteria:\n{criteria}\n\n"
                    f"Answer with JSON only: {{{fields}}}")
            schema = response_format_schema("scores", {f"image_{i}": {"type": "number"} for i in range(1, n + 1)})
            picture = labelled_grid([im.pil for im in images], self.config.image_size)
        max_score = self.config.max_score
        return Ask(messages=_messages(text, [picture]), schema=schema,
                   parse=lambda t: parse_scores(t, n, max_score),
                   cache_key=self._key("rubric", [SYSTEM_PROMPT, text], [im.digest for im in images],
                                       {"grid": n > 1, "size": self.config.image_size}))

    def _pair_ask(self, first: EncodedImage, second: EncodedImage, prompt: str | None) -> Ask:
        text = (f"Compare Image 1 and Image 2 by these criteria:\n{self._criteria(prompt)}\n\n"
                'Which image is better? Answer with JSON only: {"better": 1} or {"better": 2}')
        schema = response_format_schema("choice", {"better": {"type": "integer", "enum": [1, 2]}})
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
        schema = response_format_schema("ranking", {"ranking": {"type": "array",
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
                if time.monotonic() > deadline + DEADLINE_GRACE:  # a request stuck where no watch reaches it
                    late = VLMError(f"{self.client.what()}: the deadline of {self.config.deadline:g} s for this "
                                    "reward call passed with requests still unanswered")
                    for gid in gens:
                        results.setdefault(gid, late)
                    break
                done, _ = wait(list(futures), timeout=0.1, return_when=FIRST_COMPLETED)
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
            self.client.abort(stop)   # requests still in flight end now (their threads are not waited for)
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
