"""Newer ComfyUI features the pack must follow, checked on real ComfyUI objects.  Where the running ComfyUI is
older than the feature, the test gives a real object the feature (found by feature detection, never by version):
a model_sampling with noise_scale set, an image-to-image model_sampling that adds no noise, a patcher with
get_free_memory, a fix_empty_latent_channels that takes the latent's downscale ratios."""
from __future__ import annotations

import copy
import inspect
import types

import numpy as np
import pytest
import torch

import harness

# --- shared set-up --------------------------------------------------------------------------------------------------


def reference_flow():
    cm = harness.pack_submodule("reference.comfy_model")
    return cm.build_reference_model(cm.ReferenceSpec(parametrization="flow"))


def with_object(patcher, name: str, value):
    clone = patcher.clone()
    clone.add_object_patch(name, value)
    return clone


def sample(patcher, sampler_fn, sigmas, batch: int, options: dict, callback=None, seed: int = 0):
    """A sampler function through ComfyUI's sampling path (comfy.sample.sample_custom), the reference model's
    neutral conditioning, cfg 1."""
    import comfy.sample
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    latent = torch.zeros(batch, 3, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = cm.neutral_conditioning()
    sampler = comfy.samplers.KSAMPLER(sampler_fn, extra_options=options)
    with torch.inference_mode():
        return comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                          callback=callback, disable_pbar=True, seed=seed)


def red_scorer():
    cm = harness.pack_submodule("reference.comfy_model")
    scoring = harness.pack_submodule("samplers.scoring")
    rewards = harness.pack_submodule("rewards")
    return scoring.make_latent_scorer(cm.ReferenceVAE(), rewards.LinearColorReward.toward((0.9, 0.2, 0.2)))


def steering_sampler(name: str, **over):
    """(sampler function, options) of the plain SDE, Demon and SMC samplers, small settings."""
    if name == "sde":
        return harness.pack_submodule("samplers.sde").sample_sde, {"beta": 0.5, **over}
    if name == "demon":
        return harness.pack_submodule("samplers.demon").sample_demon, {"score_fn": red_scorer(), "k": 2,
                                                                       "beta": 0.5, **over}
    return harness.pack_submodule("samplers.smc").sample_smc, {"score_fn": red_scorer(), "particles": 2, **over}


# --- a. the latent's downscale ratios (ComfyUI v0.11+: EmptyLatentImage for 8x models, Flux 2 is 16x) -------------


