"""Nodes for the known-answer models: the analytic reference model, its exact target, the tiny test UNet."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..reference.comfy_model import (PARAMETRIZATIONS, ReferenceSpec, ReferenceVAE, build_reference_model,
                                     latent_to_image, neutral_conditioning, parse_weights, reference_spec_of)
from ..reference.pictures import PICTURE_NAMES
from ..reference.target import exact_target, latent_reward_form
from ..reference.tiny_families import FAMILIES, build_family
from ..reference.tiny_unet import build_tiny_unet_model, build_tiny_vae, prompt_conditioning
from .types import Reward

CATEGORY = "reward_steering/reference"


class ReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerReferenceModel",
            display_name="Reference Model (exact Gaussian mixture)",
            category=CATEGORY,
            description="A diffusion model whose answer is known exactly: the denoiser of a mixture of small "
                        "pictures, in ComfyUI's eps, v-prediction or flow parametrisation. For learning and "
                        "testing steering: use EmptyLatentImage (256x256 gives 32x32 latents), any sampler, "
                        "and the VAE output to see images. It ignores the prompt.",
            inputs=[
                io.Combo.Input("parametrization", options=list(PARAMETRIZATIONS), default="eps",
                               tooltip="eps / v_prediction (zero-terminal-SNR schedule) or flow (like SD3/Flux)"),
                io.Int.Input("components", default=8, min=1, max=len(PICTURE_NAMES),
                             tooltip="how many of the pictures (" + ", ".join(PICTURE_NAMES) + ") the mixture holds"),
                io.Float.Input("spread", default=0.1, min=0.005, max=1.0, step=0.005,
                               tooltip="standard deviation of each pixel around its picture, in latent units "
                                       "(latent = 2*image - 1)"),
                io.String.Input("weights", default="",
                                tooltip="component probabilities as comma-separated numbers (normalised); "
                                        "empty = all equal"),
            ],
            outputs=[io.Model.Output(tooltip="the exact denoiser of the mixture: use it like any MODEL (KSampler, "
                                             "the steering samplers, SamplerCustom)"),
                     io.Vae.Output(tooltip="its decoder (latent = 2 x image - 1, 8x upscale): VAE Decode, and the "
                                           "steering samplers' vae input"),
                     io.Conditioning.Output(display_name="conditioning",
                                            tooltip="neutral conditioning for positive and negative")],
        )

    @classmethod
    def execute(cls, parametrization, components, spread, weights) -> io.NodeOutput:
        spec = ReferenceSpec(components=components, spread=spread, weights=parse_weights(weights, components),
                             parametrization=parametrization)
        return io.NodeOutput(build_reference_model(spec), ReferenceVAE(), neutral_conditioning())


class ReferenceExactTarget(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerReferenceExactTarget",
            display_name="Reference Model Exact Target",
            category=CATEGORY,
            description="The exact law a reward-steered sampler should reach on the reference model with a "
                        "linear reward (Colour Reward) or -MSE image similarity (quadratic in the latent): "
                        "component probabilities, spread, and the reward's mean and standard deviation under p and "
                        "p*exp(lambda*r).",
            inputs=[
                io.Model.Input("model", tooltip="the MODEL output of Reference Model"),
                Reward.Input("reward", tooltip="a linear reward (Colour Reward) or -MSE Image Similarity"),
                io.Latent.Input("latent", tooltip="the latent you sample (its size sets the picture size)"),
                io.Float.Input("lam", display_name="lambda", default=10.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="strength of the tilt: target p(x)*exp(lambda*r(x))"),
            ],
            outputs=[io.String.Output(display_name="target_json",
                                      tooltip="JSON: the tilted law's component probabilities and spread, and the "
                                              "reward's mean and std under p and under p x exp(lambda r); also "
                                              "shown on the node")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, reward, latent, lam) -> io.NodeOutput:
        spec = reference_spec_of(model)
        if spec is None:
            raise ValueError("Exact Target needs the MODEL from the Reference Model node (other models have no "
                             "closed-form answer)")
        h, w = latent["samples"].shape[-2:]
        weights, bias, curvature = latent_reward_form(reward, latent_to_image, (3, h, w))
        target = {"reward": reward.describe(), **exact_target(spec.mixture(h, w), weights, bias, lam, curvature)}
        text = (f"{target['reward']}: E_p[r] = {target['expected_reward_base']:.4f}; "
                f"E[r] under p*exp({lam:g} r) = {target['expected_reward_tilted']:.4f}\n" +
                "\n".join(f"{n}: {p:.3f} -> {q:.3f}" for n, p, q in
                          zip(target["components"], target["base_probabilities"], target["tilted_probabilities"])))
        return io.NodeOutput(json.dumps(target), ui={"text": [text], "target": [target]})


class TinyTestModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerTinyTestModel",
            display_name="Tiny Random SD1.5 UNet (testing)",
            category=CATEGORY,
            description="ComfyUI's real SD1.5 UNet code at a tiny size with seeded random weights, a random TAESD "
                        "decoder and a prompt embedding: exercises the real network path without any weights "
                        "file. Its images are noise patterns, not pictures.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="seed of the random weights"),
                io.String.Input("prompt", default="a test prompt", multiline=True,
                                tooltip="mapped to a deterministic random embedding; several lines give a "
                                        "conditioning batch, one line per item (ComfyUI tiles it over the latent "
                                        "batch)"),
            ],
            outputs=[io.Model.Output(tooltip="a tiny SD1.5 UNet with random weights (testing: images are noise)"),
                     io.Vae.Output(tooltip="ComfyUI's TAESD with random weights, for its 4-channel latents"),
                     io.Conditioning.Output(display_name="conditioning",
                                            tooltip="the prompt's embedding, one item per line of prompt")],
        )

    @classmethod
    def execute(cls, seed, prompt) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_unet_model(seed), build_tiny_vae(seed), batch_conditioning(prompt))


class TinyFamilyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardSteerTinyFamilyModel",
            display_name="Tiny Random Model (testing)",
            category=CATEGORY,
            description="For testing only: ComfyUI's real model code of a family (SD1.5, SD2 v-prediction, SDXL, "
                        "SD3, Flux, Flux 2, Wan 2.1 text-to-video) at a tiny size with seeded random weights, a "
                        "stand-in text encoder that gives the family's real conditioning shapes, and a tiny VAE of "
                        "the family's latent layout. Use it in place of a checkpoint loader; its images are noise.",
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default=FAMILIES[0],
                               tooltip="the model family whose architecture, latent layout and conditioning to use"),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="seed of the random weights"),
            ],
            outputs=[io.Model.Output(tooltip="the family's real ComfyUI model at a tiny size, random weights"),
                     io.Clip.Output(tooltip="a stand-in text encoder giving the family's real conditioning shapes "
                                            "(use CLIP Text Encode on it)"),
                     io.Vae.Output(tooltip="a tiny VAE of the family's latent layout")],
        )

    @classmethod
    def execute(cls, family, seed) -> io.NodeOutput:
        return io.NodeOutput(*build_family(family, seed))


def batch_conditioning(prompt: str):
    """One embedding per non-empty line, as a conditioning batch; a single line is the whole text, as before."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if len(lines) < 2:
        return prompt_conditioning(prompt)
    return [[torch.cat([prompt_conditioning(line)[0][0] for line in lines]), {}]]


NODES = [ReferenceModel, ReferenceExactTarget, TinyTestModel, TinyFamilyModel]
