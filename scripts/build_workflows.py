#!/usr/bin/env python3
"""Write the UI-format workflow files in workflows/ from the API graphs below, laid out with the real node
definitions of a running ComfyUI (/object_info).  Re-run after changing a graph; the tests check that every file
validates and that each file still equals its graph here.

    .host/v0.3.75/venv/bin/python scripts/build_workflows.py
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import NODE_SIZES, REPO, TITLE_HEIGHT, ComfyServer, api_to_ui  # noqa: E402

MIN_NODE_WIDTH = 300   # narrower nodes cut their widgets' labels

DEMO_LAMBDA = 10.0


DEMON_DEFAULTS = {"k": 16, "beta": 0.1, "weighting": "tanh", "tau": 0.0, "estimator": "tweedie",
                  "max_rollout_steps": 20, "min_sigma": 0.0, "start": 0.0, "end": 1.0, "chunk_items": 0,
                  "budget": 0, "decoder": "vae", "prompt": ""}


SMC_DEFAULTS = {"particles": 8, "lam": DEMO_LAMBDA, "potential": "difference", "tempering": "none", "gamma": 0.008,
                "resampling": "systematic", "ess_threshold": 0.5, "reward_start": 0, "reward_end": -1,
                "reward_interval": 1, "eta": 1.0, "gradient_guidance": False, "output": "weighted_draw",
                "chunk_items": 0, "decoder": "vae", "prompt": ""}


def demo_reference() -> dict:
    """Plain sampling vs Demon on the reference model, same seed, scored by a weight-free colour reward,
    next to the exact target."""
    return {
        "1": {"class_type": "RewardSteerReferenceModel", "_meta": {"title": "Reference Model (exact)"},
              "inputs": {"parametrization": "eps", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 16}},
        "3": {"class_type": "KSampler", "_meta": {"title": "Plain KSampler"},
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "reward_steering_demo/plain"}},
        "6": {"class_type": "RewardSteerColorReward", "_meta": {"title": "Reward: toward red"},
              "inputs": {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}},
        "7": {"class_type": "RewardSteerScoreImages", "_meta": {"title": "Score plain samples"},
              "inputs": {"images": ["4", 0], "reward": ["6", 0], "prompt": ""}},
        "8": {"class_type": "RewardSteerReferenceExactTarget", "_meta": {"title": "Exact target"},
              "inputs": {"model": ["1", 0], "reward": ["6", 0], "latent": ["2", 0], "lam": DEMO_LAMBDA}},
        "9": {"class_type": "RewardSteerKSamplerDemon", "_meta": {"title": "KSampler (Demon)"},
              "inputs": {"model": ["1", 0], "seed": 42, "steps": 30, "cfg": 1.0, "scheduler": "normal",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["6", 0], "vae": ["1", 1], **DEMON_DEFAULTS}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 1]}},
        "11": {"class_type": "SaveImage",
               "inputs": {"images": ["10", 0], "filename_prefix": "reward_steering_demo/demon"}},
        "12": {"class_type": "RewardSteerScoreImages", "_meta": {"title": "Score Demon samples"},
               "inputs": {"images": ["10", 0], "reward": ["6", 0], "prompt": ""}},
        "13": {"class_type": "SaveImage",
               "inputs": {"images": ["9", 2], "filename_prefix": "reward_steering_demo/demon_trace"}},
        "14": {"class_type": "RewardSteerKSamplerSMC", "_meta": {"title": "KSampler (SMC / FK steering)"},
               "inputs": {"model": ["1", 0], "seed": 42, "steps": 30, "cfg": 1.0, "scheduler": "normal",
                          "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                          "reward": ["6", 0], "vae": ["1", 1], **{**SMC_DEFAULTS, "particles": 16}}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 1]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "reward_steering_demo/fk"}},
        "17": {"class_type": "RewardSteerScoreImages", "_meta": {"title": "Score FK samples"},
               "inputs": {"images": ["15", 0], "reward": ["6", 0], "prompt": ""}},
        "18": {"class_type": "SaveImage",
               "inputs": {"images": ["14", 2], "filename_prefix": "reward_steering_demo/fk_trace"}},
    }


def _text_to_image_demon(checkpoint: str, size: int, steps: int, cfg: float, k: int, smc: bool = False) -> dict:
    """Checkpoint loader + prompts + KSampler (Demon or SMC) + a weight-free reward: the SD1.5 / SDXL examples."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
              "inputs": {"clip": ["1", 1], "text": "a cozy cabin in a snowy forest at sunset, warm light"}},
        "3": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"},
              "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "RewardSteerColorReward", "_meta": {"title": "Reward: warmer colours"},
              "inputs": {"mode": "toward colour", "red": 1.0, "green": 0.6, "blue": 0.2, "bias": 0.0}},
        "6": {"class_type": "RewardSteerKSamplerSMC" if smc else "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "seed": 0, "steps": steps, "cfg": cfg, "scheduler": "karras",
                         "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
                         "reward": ["5", 0], "vae": ["1", 2],
                         **({**SMC_DEFAULTS, "particles": k, "reward_interval": 5} if smc else
                            {**DEMON_DEFAULTS, "k": k, "min_sigma": 0.11})}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fk" if smc else "demon"}},
        "9": {"class_type": "PreviewImage", "_meta": {"title": "Reward per step"}, "inputs": {"images": ["6", 2]}},
        "10": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["7", 0], "reward": ["5", 0],
                                                                  "prompt": ""}},
    }


