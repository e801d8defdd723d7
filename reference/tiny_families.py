"""Tiny models of every model family on ComfyUI's own model code, with deterministic random weights (tests only).

`build_family(family, seed)` returns (MODEL, CLIP, VAE) as a checkpoint loader would:

- **Diffusion model: real.**  The family's `comfy.supported_models` class (SD15, SD20 with v-prediction, SDXL, SD3,
  Flux, Flux2, WAN21_T2V, ZImage, QwenImage) builds ComfyUI's `model_base` model and its real network (UNet, MMDiT,
  Flux DiT, Wan DiT, Lumina 2 NextDiT, Qwen-Image DiT) from a tiny `unet_config`: one or two blocks, inner widths
  of 32-256 (attention heads of the real 128 in the DiTs), but the real input widths (latent channels, text-context width, pooled-vector width), so the real
  conditioning layout reaches it.  Model sampling (eps / v / flow and its shift) is the class's own.
- **Text encoder: a stand-in** inside a real `comfy.sd.CLIP`.  ComfyUI's CLIP-L tokenizer turns the prompt into
  tokens; a small seeded module (a 32-wide token and position embedding, projected) maps them to the family's real
  context shape and pooled width (e.g. Flux: T5-like [1, 256, 4096] + CLIP-L pooled [1, 768]; SDXL: [1, 77, 2048]
  + [1, 1280]).  Core CLIPTextEncode works on it; the same text always gives the same embedding.  The tokens come
  under the real tokenizer's keys (Flux: `l`, `t5xxl`): the context is made from the last key's tokens, the pooled
  vector from `g`'s or else the first key's.  Prompt weights are ignored.  The real encoders (T5-XXL's vocabulary
  alone is 131M parameters) are too big for a test.
- **VAE: real ComfyUI VAE code at a tiny width**, loaded through `comfy.sd.VAE`, in the family's latent layout:
  TAESD (4 or 16 channels, /8) for the SD and SD3/Flux/Z-Image families, the Flux 2 KL autoencoder with its
  batch-norm latent (128 channels, /16) and the Wan 2.1 causal 3-D VAE (16 channels, /8, /4 in time; also
  Qwen-Image's, on single frames).

ComfyUI's ops leave weights uninitialised, so every tensor is filled from a seeded generator (fan-in scaled, norms
at identity, and random, not zero, where a family zero-initialises its output or modulation layers), in fp32 on the
CPU.  Images are noise patterns, not pictures.

`write_tiny_model_file(family, folder)` writes the diffusion model as a `.safetensors` with the original
checkpoint's key names when the host's `comfy.model_detection` recognises the tiny file as the family (core
UNETLoader then loads it); it returns None where detection needs full-size shapes: the UNet families always, Flux
and Flux 2 where the host fixes the head count (v0.3.75), Z-Image (detected at dim 3840 only) and Qwen-Image (its
widths are not read from the file).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import os

import torch

import comfy.latent_formats
import comfy.ldm.models.autoencoder
import comfy.ldm.wan.vae
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """The conditioning a family's real text encoder gives CLIPTextEncode for a short prompt."""
    width: int                    # context width at the model interface
    tokens: int | None            # fixed sequence length; None: 77 per CLIP chunk (the SD layout)
    pooled: int | None            # pooled_output width; None: the family has none
    token_keys: tuple[str, ...]   # the real tokenizer's keys (so CLIPTextEncodeSDXL / ...Flux find theirs)


