"""Input validation through ComfyUI's real executor: conditioning batches that do not divide the latent batch,
non-finite FLOAT inputs, and corrupt model files."""
from __future__ import annotations

import math

import pytest
import torch

import harness

DEMON, SMC, BEST_OF_N = "RewardSteerKSamplerDemon", "RewardSteerKSamplerSMC", "RewardSteerBestOfN"
STEERING = {DEMON: {"k": 3, "decoder": "latent_rgb"}, SMC: {"particles": 2, "decoder": "latent_rgb"},
            BEST_OF_N: {"n": 2}}


def widget_defaults(executor, class_type: str) -> dict:
    """Every widget input of a node at its schema default (a combo at its default or first option)."""
    spec = executor.node_classes[class_type].INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, info = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            if "default" in info:
                values[name] = info["default"]
            elif isinstance(kind, (list, tuple)) and kind:
                values[name] = kind[0]
            elif info.get("options"):
                values[name] = info["options"][0]
    return values


def tiny_steering_prompt(executor, class_type: str, prompts: list[str], batch: int = 3, **over) -> dict:
    """The tiny SD1.5 UNet with one prompt per conditioning batch item (node 1), a one-prompt negative (node 5),
    a latent batch of `batch`, and the steering node (node 3) at cfg 3."""
    inputs = widget_defaults(executor, class_type)
    inputs.update({"model": ["1", 0], "positive": ["1", 2], "negative": ["5", 2], "latent_image": ["2", 0],
                   "reward": ["4", 0], "vae": ["1", 1], "seed": 7, "steps": 3, "cfg": 3.0, "scheduler": "karras",
                   **STEERING[class_type], **over})
    return {
        "1": {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": "\n".join(prompts)}},
        "5": {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": "a grey blur"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "4": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "channel weights", "red": 1.0, "green": 0.0, "blue": 0.0, "bias": 0.0}},
        "3": {"class_type": class_type, "inputs": inputs},
    }


def steered_latent(executor, class_type, prompts, **over) -> torch.Tensor:
    out = executor.run(tiny_steering_prompt(executor, class_type, prompts, **over), want=("3",))
    return out["3"][0][0]["samples"]


@pytest.mark.parametrize("class_type", [DEMON, SMC, BEST_OF_N])
def test_conditioning_batch_2_over_latent_batch_3_is_tiled_like_core(executor, class_type):
    """Core KSampler gives item i of 3 the cond i % 2: [c0, c1] and [c0, c1, c0] are the same run.  So must every
    steering node, whose candidates are K copies of the batch (stated tolerance 1e-6; the inputs are identical)."""
    two = steered_latent(executor, class_type, ["a red apple", "a blue car"])
    three = steered_latent(executor, class_type, ["a red apple", "a blue car", "a red apple"])
    assert two.shape == three.shape == (3, 4, 8, 8)
    assert (two - three).abs().max() <= 1e-6, float((two - three).abs().max())
    swapped = steered_latent(executor, class_type, ["a blue car", "a red apple"])
    assert (two - swapped).abs().max() > 1e-3    # the conditioning does change the images


@pytest.mark.parametrize("class_type", [DEMON, SMC, BEST_OF_N])
def test_conditioning_batch_1_and_equal_batch_stay_aligned(executor, class_type):
    one = steered_latent(executor, class_type, ["a red apple"])
    tiled = steered_latent(executor, class_type, ["a red apple"] * 3)
    assert (one - tiled).abs().max() <= 1e-6, float((one - tiled).abs().max())
    if class_type != BEST_OF_N:   # the steering samplers chunk their candidates: any chunking gives the same run
        prompts = ["a red apple", "a blue car", "a green tree"]
        whole = steered_latent(executor, class_type, prompts)
        chunked = steered_latent(executor, class_type, prompts, chunk_items=3)
        # other batch sizes sum in other orders; this random UNet amplifies that over the steps (its latents reach a
        # few hundred): stated tolerance 1e-5 of the largest value
        scale = float(whole.abs().max())
        assert (whole - chunked).abs().max() <= 1e-5 * scale, (float((whole - chunked).abs().max()), scale)


# --- non-finite FLOAT inputs --------------------------------------------------------------------------------------

# one node for every link type the pack's nodes take
LINK_SOURCES = {"MODEL": ["m", 0], "VAE": ["m", 1], "CONDITIONING": ["m", 2], "LATENT": ["l", 0], "REWARD": ["r", 0],
                "IMAGE": ["i", 0]}
CONTEXT = {
    "m": {"class_type": "RewardSteerReferenceModel",
          "inputs": {"parametrization": "eps", "components": 8, "spread": 0.1, "weights": ""}},
    "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "r": {"class_type": "RewardSteerColorReward",
          "inputs": {"mode": "channel weights", "red": 1.0, "green": 0.0, "blue": 0.0, "bias": 0.0}},
    "i": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
}
OWN_NODE_MODULES = ("reference", "rewards", "demon", "smc", "clip_rewards")
FAST = {"steps": 2, "k": 2, "particles": 2, "n": 2}


def own_float_inputs() -> list[tuple[str, str]]:
    """(node id, FLOAT input) for every FLOAT input of every node in this pack's own node modules."""
    validation = harness.pack_submodule("nodes.validation")
    cases = []
    for module in OWN_NODE_MODULES:
        for node in harness.pack_submodule(f"nodes.{module}").NODES:
            cases += [(node.define_schema().node_id, name) for name in validation.float_input_names(node)]
    return cases


def node_prompt(executor, class_type: str, **values) -> dict:
    """A prompt that runs the node with its defaults (links from CONTEXT) and `values`; the node is "t"."""
    spec = executor.node_classes[class_type].INPUT_TYPES()
    inputs = widget_defaults(executor, class_type)
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if isinstance(entry[0], str) and entry[0] in LINK_SOURCES:
                inputs[name] = LINK_SOURCES[entry[0]]
    inputs.update({key: value for key, value in FAST.items() if key in inputs})
    inputs.update(values)
    return {**CONTEXT, "t": {"class_type": class_type, "inputs": inputs}}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("class_type,name", own_float_inputs())
def test_non_finite_float_inputs_are_refused_naming_node_and_input(executor, class_type, name, value):
    """A NaN passes ComfyUI's min/max check (every comparison with NaN is false): the node refuses it, naming itself
    and the input.  An inf is already refused by ComfyUI's max check, which names the input."""
    with pytest.raises((ValueError, RuntimeError)) as error:
        executor.run(node_prompt(executor, class_type, **{name: value}), want=("t",))
    message = str(error.value)
    assert name in message, message
    if math.isnan(value):
        assert f"({class_type}): the input '{name}' is nan; it must be a finite number" in message, message
    else:
        assert "bigger than max" in message or "must be a finite number" in message, message


def test_the_same_prompts_with_finite_values_run(executor):
    """The prompts above fail only because of the non-finite value."""
    for class_type in sorted({node for node, _ in own_float_inputs()}):
        executor.run(node_prompt(executor, class_type), want=("t",))