def example_sd15_demon() -> dict:
    return _text_to_image_demon("v1-5-pruned-emaonly.safetensors", 512, 30, 7.0, 8)


def example_sdxl_demon() -> dict:
    return _text_to_image_demon("sd_xl_base_1.0.safetensors", 1024, 30, 5.0, 8)


def example_sd15_smc() -> dict:
    return _text_to_image_demon("v1-5-pruned-emaonly.safetensors", 512, 30, 7.0, 4, smc=True)


def example_sdxl_smc() -> dict:
    return _text_to_image_demon("sd_xl_base_1.0.safetensors", 1024, 30, 5.0, 4, smc=True)


def example_flux_smc() -> dict:
    """Flux with the SMC SAMPLER (its ancestral step is the correct stochastic step for flow models)."""
    graph = example_flux_demon()
    graph["11"] = {"class_type": "RewardSteerSMCSampler",
                   "inputs": {"reward": ["10", 0], "vae": ["3", 0], **{**SMC_DEFAULTS, "particles": 4,
                                                                       "reward_interval": 4}}}
    graph["14"]["inputs"]["filename_prefix"] = "flux_fk"
    return graph


def example_sd15_aesthetic_demon() -> dict:
    """SD1.5 steered by the LAION aesthetic predictor (ViT-L-14 in models/open_clip, head in models/aesthetic)."""
    graph = _text_to_image_demon("v1-5-pruned-emaonly.safetensors", 512, 30, 7.0, 8)
    graph["11"] = {"class_type": "RewardSteerLoadOpenClip",
                   "inputs": {"architecture": "ViT-L-14-quickgelu", "weights": "open_clip_vit_l_14.safetensors"}}
    graph["5"] = {"class_type": "RewardSteerAestheticReward", "_meta": {"title": "Reward: LAION aesthetic"},
                  "inputs": {"clip": ["11", 0], "head": "sac+logos+ava1-l14-linearMSE.pth"}}
    return graph