def newer_fix_empty_latent_channels(original):
    """fix_empty_latent_channels as newer ComfyUI has it: an empty latent made for another downscale ratio is
    resized for the model's (nearest), on top of the original channel fix."""
    import comfy.utils

    def fix(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        empty = torch.count_nonzero(latent_image) == 0
        latent_image = original(model, latent_image)
        ratio = model.get_model_object("latent_format").spacial_downscale_ratio
        if empty and downscale_ratio_spacial is not None and downscale_ratio_spacial != ratio:
            scale = downscale_ratio_spacial / ratio
            latent_image = comfy.utils.common_upscale(latent_image, round(latent_image.shape[-1] * scale),
                                                      round(latent_image.shape[-2] * scale), "nearest-exact",
                                                      crop="disabled")
        return latent_image
    return fix


@pytest.mark.parametrize("class_type", ["RewardSteerKSamplerDemon", "RewardSteerKSamplerSMC", "RewardSteerBestOfN"])
def test_all_in_one_nodes_resize_an_empty_latent_made_for_another_downscale_ratio(executor, monkeypatch,
                                                                                   class_type):
    """An EmptyLatentImage made for an 8x VAE ({"downscale_ratio_spacial": 8}) sampled on a 16x model (Flux 2):
    core KSampler hands the ratio to fix_empty_latent_channels, which halves the latent, and drops the key.  So must
    the all-in-one nodes.  On a ComfyUI whose fix_empty_latent_channels does not take the ratio yet, the test gives
    it the newer signature."""
    import comfy.sample
    import nodes as core_nodes
    cm = harness.pack_submodule("reference.comfy_model")
    native = "downscale_ratio_spacial" in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    if not native:
        monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels",
                            newer_fix_empty_latent_channels(comfy.sample.fix_empty_latent_channels))
    base = reference_flow()
    fmt = copy.copy(base.get_model_object("latent_format"))
    fmt.spacial_downscale_ratio = 16
    model = with_object(base, "latent_format", fmt)
    latent = {"samples": torch.zeros(2, 3, 16, 16), "downscale_ratio_spacial": 8}
    node = executor.node_classes[class_type]
    widgets = node_defaults(node)
    widgets.update({"seed": 3, "steps": 3, "cfg": 1.0, "scheduler": "simple", "denoise": 1.0, "k": 1, "beta": 0.0,
                    "particles": 2, "n": 2, "sampler_name": "euler"})
    spec = node.INPUT_TYPES()
    accepted = set(spec.get("required", {})) | set(spec.get("optional", {}))
    cond = cm.neutral_conditioning()
    rewards = harness.pack_submodule("rewards")
    vae = cm.ReferenceVAE()
    vae.upscale_ratio = vae.downscale_ratio = 16   # the 16x model's VAE: the steering nodes check the VAE's layout
    args = {"model": model, "positive": cond, "negative": cond, "latent_image": latent, "vae": vae,
            "reward": rewards.LinearColorReward.toward((0.9, 0.2, 0.2)), **widgets}
    with torch.inference_mode():
        out = node.execute(**{k: v for k, v in args.items() if k in accepted})[0]
    assert out["samples"].shape == (2, 3, 8, 8), out["samples"].shape
    assert not {"downscale_ratio_spacial", "downscale_ratio_temporal"} & set(out)
    if native and class_type == "RewardSteerKSamplerDemon":   # K = 1, beta = 0 is Euler: core KSampler's latent
        with torch.inference_mode():
            core = core_nodes.common_ksampler(model, 3, 3, 1.0, "euler", "simple", cond, cond, latent)[0]
        assert set(core) == set(out)
        assert torch.allclose(core["samples"], out["samples"], atol=1e-5)


def node_defaults(node) -> dict:
    spec = node.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            info = (entry[1] if len(entry) > 1 else {}) or {}
            if "default" in info:
                values[name] = info["default"]
            elif isinstance(entry[0], (list, tuple)) and entry[0]:
                values[name] = entry[0][0]
            elif info.get("options"):
                values[name] = info["options"][0]
    return values


# --- b. free memory as dynamic VRAM counts it (ModelPatcher.get_free_memory, ComfyUI v0.16+) ----------------------


@pytest.mark.parametrize("name", ["demon", "smc"])
def test_automatic_chunks_use_the_patchers_free_memory(monkeypatch, name):
    """With dynamic VRAM the device's free memory undercounts what the model can have; core batches by
    ModelPatcher.get_free_memory.  Device: room for nothing; patcher: room for everything -> one call for all
    candidates of a step, not one per candidate (the patcher method is given to older ComfyUI's ModelPatcher)."""
    import comfy.model_management
    import comfy.model_patcher
    real = comfy.model_management.get_free_memory

    def device_free(dev=None, torch_free_too=False):
        return (1, 1) if torch_free_too else 1

    monkeypatch.setattr(comfy.model_management, "get_free_memory", device_free)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory",
                        lambda self, device: 64 * 1024 ** 3 + 0 * real(device), raising=False)
    summary = {}
    fn, options = steering_sampler(name, report=lambda s: summary.update(s) if s.get("done") else None)
    options.update({"k": 4} if name == "demon" else {"particles": 4})
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(reference_flow().get_model_object("model_sampling"), "simple", 3)
    sample(reference_flow(), fn, sigmas, batch=2, options=options)
    # demon: 3 steps of one call for x, plus the 2 steered steps' candidates in one call each; smc: one per step
    assert summary["batched_model_calls"] == (3 + 2 if name == "demon" else 3), summary


# --- c. the model's noise scale (model_sampling.noise_scale, ComfyUI v0.21.1+; HiDream-O1: 8) ---------------------

NOISE_SCALE = 8.0


