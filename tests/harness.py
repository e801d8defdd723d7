"""In-process access to ComfyUI for tests: import it the way main.py does, load the pack the way ComfyUI does,
and execute API-format prompts through the real `execution.PromptExecutor`."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import uuid
from pathlib import Path

PACK_LINK_NAME = "comfyui-reward-steering"
_state: dict = {}


def bootstrap_comfy(comfy_dir: Path) -> None:
    """Make `import comfy...` work as under `main.py --cpu` (args parsed from a controlled argv)."""
    if "comfy_dir" in _state:
        return
    comfy_dir = Path(comfy_dir).resolve()
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)
    argv = sys.argv
    sys.argv = ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
        import utils.extra_config  # noqa: F401  (must precede `server`)
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = argv
    _state["comfy_dir"] = comfy_dir


def pack_module_name() -> str:
    import folder_paths
    path = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], PACK_LINK_NAME)
    return path.replace(".", "_x_")  # what nodes.load_custom_node calls a package directory


def import_pack():
    name = pack_module_name()
    if name in sys.modules:
        return sys.modules[name]
    path = Path(name.replace("_x_", "."))
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_submodule(dotted: str):
    """e.g. pack_submodule('reference.mixture') -> the module as ComfyUI's copy of the pack has it."""
    import_pack()
    return importlib.import_module(f"{pack_module_name()}.{dotted}")


class InProcessExecutor:
    """ComfyUI's real PromptExecutor with a real (not listening) PromptServer; records sent messages."""

    def __init__(self):
        import_pack()
        import execution
        import nodes
        import server
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.server = server.PromptServer(loop)
        self.messages: list[tuple[str, object]] = []
        original_send_sync = self.server.send_sync

        def record(event, data, sid=None):
            self.messages.append((event, data))
            original_send_sync(event, data, sid)

        self.server.send_sync = record
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        import comfy.model_management
        import comfy.utils
        self.progress: list[tuple[int, int, bool]] = []

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            # Like main.hijack_progress: every progress update is an interrupt check.
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.progress.append((value, total, preview_image is not None))

        comfy.utils.set_progress_bar_global_hook(progress_hook)
        self.node_classes = nodes.NODE_CLASS_MAPPINGS
        # main.py's cache arguments: "ram_inactive" joined "lru" / "ram" in newer ComfyUI; older ones ignore it
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                   cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self._execution = execution
        self._loop = loop

    def validate(self, prompt: dict):
        return self._loop.run_until_complete(self._execution.validate_prompt(uuid.uuid4().hex, prompt, None))

    def run(self, prompt: dict, fresh: bool = True, want: tuple[str, ...] = ()):
        """Validate and execute; returns {node_id: outputs tuple} for every executed node.  Raises on errors.
        `want`: node ids whose outputs are needed though no output node consumes them (a core
        PreviewAny sink is attached to each, since ComfyUI only executes what leads to an output node)."""
        prompt = dict(prompt)
        for node_id in want:
            prompt[f"sink_{node_id}"] = {"class_type": "PreviewAny", "inputs": {"source": [node_id, 0]}}
        valid, error, outputs, node_errors = self.validate(prompt)
        if not valid:
            raise ValueError(f"invalid prompt: {error} {node_errors}")
        if fresh:
            self.executor.reset()
        prompt_id = uuid.uuid4().hex
        self.messages.clear()
        self.progress.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": "tests"}, outputs)
        if not self.executor.success:
            errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"execution failed: {errors}")
        outputs_cache = self.executor.caches.outputs
        # the synchronous lookup: `get` became a coroutine in ComfyUI v0.17, with `get_local` as its plain form
        lookup = getattr(outputs_cache, "get_local", None) or outputs_cache.get
        results = {}
        for node_id in prompt:
            entry = lookup(node_id)
            if entry is not None:
                results[node_id] = entry.outputs if hasattr(entry, "outputs") else entry
        self.history = self.executor.history_result
        return results


def reference_model_node(parametrization: str = "eps", weights: str = "") -> dict:
    return {"class_type": "RewardSteerReferenceModel",
            "inputs": {"parametrization": parametrization, "components": 8, "spread": 0.1, "weights": weights}}


def red_reward_node() -> dict:
    """The weight-free colour reward 'toward red' used across the tests."""
    return {"class_type": "RewardSteerColorReward",
            "inputs": {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}}


def sampler_custom_advanced_nodes(sampler: str, scheduler: str, steps: int, seed: int = 1) -> dict:
    """Nodes "5".."8": BasicScheduler, RandomNoise, BasicGuider and SamplerCustomAdvanced running the SAMPLER of
    node `sampler` on the MODEL / CONDITIONING of node "1" from the latent of node "2"."""
    return {
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": scheduler, "steps": steps,
                                                         "denoise": 1.0}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "7": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["1", 2]}},
        "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["7", 0],
                                                                "sampler": [sampler, 0], "sigmas": ["5", 0],
                                                                "latent_image": ["2", 0]}},
    }


def masked_img2img_graph(parametrization: str) -> dict:
    """Nodes 1-7: the reference model, a batch of 2 encoded images, and a noise mask on their left half (node 7
    is the masked LATENT, node 3 the unmasked encoding)."""
    return {
        "1": reference_model_node(parametrization),
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x3366CC}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 1]}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["5", 0], "x": 0, "y": 0,
                                                        "operation": "add"}},
        "7": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["3", 0], "mask": ["6", 0]}},
    }
