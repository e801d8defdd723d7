"""The VLM reward node: any OpenAI-compatible vision endpoint as a REWARD (logic in rewards/vlm.py).

The API key is never a widget: the node names an environment variable, and falls back to the key file
<ComfyUI user dir>/reward_steering/vlm_keys.json, e.g. {"https://api.openai.com/v1": "sk-...",
"openrouter.ai": "sk-or-...", "*": "..."}.  Answers are cached under <ComfyUI user dir>/reward_steering/vlm_cache.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..rewards.vlm import (DEFAULT_RUBRIC, FAILURE_POLICIES, MODES, STRUCTURED, VLMConfig, VLMReward,
                           api_key_env_problem)
from ..rewards.vlm_client import KEY_FILE_NAME, plausible_env_name
from .types import Reward

CATEGORY = "reward_steering/rewards"


def user_dir() -> str:
    return folder_paths.get_user_directory()


def key_file_path() -> str:
    return os.path.join(user_dir(), KEY_FILE_NAME)


def cache_dir() -> str:
    return os.path.join(user_dir(), "reward_steering", "vlm_cache")


def node_reporter():
    """Text on this node (its id taken now, while it executes), for counters sent later from inside a sampler."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        context = get_executing_context()
        node_id = context.node_id if context is not None else None
    except Exception:  # noqa: BLE001
        return None
    if node_id is None:
        return None

    def report(text: str) -> None:
        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    return report


def interrupt_check():
    import comfy.model_management
    return comfy.model_management.throw_exception_if_processing_interrupted


class VLMRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerVLMReward",
            display_name="VLM Reward (OpenAI-compatible API)",
            category=CATEGORY,
            description="Scores images with a vision-language model behind any OpenAI-compatible endpoint (OpenAI, "
                        "Gemini, OpenRouter, vLLM, Ollama, LM Studio). Modes: rubric (a 0..max score per image, "
                        "optionally several per request as a labelled grid), pairwise_top_half (the Demon paper's "
                        "tournament: top half of each candidate group = 1, rest 0), pairwise_knockout (one round of "
                        "pairs, K/2 requests), ranking (one grid per group, reward linear in rank). Rewards are in "
                        "0..1. The API key comes from the environment variable named here, else from "
                        "<user dir>/reward_steering/vlm_keys.json; it is never stored in the workflow. Answers are "
                        "cached on disk so a re-queued workflow costs nothing.",
            inputs=[
                io.String.Input("base_url", default="http://127.0.0.1:8000/v1",
                                tooltip="OpenAI-compatible base URL (…/v1); e.g. https://api.openai.com/v1, "
                                        "https://generativelanguage.googleapis.com/v1beta/openai, "
                                        "https://openrouter.ai/api/v1, http://127.0.0.1:11434/v1 (Ollama)"),
                io.String.Input("model", default="Qwen/Qwen2.5-VL-7B-Instruct",
                                tooltip="model name as the endpoint knows it (gpt-4o-mini, gemini-2.0-flash, …)"),
                io.String.Input("api_key_env", default="OPENAI_API_KEY",
                                tooltip="NAME of the environment variable holding the API key (not the key). "
                                        "Unset: the key file in the user directory, else no key (local servers)"),
                io.Combo.Input("mode", options=list(MODES), default="pairwise_top_half",
                               tooltip="rubric: a 0..max_score score per image (score / max_score); "
                                       "pairwise_top_half: a tournament within each item's candidates, top half = "
                                       "1, rest 0 (the Demon paper's); pairwise_knockout: one round of pairs, "
                                       "winners 1 (K/2 requests); ranking: one grid per item, reward linear in rank. "
                                       "The pairwise modes and ranking compare candidates, so use them in samplers, "
                                       "not on a single image"),
                io.String.Input("rubric", default=DEFAULT_RUBRIC, multiline=True,
                                tooltip="what makes an image good; {prompt} is replaced by the sampler's prompt "
                                        "(without it, the prompt is appended when the sampler gives one)"),
                io.Float.Input("max_score", default=10.0, min=1.0, max=1000.0, step=1.0,
                               tooltip="rubric mode: the top of the scale (reward = score / max_score)"),
                io.Int.Input("images_per_call", default=1, min=1, max=16,
                             tooltip="rubric mode: images per request, as a labelled grid (fewer requests, "
                                     "less careful scores)"),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=32,
                             tooltip="longest side in px of each image (or grid cell) sent"),
                io.Combo.Input("failure", options=list(FAILURE_POLICIES), default="fail",
                               tooltip="when the endpoint fails after retries: fail the prompt (the queue goes on), "
                                       "neutral reward 0.5 for the failed candidates with a warning, or score them "
                                       "with the fallback reward"),
                io.Boolean.Input("cache", default=True,
                                 tooltip="re-use answers stored on disk (same images + rubric + model): re-queued "
                                         "workflows are free and reproducible"),
                io.Int.Input("concurrency", default=4, min=1, max=64, tooltip="requests in flight at once"),
                io.Int.Input("requests_per_minute", default=0, min=0, max=100000,
                             tooltip="at most this many requests in any minute (0 = no limit)"),
                io.Int.Input("max_retries", default=4, min=0, max=20,
                             tooltip="retries on 429, 5xx, timeouts and connection errors (exponential backoff "
                                     "with jitter; Retry-After honoured)"),
                io.Float.Input("timeout", default=60.0, min=0.1, max=3600.0, step=0.1,
                               tooltip="seconds one request may take, from sending it to the last byte of the "
                                       "answer (a server sending slowly is cut off; the request is retried)"),
                io.Float.Input("deadline", default=600.0, min=1.0, max=86400.0, step=1.0,
                               tooltip="seconds allowed for one reward call (all requests and retries of one "
                                       "sampler step); when it passes, requests in flight are cut off and the "
                                       "failure policy applies"),
                io.Combo.Input("structured_output", options=list(STRUCTURED), default="auto",
                               tooltip="auto: ask for a JSON schema (response_format), dropped if the endpoint "
                                       "rejects it; off: plain answers, parsed robustly"),
                Reward.Input("fallback", optional=True, tooltip="scores the candidates when failure = fallback"),
            ],
            outputs=[Reward.Output(display_name="reward",
                                   tooltip="a reward in 0..1 from the vision-language model (not differentiable): "
                                           "connect to Demon, SMC, best-of-N or Score Images")],
        )

    @classmethod
    def validate_inputs(cls, api_key_env=None):
        """A key pasted into api_key_env is refused when the prompt is queued, so that it never runs, and never
        reaches the queue, the history or the log (ComfyUI echoes only this message, never the value)."""
        problem = api_key_env_problem(api_key_env) if isinstance(api_key_env, str) else None
        return True if problem is None else problem

    @classmethod
    def execute(cls, base_url, model, api_key_env, mode, rubric, max_score, images_per_call, image_size, failure,
                cache, concurrency, requests_per_minute, max_retries, timeout, deadline, structured_output,
                fallback=None) -> io.NodeOutput:
        config = VLMConfig(base_url=base_url, model=model, mode=mode, rubric=rubric, api_key_env=api_key_env,
                           key_file=key_file_path(), max_score=max_score, images_per_call=images_per_call,
                           image_size=image_size, failure=failure, cache_dir=cache_dir() if cache else None,
                           concurrency=concurrency, requests_per_minute=requests_per_minute, max_retries=max_retries,
                           timeout=timeout, deadline=deadline, structured_output=structured_output)
        reward = VLMReward(config, fallback=fallback if failure == "fallback" else None, report=node_reporter(),
                           cancel_check=interrupt_check())
        return io.NodeOutput(reward, ui={"text": [f"{reward.describe()}\nkey: {_key_note(api_key_env)}"]})


def _key_note(api_key_env: str) -> str:
    """Where the key will come from (never the key)."""
    if api_key_env and plausible_env_name(api_key_env.strip()) and os.environ.get(api_key_env.strip()):
        return f"from environment variable {api_key_env.strip()}"
    if os.path.isfile(key_file_path()):
        return f"from {key_file_path()} if it has an entry for this endpoint"
    return "none (fine for local servers)"


NODES = [VLMRewardNode]