@pytest.mark.parametrize("name", [
    "sde",
    "demon",
    "smc",
])
def test_fresh_noise_is_scaled_by_the_models_noise_scale(name):
    """From sigma = 1 every sampler draws all of the next state's noise fresh: x' = alpha' D + sigma' s z with s the
    model's noise scale, as core's stochastic samplers scale theirs.  Stated tolerance: the std of
    (x' - alpha' D) / sigma' within 5 % of s over 16 x 192 values (standard error 1.3 %)."""
    base = reference_flow()
    ms = copy.copy(base.get_model_object("model_sampling"))
    ms.noise_scale = NOISE_SCALE                     # what set_noise_scale / sampling_settings give newer ComfyUI
    model = with_object(base, "model_sampling", ms)
    calls = []
    fn, options = steering_sampler(name)
    sample(model, fn, torch.tensor([1.0, 0.5, 0.25]), batch=16, options=options,
           callback=lambda i, denoised, x, total: calls.append((x.clone(), denoised.clone())))
    # the SDE baseline reports before each step, Demon and SMC after it
    x1, d0 = (calls[1][0], calls[0][1]) if name == "sde" else calls[0]
    ratio = float(((x1.double() - 0.5 * d0.double()) / 0.5).std() / NOISE_SCALE)
    assert abs(ratio - 1.0) < 0.05, ratio


def test_the_step_scales_only_the_fresh_noise():
    """step_mean_std: the mean is unchanged by the noise scale, the std is multiplied by it."""
    sde = harness.pack_submodule("samplers.sde")
    x, d = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fresh = sde.fresh_fraction_beta(0.6, 0.4, 0.3, True, x)
    mean1, std1 = sde.step_mean_std(x, d, 0.6, 0.4, fresh, True)
    mean8, std8 = sde.step_mean_std(x, d, 0.6, 0.4, fresh, True, noise_scale=8.0)
    assert torch.equal(mean1, mean8) and torch.allclose(std8, 8.0 * std1)


# --- d. latent -> RGB factors that need a reshape first (Flux 2: 128 channels) --------------------------------------


def test_latent_rgb_decoder_unpacks_flux2_latents_like_core_previews():
    """Flux 2's 128 latent channels are 32 channels in 2x2 patches: core's preview unpacks them
    (latent_rgb_factors_reshape) before its 32 factors.  Stated tolerance: one 8-bit step (core's preview is
    truncated to 8 bits)."""
    import comfy.latent_formats
    import latent_preview
    scoring = harness.pack_submodule("samplers.scoring")
    fmt = comfy.latent_formats.Flux2()
    assert fmt.latent_rgb_factors_reshape is not None
    x0 = torch.randn(2, 128, 4, 5, generator=torch.Generator().manual_seed(0))
    ours = scoring.latent_rgb_decode(types.SimpleNamespace(latent_format=fmt), x0)
    assert ours.shape == (2, 8, 10, 3)
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias,
                                                   fmt.latent_rgb_factors_reshape)
    for i in range(2):
        core = torch.from_numpy(np.asarray(previewer.decode_latent_to_preview(x0[i:i + 1])).astype(np.float32)) / 255
        assert (ours[i] - core).abs().max() <= 1 / 255 + 1e-6


# --- e. image-to-image model_sampling that adds no noise (IMG_TO_IMG_FLOW, IMG_TO_IMG_VELOCITY) -------------------


def no_noise_samplings():
    """core's no-noise model_sampling classes where this ComfyUI has them, else a stand-in with the same
    noise_scaling (the input image, no noise) under the same name."""
    import comfy.model_sampling
    found = [getattr(comfy.model_sampling, name, None) for name in ("IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY")]
    found = [cls for cls in found if cls is not None]
    if found:
        return found

    class IMG_TO_IMG_FLOW(comfy.model_sampling.CONST):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    return [IMG_TO_IMG_FLOW]


@pytest.mark.parametrize("name", ["sde", "demon", "smc"])
def test_models_whose_sampling_adds_no_noise_are_refused_by_name(name):
    import comfy.model_sampling
    import comfy.samplers
    scoring = harness.pack_submodule("samplers.scoring")
    for kind in no_noise_samplings():
        ms = type("ModelSampling", (comfy.model_sampling.ModelSamplingDiscreteFlow, kind), {})(None)
        model = with_object(reference_flow(), "model_sampling", ms)
        fn, options = steering_sampler(name)
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 3)
        with pytest.raises(scoring.SteeringInputError, match=f"sampling {kind.__name__}\\) is an image-to-image model "
                                                             "whose sampling adds no noise"):
            sample(model, fn, sigmas, batch=1, options=options)
