"""Every example workflow in workflows/ executes on a real ComfyUI server over HTTP (`main.py --cpu`), on tiny
stand-ins of its model family.  For each file: the prompt completes; every decoded image is finite and of the size
set; the Demon / SMC trace shows steered steps (SMC: every ESS in [1, N], resampling only at scored steps and only
below the threshold); queued again after ComfyUI's caches are dropped (/free), the same seed gives the same latents
and images bit for bit.  For each model family of the examples: K = 1 Demon, one-particle SMC and N = 1 best-of-N
equal the family's plain core sampler on the same seed.

The files are not edited; the test changes the graph it loads, in memory:
- loaders: CheckpointLoaderSimple -> RewardSteerTinyFamilyModel of the checkpoint's family (the same MODEL, CLIP,
  VAE slots); DualCLIPLoader and VAELoader -> the same node, links rewired by slot (CLIP 1, VAE 2); UNETLoader
  keeps reading its file where the host's model detection takes the family's tiny file (written under the example's
  file name, tests/tiny_models_dir.py), else it is swapped too (MODEL 0).  Any other node that reads a model file
  fails the test with "no tiny stand-in for node ...".
- open_clip, aesthetic-head, CLIP-vision, HPS, PickScore and ImageReward files: written in their real formats with
  random weights under the names the examples use, into a tmp models folder the server reads through
  --extra-model-paths-config (no swap).
- VLM rewards: base_url -> the scripted OpenAI-compatible server of tests/test_vlm.py.
- CPU time: latents of 64 x 64 px, at most 4 steps (2 where core CLIP vision runs a full-size ViT-L/14), Demon
  K <= 2, SMC particles <= 4, best-of-N N <= 2; every other widget and every node and link of the example are
  kept.  Added for the checks only: SaveLatent on the source of every VAEDecode, a brightness Score Images on every
  VAEDecode (a NaN / inf pixel makes its score non-finite) and PreviewAny on every trace_json output.
The SAMPLER nodes (Demon / SMC in SamplerCustomAdvanced) have no trace output: their per-step node text, which
ComfyUI sends over the websocket, is read instead (prompts are queued with the test's websocket client id; those with
Manual Pick without one, as an API client would).
"""
from __future__ import annotations

import asyncio
import json
import re
import struct
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness
from comfy_client import MANUAL_PICK_WORKFLOW, MODEL_FILE_SUFFIXES, REPO, ComfyServer, ui_to_api
from test_vlm import ScriptedVLM
from tiny_models_dir import FOLDERS, models_config, write_named_files

WORKFLOW_FILES = sorted((REPO / "workflows").glob("*.json"))
SIZE, STEPS, MAX_K, MAX_PARTICLES, MAX_N = 64, 4, 2, 4, 2
# Core CLIP vision detects nothing smaller than a ViT-L/14 (seconds per image on this CPU): 2 steps there
FULL_SIZE_LOADERS, FULL_SIZE_STEPS = {"CLIPVisionLoader"}, 2
TINY_NODE = "RewardSteerTinyFamilyModel"
# what the examples name -> the tiny family standing in for it
CHECKPOINT_FAMILIES = {"v1-5-pruned-emaonly.safetensors": "sd15", "sd_xl_base_1.0.safetensors": "sdxl"}
UNET_FAMILIES = {"flux1-dev.safetensors": "flux"}
TEXT_ENCODER_FAMILIES = {"flux": "flux"}        # DualCLIPLoader's type
VAE_FAMILIES = {"ae.safetensors": "flux"}
# loader -> (the input that says what it loads, the family table, {its output slot: the tiny node's slot})
LOADER_SWAPS = {"CheckpointLoaderSimple": ("ckpt_name", CHECKPOINT_FAMILIES, {0: 0, 1: 1, 2: 2}),
                "UNETLoader": ("unet_name", UNET_FAMILIES, {0: 0}),
                "DualCLIPLoader": ("type", TEXT_ENCODER_FAMILIES, {0: 1}),
                "VAELoader": ("vae_name", VAE_FAMILIES, {0: 2})}
# Stated tolerances (max |difference| / max(1, max |plain|) over the latent): the steering samplers take their steps
# in float64, core's samplers in float32.  Best-of-N runs the core sampler itself: bit for bit.
STEP_RTOL = 1e-5


