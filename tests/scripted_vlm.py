"""A scripted OpenAI-compatible vision server for tests and tools (no ComfyUI needed): ScriptedVLM serves
/v1/chat/completions in a thread, answering with `red_judge` (prefers red pictures, every mode the VLM reward
uses) unless a test scripts its replies.  Used by tests/test_vlm*.py, tests/test_examples.py, tests/test_tree.py and
scripts/make_thumbnails.py (the VLM example's thumbnail is a real run judged by it)."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

RED = (0.9, 0.2, 0.2)
_DIR = torch.tensor([t - 0.5 for t in RED])
_DIR = _DIR / _DIR.norm()


def redness(pil: Image.Image) -> float:
    """The colour reward 'toward red' of tests/test_demon.py, on a PIL image (centre crop: no grid labels)."""
    w, h = pil.size
    crop = pil.crop((w // 4, h // 4, w - w // 4, h - h // 4))
    rgb = torch.from_numpy(np.asarray(crop, dtype=np.float32)).reshape(-1, 3).mean(0) / 255.0
    return float((rgb - 0.5) @ _DIR)


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def grid_cells(grid: Image.Image, n: int) -> list[Image.Image]:
    """Undo rewards.vlm.labelled_grid's layout (cols = ceil(sqrt n), gap = max(4, cell // 64))."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    for cell in range(8, 4096):
        gap = max(4, cell // 64)
        if cols * cell + (cols + 1) * gap == grid.size[0]:
            assert rows * cell + (rows + 1) * gap == grid.size[1]
            break
    else:
        raise AssertionError(f"grid of size {grid.size} does not fit {n} cells")
    out = []
    for index in range(n):
        r, c = divmod(index, cols)
        x0, y0 = gap + c * (cell + gap), gap + r * (cell + gap)
        out.append(grid.crop((x0, y0, x0 + cell, y0 + cell)))
    return out


def images_of(body: dict) -> list[Image.Image]:
    parts = body["messages"][-1]["content"]
    return [decode_data_url(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"]


def text_of(body: dict) -> str:
    return "\n".join(p["text"] for p in body["messages"][-1]["content"] if p.get("type") == "text")


def red_judge(body: dict) -> str:
    """A scripted VLM that prefers red: answers every mode from the pictures it is sent."""
    text = text_of(body)
    pictures = images_of(body)
    if "Compare Image 1 and Image 2" in text:
        a, b = (redness(p) for p in pictures)
        return json.dumps({"better": 1 if a >= b else 2})
    m = re.search(r"The grid shows (\d+) images", text)
    cells = grid_cells(pictures[0], int(m.group(1))) if m else pictures
    values = [redness(c) for c in cells]
    if "Rank all" in text:
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return json.dumps({"ranking": [i + 1 for i in order]})
    scores = [round(10 * min(max(0.5 + v, 0.0), 1.0), 3) for v in values]
    if m:
        return json.dumps({f"image_{i + 1}": s for i, s in enumerate(scores)})
    return json.dumps({"score": scores[0]})


def completion(content: str, prompt_tokens: int = 100, completion_tokens: int = 7) -> bytes:
    return json.dumps({"id": "chatcmpl-test", "object": "chat.completion", "model": "scripted",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}).encode()


class ScriptedVLM:
    """An OpenAI-compatible /v1/chat/completions server in a thread.  Scripted replies (a deque of dicts) are used
    first, then `judge(body) -> content`.  Reply keys: status, headers, body (bytes), content (str), sleep (s),
    reject_response_format (bool: 400 when the request has one)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: deque = deque()
        self.judge = red_judge
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.reject_response_format = False
        self.reasoning_model = False  # 400 for max_tokens and temperature, like OpenAI's reasoning models
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with owner.lock:
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    reply = owner.script.popleft() if owner.script else {}
                    owner.active += 1
                    owner.max_active = max(owner.max_active, owner.active)
                try:
                    owner._respond(self, body, reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with owner.lock:
                        owner.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _respond(self, handler, body, reply):
        time.sleep(reply.get("sleep", 0.0))
        if self.reject_response_format and "response_format" in body:
            status, payload = 400, json.dumps({"error": {"message": "response_format is not supported"}}).encode()
            headers = {}
        elif self.reasoning_model and ("max_tokens" in body or "temperature" in body):
            param = "max_tokens" if "max_tokens" in body else "temperature"
            hint = " Use 'max_completion_tokens' instead." if param == "max_tokens" else ""
            status, payload = 400, json.dumps({"error": {"message": f"Unsupported parameter: '{param}' is not "
                                                                    f"supported with this model.{hint}"}}).encode()
            headers = {}
        else:
            status = reply.get("status", 200)
            headers = reply.get("headers", {})
            if "body" in reply:
                payload = reply["body"]
            elif status == 200:
                payload = completion(reply["content"] if "content" in reply else self.judge(body))
            else:
                payload = json.dumps({"error": {"message": reply.get("message", "scripted error")}}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def reset(self):
        deadline = time.monotonic() + 5.0
        while self.active and time.monotonic() < deadline:  # replies still sleeping from an earlier test
            time.sleep(0.02)
        with self.lock:
            self.requests.clear()
            self.script.clear()
            self.max_active = 0
        self.judge = red_judge
        self.reject_response_format = False
        self.reasoning_model = False

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