@dataclasses.dataclass(frozen=True)
class FamilyInfo:
    family: str
    model_class: str              # comfy.supported_models class name (type(model.model.model_config).__name__)
    model_type: str               # comfy.model_base.ModelType name (model.model.model_type.name)
    latent_channels: int
    downscale: int                # pixels per latent pixel, spatial
    temporal_downscale: int | None  # video: frames per latent frame (1 + 4k frames -> 1 + k); None: images
    empty_latent_node: str        # the core node that makes its empty latent
    guider: str                   # "cfg": KSampler with a negative; "flux_guidance": FluxGuidance + BasicGuider
    cfg: float                    # cfg the family's examples use (1.0 where guidance is distilled)
    guidance: float | None        # FluxGuidance value for "flux_guidance"
    text: TextLayout
    unet_config: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def video(self) -> bool:
        return self.temporal_downscale is not None

    @property
    def file_route(self) -> bool:
        """Whether the host's model detection takes the tiny diffusion-model file for this family's class with
        this tiny config (v0.3.75 detects Flux but fixes its head count at the full-size 24)."""
        return _file_detected(self.family)


def _flux_params(**config) -> dict:
    """Flux-family config, plus the fields this host's FluxParams requires (txt_ids_dims since ~v0.5)."""
    import comfy.ldm.flux.model as flux_model
    fields = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    if "txt_ids_dims" in fields:
        config["txt_ids_dims"] = [3] if config["image_model"] == "flux2" else []
    return config