class NoStandIn(Exception):
    pass


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


# ---- the graph the test runs --------------------------------------------------------------------------------------

def swap_loaders(graph: dict, served: dict[str, set[str]]) -> set[str]:
    """Loaders -> tiny stand-ins, in place (links rewired by slot); returns the families used.  Raises NoStandIn for
    a node that reads a model file the test has no stand-in for."""
    families, remap = set(), {}
    for node_id, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in LOADER_SWAPS:
            field, table, slots = LOADER_SWAPS[kind]
            family = table.get(inputs.get(field))
            if family is None:
                raise NoStandIn(f"no tiny stand-in for node {node_id} ({kind}) with {field}={inputs.get(field)!r}")
            families.add(family)
            if kind == "UNETLoader" and inputs[field] in served.get("diffusion_models", ()):
                continue                       # core UNETLoader reads the family's tiny file
            graph[node_id] = {"class_type": TINY_NODE, "inputs": {"family": family, "seed": 0},
                              "_meta": {"title": f"tiny {family} for {kind}"}}
            remap[node_id] = slots
            continue
        files = [v for v in inputs.values() if isinstance(v, str) and v.lower().endswith(MODEL_FILE_SUFFIXES)]
        folder = FOLDERS.get(kind, (None, None))[1]
        missing = [f for f in files if f not in served.get(folder, ())]
        if missing or (not files and "Loader" in kind and kind not in FOLDERS):
            raise NoStandIn(f"no tiny stand-in for node {node_id} ({kind})" + (f" reading {missing}" if missing else ""))
    for node in graph.values():
        for name, value in node["inputs"].items():
            if is_link(value) and value[0] in remap:
                node["inputs"][name] = [value[0], remap[value[0]][value[1]]]
    return families


def shrink(graph: dict) -> None:
    """64 x 64 px, at most STEPS steps (FULL_SIZE_STEPS with a full-size reward backbone), K / particles / N capped:
    CPU time (module docstring)."""
    steps = FULL_SIZE_STEPS if any(v["class_type"] in FULL_SIZE_LOADERS for v in graph.values()) else STEPS
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind.startswith("Empty") and "Latent" in kind:
            inputs.update(width=SIZE, height=SIZE)
        caps = {"steps": steps, **({"k": MAX_K} if "Demon" in kind else {}),
                **({"particles": MAX_PARTICLES} if "SMC" in kind else {}), **({"n": MAX_N} if "BestOfN" in kind else {})}
        for name, cap in caps.items():
            if isinstance(inputs.get(name), int):
                inputs[name] = min(inputs[name], cap)


def add_probes(graph: dict, object_info: dict, tag: str) -> None:
    """SaveLatent / brightness Score Images on every decode, PreviewAny on every trace_json output."""
    graph["probe_reward"] = {"class_type": "RewardSteerColorReward",
                             "inputs": {"mode": "channel weights", "red": 1.0, "green": 1.0, "blue": 1.0, "bias": 0.0}}
    for node_id, node in list(graph.items()):
        if node["class_type"] == "VAEDecode":
            graph[f"probe_latent_{node_id}"] = {"class_type": "SaveLatent", "inputs": {
                "samples": node["inputs"]["samples"], "filename_prefix": f"probe/{tag}/latent_{node_id}"}}
            graph[f"probe_finite_{node_id}"] = {"class_type": "RewardSteerScoreImages", "inputs": {
                "images": [node_id, 0], "reward": ["probe_reward", 0], "prompt": ""}}
        names = object_info.get(node["class_type"], {}).get("output_name", [])
        for slot, name in enumerate(names):
            if name == "trace_json":
                graph[f"probe_trace_{node_id}"] = {"class_type": "PreviewAny", "inputs": {"source": [node_id, slot]}}


def prepare(api: dict, object_info: dict, served: dict[str, set[str]], vlm_url: str, tag: str) -> tuple[dict, set]:
    graph = json.loads(json.dumps(api))
    families = swap_loaders(graph, served)
    for node in graph.values():
        if node["class_type"] == "RewardSteerVLMReward":
            node["inputs"]["base_url"] = vlm_url
    shrink(graph)
    add_probes(graph, object_info, tag)
    return graph, families


# ---- the server and its websocket ---------------------------------------------------------------------------------

