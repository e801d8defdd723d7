"""Manual Pick Reward node: a person picks candidates in the ComfyUI page mid-sampling.

ComfyUI glue for rewards/manual_pick.py: the request goes to the tab that queued the run
(PromptServer.send_sync to its client id), answers come back over HTTP routes under /reward_steering/manual_pick/,
and the grid itself is web/manual_pick.js (served from the pack's WEB_DIRECTORY).
"""
from __future__ import annotations

import logging
import uuid

from comfy_api.latest import io

from ..rewards.manual_pick import (MODES, TIMEOUT_POLICIES, ManualPickReward, PickBroker, RunInfo)
from .types import Reward

CATEGORY = "reward_steering/rewards"
ROUTE = "/reward_steering/manual_pick"
RECONNECT_GRACE = 15.0   # seconds a run waits for its tab to come back (a page reload) before the policy applies
_broker: PickBroker | None = None
_routes_on: set[int] = set()   # id() of the PromptServer instances our routes were added to


def _server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except Exception:
        return None


def _send(event: str, data: dict, client_id: str | None) -> None:
    server = _server()
    if server is not None and client_id is not None:
        server.send_sync(event, data, client_id)


def _is_connected(client_id: str) -> bool:
    server = _server()
    return server is not None and client_id in getattr(server, "sockets", {})


def _check_interrupt() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


def _cancelled() -> BaseException:
    import comfy.model_management
    logging.info("[reward-steering] manual pick: cancelled in the page; interrupting the run")
    return comfy.model_management.InterruptProcessingException()


def run_info() -> RunInfo:
    """The running prompt, the executing node (the sampler asking), and the client id that queued the run."""
    prompt_id = node_id = None
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        if context is not None:
            prompt_id, node_id = context.prompt_id, context.node_id
    except ImportError:
        pass
    server = _server()
    client_id = getattr(server, "client_id", None) if server is not None else None
    if node_id is None and server is not None:
        node_id = getattr(server, "last_node_id", None)
    return RunInfo(prompt_id=prompt_id, node_id=node_id, client_id=client_id)


def broker() -> PickBroker:
    global _broker
    if _broker is None:
        _broker = PickBroker(send=_send, is_connected=_is_connected, check_interrupt=_check_interrupt)
    return _broker


def register_routes() -> None:
    """Add the answer / image / pending routes to ComfyUI's server (once per server instance)."""
    server = _server()
    if server is None or id(server) in _routes_on:
        return
    from aiohttp import web
    routes = server.routes

    @routes.post(ROUTE + "/answer")
    async def answer(request):
        try:
            data = await request.json()
        except Exception:
            return web.json_response({"ok": False, "error": "expected a JSON body"}, status=400)
        status, body = broker().answer(data)
        return web.json_response(body, status=status)

    @routes.get(ROUTE + "/image")
    async def image(request):
        try:
            index = int(request.rel_url.query.get("index", "-1"))
        except ValueError:
            index = -1
        data = broker().image(request.rel_url.query.get("token", ""), index)
        if data is None:
            return web.Response(status=404, text="no such candidate image (the request is over)")
        return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})

    @routes.get(ROUTE + "/pending")
    async def pending(request):
        return web.json_response({"request": broker().pending_for(request.rel_url.query.get("client_id"))})

    _routes_on.add(id(server))


class ManualPickRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerManualPickReward",
            display_name="Manual Pick Reward (person in the page)",
            category=CATEGORY,
            description="A person is the reward: when the sampler scores its candidates, they appear as a grid "
                        "in the ComfyUI page of the tab that queued the run; the person selects the good ones "
                        "(mouse, or keys 1-9 / arrows + space, Enter submits). Selected = 1, others 0 ('ranked': "
                        "first pick 1, later picks less). Use with the Demon sampler. Unattended runs never "
                        "block: after the timeout, or at once when no tab is watching, the on_timeout policy "
                        "applies for the rest of the run.",
            inputs=[
                io.String.Input("question", default="Pick the candidates you like", multiline=False,
                                tooltip="shown above the grid"),
                io.Combo.Input("mode", options=list(MODES), default="pick",
                               tooltip="pick: selected 1, others 0. ranked: the order of your clicks ranks the "
                                       "selected candidates (first = best)"),
                io.Int.Input("ask_every", default=1, min=1, max=10000,
                             tooltip="ask only at every n-th step (step 0, n, 2n, ...); other steps get no "
                                     "preference"),
                io.Int.Input("timeout", default=300, min=1, max=86400,
                             tooltip="seconds to wait for an answer before on_timeout applies"),
                io.Combo.Input("on_timeout", options=list(TIMEOUT_POLICIES), default="uniform",
                               tooltip="when nobody answers (or no tab watches the run): uniform = no preference, "
                                       "fallback reward = score with the fallback input, abort = stop the run"),
                Reward.Input("fallback", optional=True, tooltip="used when on_timeout is 'fallback reward'"),
            ],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="a reward that asks the person (selected = 1, others 0): connect to the "
                                           "Demon sampler's reward; not differentiable")],
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return uuid.uuid4().hex   # a person's answers are never the same run twice: never reuse a cached run

    @classmethod
    def execute(cls, question, mode, ask_every, timeout, on_timeout, fallback=None) -> io.NodeOutput:
        register_routes()
        return io.NodeOutput(ManualPickReward(broker(), question=question, mode=mode, ask_every=ask_every,
                                              timeout=timeout, on_timeout=on_timeout, fallback=fallback,
                                              run_info=run_info, cancelled=_cancelled, grace=RECONNECT_GRACE))


register_routes()   # at import, i.e. while ComfyUI loads the pack, before its server adds the routes
NODES = [ManualPickRewardNode]