def example_sd15_aesthetic_clipvision_demon() -> dict:
    """The same, with the ViT-L/14 from ComfyUI's core Load CLIP Vision (models/clip_vision) as the backbone."""
    graph = example_sd15_aesthetic_demon()
    graph["11"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_vit_l_14.safetensors"}}
    return graph


def example_sdxl_clipscore_smc() -> dict:
    """SDXL with SMC / FK steering toward the prompt's CLIP score (the SMC node passes its prompt to the reward)."""
    graph = _text_to_image_demon("sd_xl_base_1.0.safetensors", 1024, 30, 5.0, 4, smc=True)
    graph["11"] = {"class_type": "RewardSteerLoadOpenClip",
                   "inputs": {"architecture": "ViT-L-14-quickgelu", "weights": "open_clip_vit_l_14.safetensors"}}
    graph["5"] = {"class_type": "RewardSteerClipScoreReward", "_meta": {"title": "Reward: CLIP score vs prompt"},
                  "inputs": {"clip": ["11", 0], "text": "", "negative_text": "blurry, low quality"}}
    graph["6"]["inputs"]["prompt"] = graph["2"]["inputs"]["text"]
    graph["10"]["inputs"]["prompt"] = graph["2"]["inputs"]["text"]
    return graph


def example_flux_demon() -> dict:
    """Flux (a flow model): separate loaders, FluxGuidance, and the Demon SAMPLER in SamplerCustomAdvanced."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                         "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0],
                                                         "text": "a lighthouse on a cliff, golden hour, photo"}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "6": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["5", 0]}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 20,
                                                         "denoise": 1.0}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "10": {"class_type": "RewardSteerColorReward", "_meta": {"title": "Reward: warmer colours"},
               "inputs": {"mode": "toward colour", "red": 1.0, "green": 0.6, "blue": 0.2, "bias": 0.0}},
        "11": {"class_type": "RewardSteerDemonSampler",
               "inputs": {"reward": ["10", 0], "vae": ["3", 0], **{**DEMON_DEFAULTS, "k": 8, "end": 0.6}}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["7", 0], "guider": ["6", 0],
                                                                 "sampler": ["11", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["9", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "flux_demon"}},
    }


def example_reference_manual_pick() -> dict:
    """Demon steered by a person: the Manual Pick Reward shows K=4 candidates per item at each of the first 4 of
    8 steps in the page (batch of 2: two grids per step); a colour reward takes over if nobody answers."""
    return {
        "1": {"class_type": "RewardSteerReferenceModel", "_meta": {"title": "Reference Model (exact)"},
              "inputs": {"parametrization": "eps", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "3": {"class_type": "RewardSteerManualPickReward", "_meta": {"title": "Manual Pick Reward"},
              "inputs": {"question": "Pick the reddest candidate(s)", "mode": "pick", "ask_every": 1,
                         "timeout": 120, "on_timeout": "fallback reward", "fallback": ["6", 0]}},
        "4": {"class_type": "RewardSteerKSamplerDemon", "_meta": {"title": "KSampler (Demon)"},
              "inputs": {"model": ["1", 0], "seed": 3, "steps": 8, "cfg": 1.0, "scheduler": "normal",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1],
                         **{**DEMON_DEFAULTS, "k": 4, "end": 0.5, "prompt": "a red sun"}}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "RewardSteerColorReward", "_meta": {"title": "Reward: toward red"},
              "inputs": {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}},
        "7": {"class_type": "RewardSteerScoreImages", "_meta": {"title": "Redness of the results"},
              "inputs": {"images": ["5", 0], "reward": ["6", 0], "prompt": ""}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "manual_pick/demon"}},
    }


VLM_REWARD_DEFAULTS = {"base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                       "api_key_env": "OPENAI_API_KEY", "mode": "pairwise_top_half", "max_score": 10.0,
                       "images_per_call": 1, "image_size": 512, "failure": "fail", "cache": True, "concurrency": 4,
                       "requests_per_minute": 0, "max_retries": 4, "timeout": 60.0, "deadline": 600.0,
                       "structured_output": "auto"}
# The paper's VLM runs: beta 0.2, tau 1e-4 (the weights are the sign of reward - mean: top half pushes, rest pulls)
VLM_DEMON = {"beta": 0.2, "tau": 0.0001}


def example_reference_vlm_demon() -> dict:
    """Demon on the reference model steered by a VLM (pairwise tournament, top half = 1), no model files needed:
    point base_url at any OpenAI-compatible vision server (vLLM / Ollama / LM Studio locally: no key)."""
    return {
        "1": {"class_type": "RewardSteerReferenceModel", "_meta": {"title": "Reference Model (exact)"},
              "inputs": {"parametrization": "eps", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
        "3": {"class_type": "RewardSteerVLMReward", "_meta": {"title": "VLM Reward (local server)"},
              "inputs": {**VLM_REWARD_DEFAULTS, "image_size": 256,
                         "rubric": "Which picture is more strongly red (warm red tones dominating the picture)?"}},
        "4": {"class_type": "RewardSteerKSamplerDemon", "_meta": {"title": "KSampler (Demon, VLM-steered)"},
              "inputs": {"model": ["1", 0], "seed": 42, "steps": 20, "cfg": 1.0, "scheduler": "normal",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1], **{**DEMON_DEFAULTS, "k": 8, **VLM_DEMON}}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "reward_steering_vlm"}},
        "7": {"class_type": "PreviewImage", "_meta": {"title": "Reward per step"}, "inputs": {"images": ["4", 2]}},
    }


def example_sdxl_vlm_demon() -> dict:
    """SDXL + Demon steered by a VLM judging the candidates against the prompt (the paper's VLM set-up)."""
    graph = _text_to_image_demon("sd_xl_base_1.0.safetensors", 1024, 30, 5.0, 8)
    graph["5"] = {"class_type": "RewardSteerVLMReward", "_meta": {"title": "VLM Reward"},
                  "inputs": {**VLM_REWARD_DEFAULTS,
                             "rubric": 'Which image better shows "{prompt}", and is the better picture?'}}
    graph["6"]["inputs"].update(VLM_DEMON, prompt=graph["2"]["inputs"]["text"])
    del graph["10"]  # a single final image has nothing to be compared with
    return graph


def example_sdxl_image_reward_demon() -> dict:
    """SDXL steered by Demon toward ImageReward of the prompt (the Demon node passes its prompt to the reward).
    Files: models/image_reward/ImageReward.pt + med_config.json (huggingface.co/THUDM/ImageReward) and
    models/image_reward/bert-base-uncased/vocab.txt (huggingface.co/google-bert/bert-base-uncased)."""
    graph = _text_to_image_demon("sd_xl_base_1.0.safetensors", 1024, 30, 5.0, 8)
    graph["5"] = {"class_type": "RewardSteerImageReward", "_meta": {"title": "Reward: ImageReward vs the prompt"},
                  "inputs": {"weights": "ImageReward.pt", "text": "", "precision": "auto"}}
    graph["6"]["inputs"]["prompt"] = graph["2"]["inputs"]["text"]
    graph["10"]["inputs"]["prompt"] = graph["2"]["inputs"]["text"]
    return graph


def example_flux_pickscore_smc() -> dict:
    """Flux with the SMC SAMPLER toward PickScore of the prompt.  Files: the PickScore_v1 folder
    (huggingface.co/yuvalkirstain/PickScore_v1) as models/pickscore/PickScore_v1/."""
    graph = example_flux_smc()
    graph["10"] = {"class_type": "RewardSteerPickScoreReward", "_meta": {"title": "Reward: PickScore vs the prompt"},
                   "inputs": {"weights": "PickScore_v1/model.safetensors", "text": "", "precision": "auto"}}
    graph["11"]["inputs"]["prompt"] = graph["4"]["inputs"]["text"]
    graph["14"]["inputs"]["filename_prefix"] = "flux_fk_pickscore"
    return graph


def example_sd15_hps_best_of_n() -> dict:
    """SD1.5 best-of-N (seed search) by HPS v2.1 of the prompt.  Files: models/hps/HPS_v2.1_compressed.pt
    (huggingface.co/xswu/HPSv2)."""
    graph = _text_to_image_demon("v1-5-pruned-emaonly.safetensors", 512, 30, 7.0, 8)
    graph["5"] = {"class_type": "RewardSteerHPSReward", "_meta": {"title": "Reward: HPS v2.1 vs the prompt"},
                  "inputs": {"weights": "HPS_v2.1_compressed.pt", "text": "", "precision": "auto"}}
    sampler = graph["6"]["inputs"]
    graph["6"] = {"class_type": "RewardSteerBestOfN", "_meta": {"title": "Best-of-N (HPS v2.1)"},
                  "inputs": {**{k: sampler[k] for k in ("model", "seed", "steps", "cfg", "scheduler", "positive",
                                                        "negative", "latent_image", "denoise", "reward", "vae")},
                             "sampler_name": "euler", "n": 8, "prompt": graph["2"]["inputs"]["text"]}}
    graph["8"]["inputs"]["filename_prefix"] = "best_of_n_hps"
    del graph["9"]          # best-of-N has no per-step plot; its scores are in scores_json
    graph["10"]["inputs"]["prompt"] = graph["2"]["inputs"]["text"]
    return graph


WORKFLOWS = {
    "Start here, Demon and SMC vs plain (no downloads).json": demo_reference,
    "SD1.5 + Demon, warmer colours.json": example_sd15_demon,
    "SDXL + Demon, warmer colours.json": example_sdxl_demon,
    "Flux + Demon sampler, warmer colours.json": example_flux_demon,
    "SD1.5 + SMC, warmer colours.json": example_sd15_smc,
    "SDXL + SMC, warmer colours.json": example_sdxl_smc,
    "Flux + SMC sampler, warmer colours.json": example_flux_smc,
    "SD1.5 + Demon, LAION aesthetic.json": example_sd15_aesthetic_demon,
    "SD1.5 + Demon, aesthetic from CLIP Vision.json": example_sd15_aesthetic_clipvision_demon,
    "SDXL + SMC, CLIP score.json": example_sdxl_clipscore_smc,
    "Reference model + Demon, a VLM judges.json": example_reference_vlm_demon,
    "SDXL + Demon, a VLM judges.json": example_sdxl_vlm_demon,
    "Reference model + Demon, you pick.json": example_reference_manual_pick,
    "SDXL + Demon, ImageReward.json": example_sdxl_image_reward_demon,
    "Flux + SMC, PickScore.json": example_flux_pickscore_smc,
    "SD1.5 + best of N, HPSv2.1.json": example_sd15_hps_best_of_n,
}


SD15_FILE = "models/checkpoints/v1-5-pruned-emaonly.safetensors (SD 1.5, 4.3 GB; the runwayml / stable-diffusion-v1-5 page)"
SDXL_FILE = "models/checkpoints/sd_xl_base_1.0.safetensors (SDXL base 1.0, 6.9 GB; stabilityai/stable-diffusion-xl-base-1.0)"
FLUX_FILES = ("models/diffusion_models/flux1-dev.safetensors (black-forest-labs/FLUX.1-dev), models/text_encoders/"
              "clip_l.safetensors + t5xxl_fp16.safetensors (comfyanonymous/flux_text_encoders), models/vae/ae.safetensors")
OPEN_CLIP_FILE = ("models/open_clip/open_clip_vit_l_14.safetensors (OpenAI CLIP ViT-L/14 in open_clip format) and "
                  "models/aesthetic/sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor head)")
DEMON_KNOBS = ("First knobs: k (candidates per step: cost grows with k), beta (steering strength), min_sigma / start / "
               "end (which steps are steered), budget (caps model calls per image). decoder = latent_rgb is far "
               "cheaper than the full VAE when the reward only looks at colour.")
SMC_KNOBS = ("First knobs: particles (cost grows with them), lam (how hard the reward tilts the result), "
             "reward_interval (score every n-th step: cheaper), ess_threshold (when to resample).")


def _cheap_decoder(graph: dict) -> dict:
    """A colour reward reads colours only, so a steering node scoring one on a real model decodes its candidates
    with the latent-RGB preview factors instead of the full VAE (far cheaper). The reference model keeps the VAE:
    its latent format has no RGB factors."""
    if any(node["class_type"] == "RewardSteerReferenceModel" for node in graph.values()):
        return graph
    for node in graph.values():
        reward = node["inputs"].get("reward")
        if "decoder" in node["inputs"] and isinstance(reward, list) \
                and graph[reward[0]]["class_type"] == "RewardSteerColorReward":
            node["inputs"]["decoder"] = "latent_rgb"
    return graph


def api_graph(filename: str) -> dict:
    """The API-format graph saved as workflows/<filename> (before layout, Note and description)."""
    return _cheap_decoder(WORKFLOWS[filename]())


def _note(shows: str, files: str, knobs: str) -> str:
    return f"What it shows: {shows}\n\nFiles: {files}\n\n{knobs}"


# file -> (the Note shown in the graph, the workflow's one-line description)
NOTES = {
    "Start here, Demon and SMC vs plain (no downloads).json": (_note(
        "the same seed sampled plainly, with Demon and with SMC / FK steering on the built-in reference model, whose "
        "steered answer is known exactly. Score Images shows each method's mean reward; Exact Target shows the exact "
        "answer. Steered means should move from the plain mean toward the exact one.",
        "none: the reference model is built in.",
        "Change the reward (colour) or lam on Exact Target and SMC together; " + DEMON_KNOBS),
        "Plain vs Demon vs SMC on the exact reference model, scored and compared with the exact answer"),
    "SD1.5 + Demon, warmer colours.json": (_note("SD 1.5 steered by Demon toward warmer colours.", SD15_FILE, DEMON_KNOBS),
                                "SD 1.5 + Demon toward warmer colours"),
    "SDXL + Demon, warmer colours.json": (_note("SDXL steered by Demon toward warmer colours.", SDXL_FILE, DEMON_KNOBS),
                                "SDXL + Demon toward warmer colours"),
    "Flux + Demon sampler, warmer colours.json": (_note("Flux (a flow model) with the Demon SAMPLER in SamplerCustomAdvanced, steering "
                                      "the first 60 % of the steps.", FLUX_FILES, DEMON_KNOBS),
                                "Flux + Demon sampler in SamplerCustomAdvanced"),
    "SD1.5 + SMC, warmer colours.json": (_note("SD 1.5 with SMC / FK steering toward warmer colours.", SD15_FILE, SMC_KNOBS),
                              "SD 1.5 + SMC / FK steering toward warmer colours"),
    "SDXL + SMC, warmer colours.json": (_note("SDXL with SMC / FK steering toward warmer colours.", SDXL_FILE, SMC_KNOBS),
                              "SDXL + SMC / FK steering toward warmer colours"),
    "Flux + SMC sampler, warmer colours.json": (_note("Flux with the SMC SAMPLER in SamplerCustomAdvanced.", FLUX_FILES, SMC_KNOBS),
                              "Flux + SMC sampler in SamplerCustomAdvanced"),
    "SD1.5 + Demon, LAION aesthetic.json": (_note("SD 1.5 steered by Demon toward the LAION aesthetic score.",
                                                SD15_FILE + "; " + OPEN_CLIP_FILE, DEMON_KNOBS),
                                          "SD 1.5 + Demon toward the LAION aesthetic score (open_clip)"),
    "SD1.5 + Demon, aesthetic from CLIP Vision.json": (_note(
        "the aesthetic reward on ComfyUI's core Load CLIP Vision backbone.",
        SD15_FILE + "; models/clip_vision/clip_vision_vit_l_14.safetensors (OpenAI CLIP ViT-L/14 vision tower) and "
        "models/aesthetic/sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor head)", DEMON_KNOBS),
        "SD 1.5 + Demon toward the LAION aesthetic score (core CLIP vision)"),
    "SDXL + SMC, CLIP score.json": (_note("SDXL with SMC toward the prompt's CLIP score.",
                                              SDXL_FILE + "; models/open_clip/open_clip_vit_l_14.safetensors "
                                              "(OpenAI CLIP ViT-L/14 in open_clip format)", SMC_KNOBS),
                                        "SDXL + SMC toward the prompt's CLIP score"),
    "Reference model + Demon, a VLM judges.json": (_note(
        "Demon on the reference model judged by a vision-language model (pairwise tournament, top half = 1).",
        "none; a running OpenAI-compatible vision server at base_url (vLLM, Ollama, LM Studio; key from the "
        "environment variable named in api_key_env).", "First knobs: base_url, model, rubric; then k and beta."),
        "Reference model + Demon judged by a VLM server"),
    "SDXL + Demon, a VLM judges.json": (_note("SDXL + Demon with a VLM judging candidates against the prompt.",
                                          SDXL_FILE + "; an OpenAI-compatible vision server at base_url.",
                                          "First knobs: base_url, model, rubric; then k and beta."),
                                    "SDXL + Demon judged by a VLM server"),
    "Reference model + Demon, you pick.json": (_note(
        "you are the reward: at each of the first steps a grid of candidates appears in the page; pick the ones "
        "you like. If nobody answers within the timeout, the colour reward decides.", "none.",
        "First knobs: question, ask_every, timeout; k on the sampler is the grid size."),
        "Reference model + Demon steered by your picks in the page"),
    "SDXL + Demon, ImageReward.json": (_note(
        "SDXL + Demon toward ImageReward of the prompt.",
        SDXL_FILE + "; models/image_reward/ImageReward.pt + med_config.json (THUDM/ImageReward) and "
        "models/image_reward/bert-base-uncased/vocab.txt (google-bert/bert-base-uncased)", DEMON_KNOBS),
        "SDXL + Demon toward ImageReward"),
    "Flux + SMC, PickScore.json": (_note(
        "Flux + SMC SAMPLER toward PickScore of the prompt.",
        FLUX_FILES + "; models/pickscore/PickScore_v1/ (the yuvalkirstain/PickScore_v1 folder)", SMC_KNOBS),
        "Flux + SMC toward PickScore"),
    "SD1.5 + best of N, HPSv2.1.json": (_note(
        "SD 1.5 best-of-N (seed search) ranked by HPS v2.1 of the prompt.",
        SD15_FILE + "; models/hps/HPS_v2.1_compressed.pt (xswu/HPSv2)",
        "First knob: n (candidates per image; cost is n plain runs)."),
        "SD 1.5 best-of-N ranked by HPS v2.1"),
}
assert set(NOTES) == set(WORKFLOWS), set(WORKFLOWS) ^ set(NOTES)


# Per node: the bounding box [x, y, w, h] the page draws, title bar included, in graph units.  Classic renderer:
# LiteGraph's own getBounding(); Vue renderer ("Nodes 2.0"): the node's DOM box mapped through the canvas transform.
NODE_BOXES_JS = """async (vue) => { const app = window.comfyAPI.app.app, ds = app.canvas.ds; const out = {};
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  for (const n of app.graph._nodes) out[String(n.id)] = {type: n.type, box: Array.from(n.getBounding())};
  if (vue) for (const n of app.graph._nodes) {   // each node in view at scale 1, so that it is mounted at full detail
    ds.scale = 1; ds.offset = [60 - n.pos[0], 80 - n.pos[1]]; app.canvas.setDirty(true, true); await frames();
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    if (!el) { out[String(n.id)].missing = true; continue; }
    const r = el.getBoundingClientRect(), cr = app.canvas.canvas.getBoundingClientRect();
    out[String(n.id)].box = [(r.left - cr.left) / ds.scale - ds.offset[0], (r.top - cr.top) / ds.scale - ds.offset[1],
                             r.width / ds.scale, r.height / ds.scale]; }
  return out; }"""
VUE_SETTING = "Comfy.VueNodes.Enabled"
# The whole graph (nodes and groups) in view, `margin` px from the canvas edges, at most at scale 1.
FIT_VIEW_JS = """(margin) => { const app = window.comfyAPI.app.app, ds = app.canvas.ds;
  const boxes = app.graph._nodes.map(n => Array.from(n.getBounding()))
      .concat((app.graph._groups || app.graph.groups || []).map(g => Array.from(g._bounding || g.bounding)));
  const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
  const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
  const cr = app.canvas.canvas.getBoundingClientRect();
  ds.scale = Math.min(1, (cr.width - 2 * margin) / (x1 - x0), (cr.height - 2 * margin) / (y1 - y0));
  ds.offset = [margin / ds.scale - x0, margin / ds.scale - y0]; app.canvas.setDirty(true, true); return ds.scale; }"""



def renderers(page) -> list[bool]:
    """[False] (classic), plus True where the frontend has the Vue node renderer."""
    has_vue = page.evaluate(f"() => window.comfyAPI.app.app.extensionManager.setting.get('{VUE_SETTING}') "
                            "!== undefined")
    return [False, True] if has_vue else [False]


def load_in_renderer(page, workflow: dict, vue: bool) -> dict:
    """Load a workflow in the page with the classic (vue=False) or Vue node renderer; the node boxes drawn."""
    page.evaluate(f"async (v) => {{ await window.comfyAPI.app.app.extensionManager.setting.set('{VUE_SETTING}', v); }}",
                  vue)
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(1000)   # the Vue renderer mounts and measures its nodes after the load
    return page.evaluate(NODE_BOXES_JS, vue)


def measure_node_sizes(info: dict) -> dict:
    """The smallest size ([w, h] below the title bar) each node type of the examples gets in the page, both
    renderers, on this host's frontend (REWARD_STEER_FRONTEND_ROOT: another one): every example loaded with
    its nodes saved at 1 x 1 and far apart."""
    from playwright.sync_api import sync_playwright
    import tempfile
    sizes: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as user, ComfyServer(extra_args=["--user-directory", user]) as server, \
            sync_playwright() as p:
        (Path(user) / "default").mkdir()
        (Path(user) / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types"
                               "?.RewardSteerKSamplerDemon", timeout=120_000)
        for vue in renderers(page):
            for graph in WORKFLOWS.values():
                workflow = api_to_ui(graph(), info)
                for i, node in enumerate(workflow["nodes"]):
                    node["pos"], node["size"] = [1000 * i, 0], [1, 1]
                for node in load_in_renderer(page, workflow, vue).values():
                    w, h = node["box"][2], node["box"][3] - TITLE_HEIGHT
                    old = sizes.get(node["type"], [0, 0])
                    sizes[node["type"]] = [max(old[0], math.ceil(w)), max(old[1], math.ceil(h))]
        browser.close()
    return sizes


def main() -> int:
    if "--measure-sizes" in sys.argv:   # merge this frontend's sizes into node_sizes.json (the larger wins)
        with ComfyServer() as server:
            info = server.get("/object_info", timeout=120)
        measured = measure_node_sizes(info)
        known = json.loads(NODE_SIZES.read_text()) if NODE_SIZES.exists() else {}
        for ctype, (w, h) in measured.items():
            old = known.get(ctype, [0, 0])
            known[ctype] = [max(old[0], w, MIN_NODE_WIDTH), max(old[1], h)]
        NODE_SIZES.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
        print(f"wrote {NODE_SIZES}")
        return 0
    with ComfyServer() as server:
        info = server.get("/object_info", timeout=120)
    for filename in WORKFLOWS:
        path = REPO / "workflows" / filename
        note, description = NOTES[filename]
        path.write_text(json.dumps(api_to_ui(api_graph(filename), info, note=note, description=description), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