_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _family_table() -> dict[str, FamilyInfo]:
    sd_text = dict(tokens=None)
    rows = [
        FamilyInfo("sd15", "SD15", "EPS", 4, 8, None, "EmptyLatentImage", "cfg", 7.0, None,
                   TextLayout(768, pooled=768, token_keys=("l",), **sd_text),
                   {**_UNET_COMMON, "model_channels": 32, "adm_in_channels": None, "context_dim": 768,
                    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                    "use_linear_in_transformer": False}),
        FamilyInfo("sd2_v", "SD20", "V_PREDICTION", 4, 8, None, "EmptyLatentImage", "cfg", 7.0, None,
                   TextLayout(1024, pooled=1024, token_keys=("h",), **sd_text),
                   {**_UNET_COMMON, "model_channels": 64, "adm_in_channels": None, "context_dim": 1024,
                    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                    "use_linear_in_transformer": True}),
        FamilyInfo("sdxl", "SDXL", "EPS", 4, 8, None, "EmptyLatentImage", "cfg", 7.0, None,
                   TextLayout(2048, pooled=1280, token_keys=("g", "l"), **sd_text),
                   {**_UNET_COMMON, "model_channels": 64, "adm_in_channels": 2816, "num_classes": "sequential",
                    "context_dim": 2048, "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
                    "use_linear_in_transformer": True}),
        FamilyInfo("sd3", "SD3", "FLOW", 16, 8, None, "EmptySD3LatentImage", "cfg", 4.5, None,
                   TextLayout(4096, tokens=154, pooled=2048, token_keys=("l", "g", "t5xxl")),
                   # MMDiT: hidden = 64 * depth, heads = depth
                   {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": 2048, "num_patches": 1024, "pos_embed_max_size": 32,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": 128}},
                    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}),
        FamilyInfo("flux", "Flux", "FLUX", 16, 8, None, "EmptySD3LatentImage", "flux_guidance", 1.0, 3.5,
                   TextLayout(4096, tokens=256, pooled=768, token_keys=("l", "t5xxl")),
                   # one head of 128 = sum(axes_dim), as the real model's head size
                   _flux_params(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16,
                                vec_in_dim=768, context_in_dim=4096, hidden_size=128, mlp_ratio=4.0, num_heads=1,
                                depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                                qkv_bias=True)),
        FamilyInfo("flux2", "Flux2", "FLUX", 128, 16, None, "EmptyFlux2LatentImage", "flux_guidance", 1.0, 4.0,
                   # Mistral Small 3 hidden states of three layers stacked: 3 x 5120; 512 tokens as Flux 2 pads
                   TextLayout(15360, tokens=512, pooled=None, token_keys=("mistral3_24b",)),
                   _flux_params(image_model="flux2", guidance_embed=True, in_channels=128, out_channels=128,
                                vec_in_dim=None, context_in_dim=15360, hidden_size=128, mlp_ratio=3.0, num_heads=1,
                                depth=1, depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000,
                                patch_size=1, qkv_bias=False, global_modulation=True, mlp_silu_act=True,
                                ops_bias=False, default_ref_method="index", ref_index_scale=10.0)),
        FamilyInfo("wan21", "WAN21_T2V", "FLOW", 16, 8, 4, "EmptyHunyuanLatentVideo", "cfg", 6.0, None,
                   TextLayout(4096, tokens=512, pooled=None, token_keys=("umt5xxl",)),
                   # one head of 128 (detection derives heads = dim // 128)
                   {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1,
                    "ffn_dim": 256, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
                    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": 4096}),
        FamilyInfo("zimage", "ZImage", "FLOW", 16, 8, None, "EmptySD3LatentImage", "cfg", 1.0, None,
                   # Qwen3-4B hidden states (2560 wide); the real length is the templated prompt's, here 77
                   TextLayout(2560, tokens=None, pooled=None, token_keys=("qwen3_4b",)),
                   # Lumina 2 NextDiT with Z-Image's modulation (256 wide, so dim >= 256) and rope; heads of 128 =
                   # sum(axes_dims), as the real model's
                   {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 2560,
                    "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                    "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                    "pad_tokens_multiple": 32}),
        FamilyInfo("qwen_image", "QwenImage", "FLUX", 16, 8, None, "EmptySD3LatentImage", "cfg", 2.5, None,
                   # Qwen2.5-VL-7B hidden states (3584 wide); the real length is the templated prompt's, here 77
                   TextLayout(3584, tokens=None, pooled=None, token_keys=("qwen25_7b",)),
                   {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                    "num_layers": 1, "attention_head_dim": 128, "num_attention_heads": 1, "joint_attention_dim": 3584,
                    "axes_dims_rope": (16, 56, 56)}),
    ]
    return {row.family: row for row in rows if hasattr(comfy.supported_models, row.model_class)}


FAMILY_INFO: dict[str, FamilyInfo] = _family_table()
FAMILIES: tuple[str, ...] = tuple(FAMILY_INFO)


def family_info(family: str) -> FamilyInfo:
    if family not in FAMILY_INFO:
        raise ValueError(f"unknown model family {family!r}: this ComfyUI has {', '.join(FAMILIES)}")
    return FAMILY_INFO[family]


# ---------------------------------------------------------------------------------------------- weights

def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") % 2 ** 63


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Fill every floating tensor from one seeded generator, in sorted-name order: norms at identity, biases zero,
    weights normal with std 1/sqrt(fan_in) (so activations stay O(1) at any width), other tensors (positional
    tables, modulation offsets) normal with std 0.05.  Nothing is left at zero that the network multiplies by."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if (leaf == "weight" and t.ndim == 1) or leaf in ("scale", "gamma", "running_var"):
                t.copy_(torch.ones_like(t))
            elif leaf in ("bias", "beta", "running_mean"):
                t.copy_(torch.zeros_like(t))
            else:
                std = 1.0 / math.sqrt(max(1, t[0].numel())) if leaf == "weight" and t.ndim >= 2 else 0.05
                t.copy_(std * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


# ---------------------------------------------------------------------------------------------- model

def _model_config(info: FamilyInfo):
    config = getattr(comfy.supported_models, info.model_class)(dict(info.unet_config))
    config.set_inference_dtype(torch.float32, None)
    if info.model_type == "V_PREDICTION":  # SD20 reads v-prediction from a checkpoint's weights; here it is given
        config.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
    return config


def build_family_model(family: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    info = family_info(family)
    base = _model_config(info).get_model({})
    init_random_(base.diffusion_model, _seed_for("model", family, seed))
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny diffusion model's weights with the original checkpoint's key names (ComfyUI's module names)."""
    model = build_family_model(family, seed).model.diffusion_model
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _file_detected(family: str) -> bool:
    info = family_info(family)
    detected = comfy.model_detection.model_config_from_unet(tiny_state_dict(family), "")
    if detected is None or type(detected).__name__ != info.model_class:
        return False
    ours, theirs = _model_config(info).unet_config, detected.unet_config
    shared = (set(ours) & set(theirs)) - {"dtype"}
    if any(ours[key] != theirs[key] for key in shared):
        return False
    # what detection leaves out, the network's constructor defaults: ours must be those too (Qwen-Image's widths)
    network = type(build_family_model(family).model.diffusion_model)
    defaults = {name: p.default for name, p in inspect.signature(network.__init__).parameters.items()}
    return all(key in defaults and defaults[key] == ours[key] for key in set(ours) - set(theirs) - {"dtype"})


def write_tiny_model_file(family: str, folder: str, seed: int = 0) -> str | None:
    """Write `tiny_<family>.safetensors` (seed in the name when not 0) for core UNETLoader, or return None when
    this host's model detection does not take the tiny file for the family's class."""
    if not family_info(family).file_route:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"tiny_{family}{'' if seed == 0 else f'_s{seed}'}.safetensors")
    comfy.utils.save_torch_file(tiny_state_dict(family, seed), path)
    return path


# ---------------------------------------------------------------------------------------------- text

class _StandInTokenizer:
    """ComfyUI's CLIP-L tokenizer; every key the family's real tokenizer has gets the same tokens."""
    token_keys: tuple[str, ...] = ("l",)

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip = comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        tokens = self.clip.tokenize_with_weights(text, return_word_ids, **kwargs)["l"]
        return {key: tokens for key in self.token_keys}

    def untokenize(self, token_weight_pair):
        return self.clip.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


CLIP_VOCAB = 49408
CLIP_PAD = 49407  # end-of-text, which the CLIP tokenizer pads with


class StandInTextEncoder(torch.nn.Module):
    """Tokens -> the family's real conditioning shapes: a 32-wide seeded embedding of (token, position), a fixed
    nonlinearity and projections to the context width and the pooled width."""

    def __init__(self, layout: TextLayout, seed: int, device=None, dtype=None, model_options={}):
        super().__init__()
        self.layout = layout
        positions = max(77, layout.tokens or 77)
        self.token_embedding = torch.nn.Embedding(CLIP_VOCAB, 32)
        self.position_embedding = torch.nn.Embedding(positions, 32)
        self.context_proj = torch.nn.Linear(32, layout.width)
        self.pooled_proj = torch.nn.Linear(32, layout.pooled) if layout.pooled else None
        init_random_(self, seed)
        with torch.no_grad():  # embeddings of std 1 (fan-in scaling would make them 1/sqrt(32))
            self.token_embedding.weight.mul_(math.sqrt(32))
            self.position_embedding.weight.mul_(math.sqrt(32))
        self.dtypes = {torch.float32}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def _ids(self, chunks) -> torch.Tensor:
        ids = [int(t[0]) for chunk in chunks for t in chunk]
        if self.layout.tokens is None:   # SD layout: 77 per chunk, as the tokenizer made them
            return torch.tensor(ids).view(-1, 77)
        ids = (ids + [CLIP_PAD] * self.layout.tokens)[:self.layout.tokens]
        return torch.tensor(ids).view(1, -1)

    def _features(self, chunks) -> torch.Tensor:
        ids = self._ids(chunks).to(self.token_embedding.weight.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return torch.tanh(self.token_embedding(ids) + self.position_embedding(positions))

    def encode_token_weights(self, token_weight_pairs):
        keys = self.layout.token_keys
        cond = self.context_proj(self._features(token_weight_pairs[keys[-1]])).reshape(1, -1, self.layout.width)
        pooled = None
        if self.pooled_proj is not None:
            pooled_key = "g" if "g" in keys else keys[0]
            pooled = self.pooled_proj(self._features(token_weight_pairs[pooled_key])[:1].mean(dim=1)).float()
        return cond.float(), pooled, {}


def build_family_clip(family: str, seed: int = 0) -> comfy.sd.CLIP:
    info = family_info(family)
    tokenizer = type(f"StandInTokenizer_{family}", (_StandInTokenizer,), {"token_keys": info.text.token_keys})
    target = comfy.supported_models_base.ClipTarget(tokenizer, StandInTextEncoder)
    target.params = {"layout": info.text, "seed": _seed_for("text", family, seed)}
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


# ---------------------------------------------------------------------------------------------- VAE

def _taesd_vae(latent_channels: int, seed: int) -> comfy.sd.VAE:
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_random_(taesd, seed)
    taesd.vae_scale.data.fill_(1.0)
    taesd.vae_shift.data.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def _flux2_vae(seed: int) -> comfy.sd.VAE:
    """ComfyUI's Flux 2 autoencoder (KL, 32 channels at /8, batch-norm latent packed 2x2 into 128 at /16) at
    width 32 (real: 128).  comfy.sd.VAE detects this layout only at full width on some hosts, so the tiny one is
    built from its config and given the layout detection sets for the real file."""
    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    init_random_(autoencoder, seed)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 32}})
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 128, 16, 16
    return vae


def _wan21_vae(seed: int) -> comfy.sd.VAE:
    """ComfyUI's Wan 2.1 causal video VAE at base width 8 (real: 96); comfy.sd.VAE reads the width from the keys."""
    wan = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    init_random_(wan, seed)
    return comfy.sd.VAE(sd=wan.state_dict())


def build_family_vae(family: str, seed: int = 0) -> comfy.sd.VAE:
    info = family_info(family)
    vae_seed = _seed_for("vae", family, seed)
    if family == "flux2":
        return _flux2_vae(vae_seed)
    if family in ("wan21", "qwen_image"):   # Qwen-Image's VAE is the Wan 2.1 one, on single frames
        return _wan21_vae(vae_seed)
    return _taesd_vae(info.latent_channels, vae_seed)


def build_family(family: str, seed: int = 0):
    """(MODEL, CLIP, VAE) of the family's tiny model, deterministic in (family, seed)."""
    return build_family_model(family, seed), build_family_clip(family, seed), build_family_vae(family, seed)


# ---------------------------------------------------------------------------------------------- core graph

def plain_sampling_prompt(family: str, model_node: dict | None = None, prompt: str = "a red apple", seed: int = 1,
                          width: int = 64, height: int = 64, frames: int = 5, steps: int = 2,
                          sampler: str = "euler", scheduler: str = "simple") -> dict:
    """An API-format prompt of the family's plain core workflow: model "1" (this pack's tiny model node unless
    `model_node` is given; it must output MODEL, CLIP, VAE in slots 0-2), CLIPTextEncode "2" (and "3", the
    negative), the family's empty latent "4", sampling to node "8" (core KSampler with the family's cfg, or
    FluxGuidance + BasicGuider + SamplerCustomAdvanced) and VAEDecode "9"."""
    info = family_info(family)
    nodes = {
        "1": model_node or {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": info.empty_latent_node,
              "inputs": {"width": width, "height": height, "batch_size": 1,
                         **({"length": frames} if info.video else {})}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
    }
    if info.guider == "flux_guidance":
        nodes.update({
            "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": info.guidance}},
            "6": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["5", 0]}},
            "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": scheduler,
                                                             "steps": steps, "denoise": 1.0}},
            "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
            "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["6", 0],
                                                                    "sampler": ["11", 0], "sigmas": ["7", 0],
                                                                    "latent_image": ["4", 0]}},
        })
    else:
        nodes.update({
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": seed, "steps": steps,
                                                       "cfg": info.cfg, "sampler_name": sampler,
                                                       "scheduler": scheduler, "denoise": 1.0}},
        })
    return nodes
