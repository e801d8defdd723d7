"""Talking to an OpenAI-compatible chat-completions endpoint reliably, for the VLM reward (rewards/vlm.py):
the API key (environment variable or key file, never a widget) and a scrubber that keeps it out of every text;
retries with exponential backoff and jitter that honour Retry-After; a requests-per-minute limiter; an overall
deadline; a disk cache of answers; counters.  Thread-safe; synchronous (`requests`), as ComfyUI runs node code on
a worker thread inside its asyncio loop.

Every exchange is bounded in wall time and size, whatever the server does: `requests`' timeout applies to each
socket read, so a server trickling its headers or body a byte at a time would never time out; here a watchdog
shuts the connection's socket at min(timeout, what is left of the deadline), and an answer that arrives after
that is dropped.  Bodies above MAX_ANSWER_BYTES are not read, and redirects are not followed (a 302 turns the POST
into a GET without the images)."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

import requests
import urllib3

from .base import RewardInputError

if TYPE_CHECKING:
    from .vlm import VLMConfig

LOG = logging.getLogger(__name__)
LOG_PREFIX = "[reward-steering]"
KEY_FILE_NAME = os.path.join("reward_steering", "vlm_keys.json")
CACHE_VERSION = 1
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a judge's chat completion is a few kB; a bigger body is refused unread

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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# prefixes of keys that can pass for a name (letters, digits, underscores): Groq, Hugging Face, GitHub, GitLab,
# Replicate, Stripe-style, Google, AWS access key ids
_KEY_PREFIXES = ("gsk_", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat", "r8_", "sk_",
                 "AIza", "AKIA", "ASIA")


def plausible_env_name(name: str) -> bool:
    """Could `name` be the NAME of an environment variable, rather than a key pasted where the name goes?  Names
    are short words joined by underscores; keys are long random runs.  Anything else is treated as a secret."""
    if not _ENV_NAME.fullmatch(name):
        return False
    for prefix in _KEY_PREFIXES:
        rest = name[len(prefix):]
        if name.startswith(prefix) and len(rest) >= 16 and rest.isalnum():
            return False
    for part in name.split("_"):
        if len(part) >= 24:         # no word in a name is this long; a token (or hex digest) is
            return False
        if len(part) >= 16 and any(c.isdigit() for c in part) and any(c.isalpha() for c in part):
            return False            # a long run mixing letters and digits: a token, not a word
    return True


def resolve_api_key(env_var: str, base_url: str, key_file: str | None) -> tuple[str | None, str]:
    """(key or None, where it came from, for messages).  The environment variable named `env_var` wins; else
    `key_file`, a JSON object mapping a base URL, host[:port], host or "*" to a key.  A value of `env_var` that
    is not a plausible name is never looked up or echoed (it may be a pasted key)."""
    env_var = (env_var or "").strip()
    if env_var and not plausible_env_name(env_var):
        env_var = ""
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


# ---- requests --------------------------------------------------------------------------------------------------

@dataclass
class Ask:
    """One request: the messages (images as data URLs), how to parse the answer, and the cache key."""
    messages: list
    schema: dict | None
    parse: Callable[[str], object]
    cache_key: str


def response_format_schema(name: str, properties: dict) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": name, "strict": True,
                            "schema": {"type": "object", "properties": properties, "required": list(properties),
                                       "additionalProperties": False}}}


# ---- one bounded HTTP exchange -----------------------------------------------------------------------------------

_current = threading.local()   # .watch: the _Watch of the exchange this thread is making


def _shutdown(sock) -> None:
    """Wake a thread blocked reading from this socket: it sees the connection end."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's method: the same under TLS
    except (OSError, TypeError, ValueError):
        pass


class _Watch:
    """The wall-clock limit of one exchange, headers and body together: at `at` (time.monotonic), or on expire(),
    the socket of the connection in use is shut down.  The pools below tell it which socket that is (kept here:
    http.client lets go of it while a body that ends with the connection is read)."""

    def __init__(self, at: float, stop: threading.Event):
        self.stop = stop
        self.lock = threading.Lock()
        self.conn = None
        self.sock = None
        self.expired = False
        self.timer = threading.Timer(max(0.0, at - time.monotonic()), self.expire)
        self.timer.daemon = True
        self.timer.start()

    def attach(self, conn) -> None:
        """`conn` carries this exchange (called when it is taken from the pool and when it connects)."""
        with self.lock:
            self.conn = conn
            self.sock = getattr(conn, "sock", None)
            sock = self.sock if self.expired else None
        _shutdown(sock)

    def release(self, conn) -> bool:
        """`conn` goes back to the pool (another exchange may take it): stop watching it.  True if it was shut."""
        with self.lock:
            if self.conn is conn:
                self.conn = self.sock = None
            return self.expired

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            sock = self.sock
        _shutdown(sock)

    def finish(self) -> bool:
        """Stop watching; True when the limit passed first (what was read is then not used)."""
        self.timer.cancel()
        with self.lock:
            self.conn = self.sock = None
            return self.expired