class NodeTexts:
    """The texts nodes show while they run (ComfyUI's binary TEXT events on /ws), by prompt and node, for prompts
    queued with this socket's client id (ComfyUI sends a prompt's 'execution_start' only to its client)."""
    TEXT_EVENT = 3

    def __init__(self, url: str):
        self.client_id = uuid.uuid4().hex
        self.texts: dict[str, list[tuple[str, str]]] = {}
        self.done: set[str] = set()
        self._current = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(url),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the server's websocket did not open")

    async def _listen(self, url: str):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, max_msg_size=0) as ws:
                self._ws = ws
                self._ready.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self._event(json.loads(msg.data))
                    elif msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) > 8:
                        (kind,) = struct.unpack(">I", msg.data[:4])
                        if kind == self.TEXT_EVENT and self._current is not None:
                            (n,) = struct.unpack(">I", msg.data[4:8])
                            node, text = msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()
                            self.texts.setdefault(self._current, []).append((node, text))

    def _event(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "execution_start":
            self._current = data["prompt_id"]
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self.done.add(data.get("prompt_id"))
            self._current = None     # texts of prompts queued without a client id (broadcast) are not kept

    def of(self, prompt_id: str, node_id: str, timeout: float = 30) -> list[str]:
        deadline = time.time() + timeout
        while prompt_id not in self.done and time.time() < deadline:
            time.sleep(0.05)
        return [text for node, text in self.texts.get(prompt_id, []) if node == node_id]

    def close(self):
        asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(10)
        self._thread.join(10)


def queue_all(server, prompts: dict[str, dict], client_id: str) -> dict[str, str | Exception]:
    """Queue every prompt with `client_id`, but those with Manual Pick without one (nobody can answer over the API)."""
    ids = {}
    for name, prompt in prompts.items():
        unattended = any(v["class_type"] == "RewardSteerManualPickReward" for v in prompt.values())
        try:
            ids[name] = server.queue(prompt, client_id=None if unattended else client_id)
        except RuntimeError as e:         # refused by validation: reported by the test of that example
            ids[name] = e
    return ids


def wait_all(server, ids: dict) -> dict[str, dict | Exception]:
    results = {}
    for name, prompt_id in ids.items():
        if isinstance(prompt_id, Exception):
            results[name] = prompt_id
            continue
        try:
            results[name] = dict(server.wait(prompt_id, timeout=600), prompt_id=prompt_id)
        except (RuntimeError, TimeoutError) as e:
            results[name] = e
    return results


def seconds(history: dict) -> float:
    stamps = {m[0]: m[1].get("timestamp") for m in history["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


# ---- equivalence prompts: steering off = the family's plain core sampler -----------------------------------------

def core_ancestral_noise_offset() -> int | None:
    """The seed offset core's ancestral samplers draw their step noise with on the CPU (newer ComfyUI: seed + 1, so
    that it is not the starting noise again; older: the seed itself)."""
    import comfy.k_diffusion.sampling as k_sampling
    x = torch.zeros(2, 3)
    drawn = k_sampling.default_noise_sampler(x, seed=5)(None, None)
    for offset in (0, 1):
        if torch.equal(drawn, torch.randn(x.shape, generator=torch.Generator().manual_seed(5 + offset))):
            return offset
    return None


def steering_off_prompt(family: str) -> tuple[dict, dict[str, tuple[str, str, float | None]]]:
    """The family's plain core workflow (reference/tiny_families.plain_sampling_prompt, batch 2) with K = 1 Demon,
    one-particle SMC and N = 1 best-of-N beside core samplers; returns (prompt, {what: (steered node, core node,
    tolerance or None for bit for bit)}).  Each latent gets a SaveLatent."""
    tiny = harness.pack_submodule("reference.tiny_families")
    info = tiny.FAMILY_INFO[family]
    prompt = tiny.plain_sampling_prompt(family, steps=STEPS, scheduler="karras" if info.guider == "cfg" else "simple",
                                        seed=3, prompt="a lighthouse on a cliff, golden hour")
    prompt["4"]["inputs"]["batch_size"] = 2
    prompt["r"] = {"class_type": "RewardSteerColorReward",
                   "inputs": {"mode": "toward colour", "red": 1.0, "green": 0.6, "blue": 0.2, "bias": 0.0}}
    demon = {"k": 1, "beta": 0.1, "weighting": "tanh", "tau": 0.0, "estimator": "tweedie", "max_rollout_steps": 20,
             "min_sigma": 0.0, "start": 0.0, "end": 1.0, "chunk_items": 0, "budget": 0, "decoder": "vae", "prompt": ""}
    smc = {"particles": 1, "lam": 10.0, "potential": "difference", "tempering": "none", "gamma": 0.008,
           "resampling": "systematic", "ess_threshold": 0.5, "reward_start": 0, "reward_end": -1, "reward_interval": 1,
           "eta": 1.0, "gradient_guidance": False, "output": "weighted_draw", "chunk_items": 0, "decoder": "vae",
           "prompt": ""}
    steering = {"reward": ["r", 0], "vae": ["1", 2]}
    checks = {}
    if info.guider == "cfg":
        core = prompt["8"]["inputs"]             # KSampler euler with the family's cfg
        common = {k: v for k, v in core.items() if k != "sampler_name"}
        prompt["d"] = {"class_type": "RewardSteerKSamplerDemon", "inputs": {**common, **steering, **demon}}
        prompt["s"] = {"class_type": "RewardSteerKSamplerSMC", "inputs": {**common, **steering, **smc}}
        prompt["a"] = {"class_type": "KSampler", "inputs": {**core, "sampler_name": "euler_ancestral"}}
        prompt["b"] = {"class_type": "RewardSteerBestOfN", "inputs": {**core, **steering, "n": 1, "prompt": ""}}
        checks = {"demon K=1 / euler": ("d", "8", STEP_RTOL), "smc 1 particle / euler_ancestral": ("s", "a", STEP_RTOL),
                  "best-of-N N=1 / euler": ("b", "8", None)}
    else:                                        # FluxGuidance + BasicGuider + SamplerCustomAdvanced, as the examples
        def advanced(sampler_node):
            return {"class_type": "SamplerCustomAdvanced", "inputs": {**prompt["8"]["inputs"],
                                                                      "sampler": [sampler_node, 0]}}
        prompt["ds"] = {"class_type": "RewardSteerDemonSampler", "inputs": {**steering, **demon}}
        prompt["d"] = advanced("ds")
        # core's euler_ancestral on flow models is the rectified-flow step (sigma_down = sigma'^2 / sigma in sigma),
        # SMC's the DDPM step in sigma / (1 - sigma): both keep the marginals, they are not the same step.  Without
        # fresh noise (eta = 0) both are Euler.
        prompt["ss"] = {"class_type": "RewardSteerSMCSampler", "inputs": {**steering, **smc, "eta": 0.0}}
        prompt["s"] = advanced("ss")
        cfg_inputs = {"model": ["1", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["4", 0],
                      "seed": 3, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                      "denoise": 1.0}
        prompt["k"] = {"class_type": "KSampler", "inputs": cfg_inputs}
        prompt["b"] = {"class_type": "RewardSteerBestOfN", "inputs": {**cfg_inputs, **steering, "n": 1, "prompt": ""}}
        checks = {"demon K=1 / euler": ("d", "8", STEP_RTOL), "smc 1 particle eta=0 / euler": ("s", "8", STEP_RTOL),
                  "best-of-N N=1 / KSampler euler": ("b", "k", None)}
    for node_id in {n for pair in checks.values() for n in pair[:2]}:
        prompt[f"latent_{node_id}"] = {"class_type": "SaveLatent",
                                       "inputs": {"samples": [node_id, 0], "filename_prefix": f"probe/off_{family}/{node_id}"}}
    del prompt["9"]                              # the decode: only latents are compared
    return prompt, checks


# ---- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every example (and the steering-off prompts of their families) run twice on one server, ComfyUI's caches
    dropped between the rounds."""
    root = tmp_path_factory.mktemp("examples")
    config = models_config(root / "models")
    vlm = ScriptedVLM()
    user_dir = root / "user"
    user_dir.mkdir()
    server = ComfyServer(output_dir=root / "out", log_path=root / "server.log",
                         extra_args=["--extra-model-paths-config", str(config), "--user-directory", str(user_dir)])
    with server:
        texts = NodeTexts(server.url)
        try:
            object_info = server.get("/object_info", timeout=120)
            apis, prepared = {}, {}
            for path in WORKFLOW_FILES:
                try:
                    apis[path.name] = ui_to_api(json.loads(path.read_text()), object_info)
                except Exception as e:   # one stale file fails its own tests (test_server names the drift)
                    prepared[path.name] = AssertionError(f"{path.name} does not convert against this server's "
                                                         f"/object_info: {type(e).__name__} {e}")
            served = write_named_files(root / "models", apis.values(), UNET_FAMILIES)
            prompts, families = {}, set()
            for name, api in apis.items():
                try:
                    graph, used = prepare(api, object_info, served, vlm.url, Path(name).stem)
                except NoStandIn as e:
                    prepared[name] = e
                    continue
                prepared[name], prompts[name] = graph, graph
                families |= used
            # manual pick over the API: the same run with its fallback reward connected straight to the sampler
            pick = prepared.get(MANUAL_PICK_WORKFLOW.name)
            if isinstance(pick, dict):
                prompts["manual pick: fallback reward"] = fallback_twin(pick)
            off = {family: steering_off_prompt(family) for family in sorted(families)}
            first = wait_all(server, queue_all(server, {**prompts, **{f"off {f}": p for f, (p, _) in off.items()}},
                                                texts.client_id))
            server.post("/free", {"free_memory": True, "unload_models": True})
            time.sleep(1.5)                      # the worker applies /free between prompts
            second = wait_all(server, queue_all(server, {name: prompts[name] for name in prepared
                                                         if name in prompts}, texts.client_id))
            yield {"server": server, "texts": texts, "prepared": prepared, "first": first, "second": second,
                   "off": off, "families": families, "served": served, "out": Path(server.output_dir), "vlm": vlm}
            report_timings(first, second)
        finally:
            texts.close()
            vlm.close()


def fallback_twin(graph: dict) -> dict:
    twin = json.loads(json.dumps(graph))
    picks = {k for k, v in twin.items() if v["class_type"] == "RewardSteerManualPickReward"}
    for node in twin.values():
        for name, value in node["inputs"].items():
            if is_link(value) and value[0] in picks:
                node["inputs"][name] = twin[value[0]]["inputs"]["fallback"]
    for key in picks:
        del twin[key]
    for node in twin.values():
        if node["class_type"] in ("SaveLatent", "SaveImage"):
            node["inputs"]["filename_prefix"] = "probe/fallback_twin/" + node["inputs"]["filename_prefix"].split("/")[-1]
    return twin


def report_timings(first: dict, second: dict) -> None:
    rows = [f"{name}: {seconds(first[name]):.1f} s" + (f", again {seconds(second[name]):.1f} s"
                                                       if isinstance(second.get(name), dict) else "")
            for name in first if isinstance(first[name], dict)]
    print("\nexample run times (server-side):\n  " + "\n  ".join(rows))


# ---- reading the results --------------------------------------------------------------------------------------------

def result(runs, name: str, round_: str = "first") -> dict:
    prepared = runs["prepared"][name]
    if isinstance(prepared, Exception):
        raise prepared
    history = runs[round_][name]
    if isinstance(history, Exception):
        raise AssertionError(f"{name} did not run: {history}")
    return history


def latents_of(runs, history: dict, node_id: str) -> torch.Tensor:
    from safetensors.torch import load_file
    (entry,) = history["outputs"][node_id]["latents"]
    return load_file(str(runs["out"] / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def images_of(runs, history: dict, node_id: str) -> list[np.ndarray]:
    out = []
    for entry in history["outputs"][node_id]["images"]:
        folder = runs["out"] if entry.get("type", "output") == "output" else None
        if folder is None:
            continue
        with Image.open(folder / entry["subfolder"] / entry["filename"]) as im:
            out.append(np.asarray(im))
    return out


def demon_steps(texts: list[str]) -> tuple[list[bool], int, int]:
    """(steered flag per step, K, steered steps reported at the end) from a Demon SAMPLER's node texts."""
    steps = [t for t in texts if t.startswith("step ")]
    done = [t for t in texts if t.startswith("done: ")]
    assert len(done) == 1, texts
    k, steered = map(int, re.match(r"done: K=(\d+), (\d+) steered steps", done[0]).groups())
    return ["(not steered)" not in t for t in steps], k, steered


def smc_steps(texts: list[str]) -> tuple[list[dict], list[float]]:
    """Per step {ess, scored, resampled} and the final ESS, from an SMC SAMPLER's node texts.  The text lists each
    item's ESS for up to 3 items, else the mean and range: `ess` is then [min, max], enough for check_smc."""
    def ess_of(text: str) -> list[float]:
        spread = re.match(r"mean \S+ \((\S+) \.\. (\S+), \d+ items\)", text)
        return [float(v) for v in (spread.groups() if spread else text.split(","))]
    steps = [{"ess": ess_of(re.search(r"ESS: ([^\n]*)", t).group(1)), "scored": "particles' mean" in t,
              "resampled": "\nresampled " in t} for t in texts if t.startswith("step ")]
    (done,) = [t for t in texts if t.startswith("done: ")]
    return steps, ess_of(re.search(r"final ESS: ([^\n]*)", done).group(1))


def check_smc(steps: list[dict], final_ess, particles: int, threshold: float, slack: float = 1e-9) -> None:
    """ESS in [1, N] at every step and at the end; resampling only at a scored step before the last, and there
    exactly for the items whose ESS fell below threshold * N.  `resampled`: per item (trace JSON) or one flag for
    the step (node text: then some item must be below the threshold)."""
    assert steps
    for i, step in enumerate(steps):
        ess, resampled, last = step["ess"], step["resampled"], i == len(steps) - 1
        assert all(1 - slack <= e <= particles + slack for e in ess), (i, step)
        if not step["scored"] or last:
            assert not any(resampled if isinstance(resampled, list) else [resampled]), (i, step)
        elif isinstance(resampled, list):
            assert resampled == [e < threshold * particles for e in ess], (i, step)
        elif resampled:     # node text: ESS rounded to 3 significant digits, hence the slack both ways
            assert min(ess) < threshold * particles + slack, (i, step)
        else:
            assert min(ess) >= threshold * particles - slack, (i, step)
    assert all(1 - slack <= e <= particles + slack for e in final_ess), final_ess


def check_traces(runs, name: str, graph: dict, history: dict) -> list[str]:
    """Asserts on every steering node's trace; returns what it saw (for the failure messages)."""
    outputs, seen = history["outputs"], []
    for node_id, node in graph.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "RewardSteerKSamplerDemon":
            trace = json.loads(outputs[f"probe_trace_{node_id}"]["text"][0])
            steered = [s for s in trace["trace"] if s["steered"]]
            assert len(trace["trace"]) == inputs["steps"] and len(steered) == trace["steered_steps"] > 0, trace
            assert trace["k"] == inputs["k"] and all(s["k"] == inputs["k"] for s in steered)
            assert all(np.isfinite(s["reward_mean"]).all() for s in steered)
            assert outputs[node_id]["demon"][0]["steered_steps"] == len(steered)
            seen.append(f"{node_id}: Demon K={trace['k']}, {len(steered)}/{len(trace['trace'])} steps steered")
        elif kind == "RewardSteerKSamplerSMC":
            trace = json.loads(outputs[f"probe_trace_{node_id}"]["text"][0])
            steps = [{"ess": s["ess"], "scored": "reward_mean" in s, "resampled": s["resampled"]}
                     for s in trace["trace"]]
            assert len(steps) == inputs["steps"] and trace["particles"] == inputs["particles"]
            check_smc(steps, trace["final_ess"], inputs["particles"], inputs["ess_threshold"])
            assert all(abs(sum(w) - 1) < 1e-6 for w in trace["final_weights"]), trace["final_weights"]
            assert sum(s["scored"] for s in steps) >= 2      # an intermediate potential and the final one
            seen.append(f"{node_id}: SMC N={inputs['particles']}, scored {sum(s['scored'] for s in steps)}, "
                        f"resampled {sum(any(s['resampled']) for s in steps)} of {len(steps)} steps")
        elif kind == "RewardSteerBestOfN":
            (best,) = outputs[node_id]["best_of_n"]
            assert all(len(row) == inputs["n"] for row in best["scores"]) and np.isfinite(best["scores"]).all()
            assert best["best"] == [max(row) for row in best["scores"]], best
            seen.append(f"{node_id}: best-of-N N={inputs['n']}, {len(best['scores'])} items")
        elif kind == "SamplerCustomAdvanced":
            sampler = graph[inputs["sampler"][0]]
            texts = runs["texts"].of(history["prompt_id"], node_id)
            if sampler["class_type"] == "RewardSteerDemonSampler":
                flags, k, steered = demon_steps(texts)
                assert k == sampler["inputs"]["k"] and steered == sum(flags) > 0, texts
                seen.append(f"{node_id}: Demon SAMPLER K={k}, {steered}/{len(flags)} steps steered")
            elif sampler["class_type"] == "RewardSteerSMCSampler":
                steps, final_ess = smc_steps(texts)
                n = sampler["inputs"]["particles"]
                check_smc(steps, final_ess, n, sampler["inputs"]["ess_threshold"], slack=0.05)
                assert sum(s["scored"] for s in steps) >= 2, texts
                seen.append(f"{node_id}: SMC SAMPLER N={n}, scored {sum(s['scored'] for s in steps)}, "
                            f"resampled {sum(s['resampled'] for s in steps)} of {len(steps)} steps")
    return seen


# ---- tests ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [p.name for p in WORKFLOW_FILES])
def test_example_runs_on_tiny_stand_ins(runs, name):
    history = result(runs, name)
    graph = runs["prepared"][name]
    outputs = history["outputs"]
    decodes = [k for k, v in graph.items() if v["class_type"] == "VAEDecode"]
    assert decodes, f"{name} decodes nothing"
    for node_id in decodes:
        latent = latents_of(runs, history, f"probe_latent_{node_id}")
        assert torch.isfinite(latent).all(), f"{name}: the latent decoded by node {node_id} is not finite"
        brightness = outputs[f"probe_finite_{node_id}"]["scores"]
        assert len(brightness) == latent.shape[0] and np.isfinite(brightness).all(), brightness
    for node_id, node in graph.items():
        if node["class_type"] == "SaveImage":
            images = images_of(runs, history, node_id)
            source = graph[node["inputs"]["images"][0]]
            assert images, f"{name}: SaveImage {node_id} saved nothing"
            if source["class_type"] == "VAEDecode":
                batch = latents_of(runs, history, f"probe_latent_{node['inputs']['images'][0]}").shape[0]
                assert len(images) == batch and all(im.shape[:2] == (SIZE, SIZE) for im in images), \
                    [im.shape for im in images]
        if node["class_type"] == "RewardSteerScoreImages" and not node_id.startswith("probe_"):
            assert np.isfinite(outputs[node_id]["scores"]).all(), outputs[node_id]
    steering = {"RewardSteerKSamplerDemon", "RewardSteerKSamplerSMC", "RewardSteerDemonSampler",
                "RewardSteerSMCSampler", "RewardSteerBestOfN"}
    seen = check_traces(runs, name, graph, history)
    assert len(seen) == sum(v["class_type"] in steering for v in graph.values()), seen


@pytest.mark.parametrize("name", [p.name for p in WORKFLOW_FILES])
def test_example_same_seed_same_images_after_caches_are_dropped(runs, name):
    first, second = result(runs, name), result(runs, name, "second")
    graph = runs["prepared"][name]
    cached = [m[1]["nodes"] for m in second["status"]["messages"] if m[0] == "execution_cached"]
    samplers = [k for k, v in graph.items() if "Sampler" in v["class_type"] and "Select" not in v["class_type"]]
    assert not any(s in c for c in cached for s in samplers), f"{name}: the second run came from the cache: {cached}"
    compared = 0
    for node_id, node in graph.items():
        if node["class_type"] == "SaveLatent":
            assert torch.equal(latents_of(runs, first, node_id), latents_of(runs, second, node_id)), node_id
            compared += 1
        elif node["class_type"] == "SaveImage":
            a, b = images_of(runs, first, node_id), images_of(runs, second, node_id)
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), node_id
            compared += 1
    assert compared


def test_manual_pick_over_the_api_applies_its_on_timeout_policy_at_once(runs):
    """Queued over the API (no client id), nobody can answer: Manual Pick applies on_timeout ('fallback reward' in the
    example) without waiting its timeout -- the run equals the same graph with the fallback reward connected to the
    sampler directly, bit for bit."""
    name = MANUAL_PICK_WORKFLOW.name
    history, graph = result(runs, name), runs["prepared"][name]
    (pick,) = [v for v in graph.values() if v["class_type"] == "RewardSteerManualPickReward"]
    assert pick["inputs"]["on_timeout"] == "fallback reward" and is_link(pick["inputs"].get("fallback"))
    assert seconds(history) < pick["inputs"]["timeout"] / 4
    twin = runs["first"]["manual pick: fallback reward"]
    assert isinstance(twin, dict), twin
    (decode,) = [k for k, v in graph.items() if v["class_type"] == "VAEDecode"]
    assert torch.equal(latents_of(runs, history, f"probe_latent_{decode}"),
                       latents_of(runs, twin, f"probe_latent_{decode}"))


def example_families() -> list[str]:
    """The families of the examples' loaders (read from the files with the tables above, no server needed)."""
    names = set()
    for path in WORKFLOW_FILES:
        for node in json.loads(path.read_text())["nodes"]:
            for value in node.get("widgets_values") or []:
                for table in (CHECKPOINT_FAMILIES, UNET_FAMILIES):
                    if isinstance(value, str) and value in table:
                        names.add(table[value])
    return sorted(names)


@pytest.mark.parametrize("family", example_families())
def test_steering_off_is_the_family_plain_core_sampler(runs, family):
    prompt, checks = runs["off"][family]
    history = runs["first"][f"off {family}"]
    assert isinstance(history, dict), history
    offset = core_ancestral_noise_offset()
    for what, (steered, core, rtol) in checks.items():
        a = latents_of(runs, history, f"latent_{steered}")
        b = latents_of(runs, history, f"latent_{core}")
        assert a.shape == b.shape and torch.isfinite(a).all()
        print(f"{family} {what}: max |difference| {float((a - b).abs().max()):.3g}, max |plain| "
              f"{float(b.abs().max()):.3g}")
        if "euler_ancestral" in what and offset != 1:
            continue          # see below
        if rtol is None:
            assert torch.equal(a, b), f"{family} {what}: max difference {(a - b).abs().max()}"
        else:
            scale = max(1.0, float(b.abs().max()))
            assert float((a - b).abs().max()) <= rtol * scale, f"{family} {what}: {(a - b).abs().max()} (scale {scale})"
    if any("euler_ancestral" in what for what in checks) and offset != 1:
        pytest.skip("core's euler_ancestral on this ComfyUI draws its step noise from the starting noise's own seed "
                    f"(offset {offset}); SMC draws from seed + 1 as newer core does, so no core ancestral sampler shares "
                    "its noise here")


def test_a_loader_without_stand_in_fails_loudly():
    graph = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": "x.safetensors", "model": ["2", 0]}},
             "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}}}
    with pytest.raises(NoStandIn, match=r"no tiny stand-in for node 1 \(LoraLoader\) reading \['x.safetensors'\]"):
        swap_loaders(graph, {})
    with pytest.raises(NoStandIn, match=r"no tiny stand-in for node 1 \(CheckpointLoaderSimple\) with "
                                        r"ckpt_name='my_model.ckpt'"):
        swap_loaders({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "my_model.ckpt"}}}, {})
    with pytest.raises(NoStandIn, match=r"no tiny stand-in for node 3 \(RewardSteerLoadOpenClip\) reading"):
        swap_loaders({"3": {"class_type": "RewardSteerLoadOpenClip",
                            "inputs": {"architecture": "ViT-L-14", "weights": "other.safetensors"}}},
                     {"open_clip": {"open_clip_vit_l_14.safetensors"}})
    ok = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
          "2": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
          "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "x"}}}
    assert swap_loaders(ok, {}) == {"sdxl"}
    assert ok["1"]["class_type"] == TINY_NODE and ok["2"]["inputs"]["vae"] == ["1", 2]
    flux = {"u": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "c": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
            "v": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "e": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": "x"}},
            "d": {"class_type": "VAEDecode", "inputs": {"samples": ["u", 0], "vae": ["v", 0]}}}
    assert swap_loaders(flux, {}) == {"flux"}
    assert flux["e"]["inputs"]["clip"] == ["c", 1] and flux["d"]["inputs"] == {"samples": ["u", 0], "vae": ["v", 2]}
