"""The live candidate view: at each scored step a steering sampler hands its candidates (or particles) here; one small
latent-RGB grid of batch item 0's candidates, with each one's reward, weight and kept / resampled mark, goes to the
tab that queued the run as the websocket event EVENT (drawn by web/live_candidates.js on the executing node).

It never blocks sampling: send_sync only queues the message for the server's loop.  It costs nothing when off:
the environment variable REWARD_STEER_LIVE=0 stops sending, and nothing is built when no tab is connected (the
run came over the API without a client id, or the tab has closed).  Any failure is logged once and ignored."""
from __future__ import annotations

import base64
import io
import logging
import os

import torch

EVENT = "reward_steering.live"
TILE_PX = 64          # each candidate's preview is at most this wide / high
MAX_TILES = 16        # candidates shown per step (the first ones)
_warned = False


def enabled() -> bool:
    return os.environ.get("REWARD_STEER_LIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _target():
    """(server, client id, node id) of the tab to send to, or None when nobody can see it."""
    if not enabled():
        return None
    try:
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)   # None in-process (tests, benches): no server, no tab
    client_id = getattr(server, "client_id", None) if server is not None else None
    if client_id is None or client_id not in getattr(server, "sockets", {}):
        return None
    node_id = None
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        node_id = context.node_id if context is not None else None
    except ImportError:   # hosts without the executing context: the node the server last announced
        pass
    return server, client_id, node_id or getattr(server, "last_node_id", None)


def _grid_png(rgb: torch.Tensor) -> str:
    """rgb [k, h, w, 3] in [0, 1] -> a base64 PNG grid, tiles at most TILE_PX, up to 4 per row."""
    from PIL import Image
    k, h, w, _ = rgb.shape
    scale = min(1.0, TILE_PX / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    tiles = torch.nn.functional.interpolate(rgb.movedim(-1, 1).float(), size=(th, tw), mode="area")
    cols = min(4, k)
    rows = -(-k // cols)
    grid = torch.zeros(3, rows * th, cols * tw)
    for j in range(k):
        r, c = divmod(j, cols)
        grid[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[j]
    pixels = (grid.movedim(0, -1) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def publish(model, x0: torch.Tensor, rewards, weights, marks, *, kind: str, step: int, steps: int,
            mark_name: str) -> None:
    """Send one step's view.  x0: candidate-major latents [k*batch, ...]; rewards, weights, marks: [k, batch]
    (marks: booleans named mark_name, e.g. 'kept' or 'resampled').  Only batch item 0 is shown."""
    global _warned
    target = _target()
    if target is None:
        return
    try:
        from .scoring import latent_rgb_decode
        from .model_calls import base_model_of
        server, client_id, node_id = target
        rewards, weights, marks = (torch.as_tensor(t).reshape(-1, torch.as_tensor(t).shape[-1])
                                   for t in (rewards, weights, marks))
        k, batch = rewards.shape
        shown = min(k, MAX_TILES)
        latents = x0.detach()[0:shown * batch:batch]
        if latents.ndim == 5:   # video: the first latent frame
            latents = latents[:, :, 0]
        base = base_model_of(model)
        grid = None
        if base.latent_format.latent_rgb_factors is not None:
            grid = _grid_png(latent_rgb_decode(base, latents.float()))
        server.send_sync(EVENT, {
            "node": None if node_id is None else str(node_id), "kind": kind, "step": int(step),
            "steps": int(steps), "k": int(k), "shown": shown, "mark": mark_name,
            "rewards": [float(v) for v in rewards[:shown, 0]], "weights": [float(v) for v in weights[:shown, 0]],
            "marks": [bool(v) for v in marks[:shown, 0]], "image": grid}, client_id)
    except Exception as error:   # the view is a courtesy: never let it break a run
        if not _warned:
            _warned = True
            logging.warning("[reward-steering] live candidate view disabled for this error: %r", error)