class _WatchedConnection:
    def connect(self):
        super().connect()
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.attach(self)   # the socket exists now (shut at once if the limit passed while connecting)


class _WatchedPool:
    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.attach(conn)
        return conn

    def _put_conn(self, conn):
        watch = getattr(_current, "watch", None)
        if watch is not None and conn is not None and watch.release(conn):
            conn.close()   # shut by the watch: never reused
        super()._put_conn(conn)


class _WatchedHTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(_WatchedPool, urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connection pools whose connections a _Watch can end."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:   # (a SOCKS manager keeps its own pools)
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


class _TimedOut(Exception):
    """The exchange's wall-clock limit passed (or its reward call stopped) before the whole answer was in."""


class _TooLarge(Exception):
    def __init__(self, size: int | None):
        super().__init__(size)
        self.size = size


@dataclass
class Reply:
    """A whole HTTP answer, read within its limits."""
    status: int
    reason: str
    headers: dict      # (requests' case-insensitive one)
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body)


def _read_capped(response, cap: int) -> bytes:
    length = (response.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > cap:
        raise _TooLarge(int(length))
    data = bytearray()
    for chunk in response.iter_content(chunk_size=16 * 1024):   # (small: a compressed chunk may inflate)
        data += chunk
        if len(data) > cap:
            raise _TooLarge(None)
    return bytes(data)


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
        adapter = _WatchedAdapter(pool_connections=1, pool_maxsize=max(4, config.concurrency))
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
        self._watches: set[_Watch] = set()
        self._watches_lock = threading.Lock()

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
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}  # (no decompression bombs)
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        attempt = 0
        problem = None
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
                raise VLMError(f"{self.what()}: the deadline of {cfg.deadline:g} s for this reward call passed"
                               + (f" (last attempt: {problem})" if problem else ""))
            limit = min(cfg.timeout, remaining)
            body = self._body(ask)
            retry_after = None
            self.counters.add(calls=1)
            try:
                response = self._exchange(body, headers, limit, stop)
            except _TimedOut:
                if stop.is_set():
                    raise VLMError(f"{self.what()}: the reward call was stopped") from None
                problem = (f"no complete answer within {limit:.3g} s (timeout {cfg.timeout:g} s per request, "
                           f"deadline {cfg.deadline:g} s per reward call)")
            except _TooLarge as e:
                size = f" (Content-Length {e.size})" if e.size else ""
                raise VLMError(f"{self.what()}: the answer from {self.url}{size} is larger than the "
                               f"{MAX_ANSWER_BYTES / 2 ** 20:g} MiB cap on VLM answers (MAX_ANSWER_BYTES) and was "
                               "not read; a chat completion is a few kB - check that the base URL points at a "
                               "chat-completions endpoint") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError, OSError) as e:
                problem = f"cannot connect, or the connection broke ({type(e).__name__})"
            except requests.RequestException as e:
                raise VLMError(f"{self.what()}: request failed ({type(e).__name__})") from None
            else:
                status = response.status
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
                elif 300 <= status < 400:
                    location = " ".join(str(response.headers.get("Location") or "").split())[:200]
                    raise VLMError(f"{self.what()}: HTTP {status} redirect"
                                   + (f" to {self.scrub(location)!r}" if location else "")
                                   + f" from {self.url}; redirects are not followed (a redirected POST can come "
                                   "back as a GET without the images, and its answer is no score): set base_url "
                                   "to the address the endpoint redirects to")
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

    def _exchange(self, body: dict, headers: dict, limit: float, stop: threading.Event) -> Reply:
        """One POST and its whole answer within `limit` seconds of wall time (raises _TimedOut) and
        MAX_ANSWER_BYTES (raises _TooLarge); redirects are answers, not followed."""
        watch = _Watch(time.monotonic() + limit, stop)
        with self._watches_lock:
            self._watches.add(watch)
        _current.watch = watch
        try:
            try:
                response = self.session.post(self.url, json=body, headers=headers, stream=True,
                                             allow_redirects=False, timeout=(min(10.0, limit), limit))
                try:
                    data = _read_capped(response, MAX_ANSWER_BYTES)
                finally:
                    response.close()
            finally:
                expired = watch.finish()
                _current.watch = None
                with self._watches_lock:
                    self._watches.discard(watch)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if expired or isinstance(e, requests.Timeout):
                raise _TimedOut() from None
            raise
        if expired:   # the whole answer came in only as (or after) the limit passed: too late to use
            raise _TimedOut()
        return Reply(response.status_code, response.reason or "", response.headers, data)

    def abort(self, stop: threading.Event) -> None:
        """End the exchanges in flight for the reward call that `stop` belongs to (it stopped or gave up)."""
        with self._watches_lock:
            watches = [w for w in self._watches if w.stop is stop]
        for watch in watches:
            watch.expire()

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
