"""Shared by the CLIP-based rewards: on-device CLIP preprocessing and an open_clip model managed by ComfyUI.

Not a reward itself: aesthetic.py and clip_score.py build on it.
"""
from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> normalised [B, 3, size, size]: shorter side resized to `size` (bicubic), centre
    crop, CLIP mean/std.  On the images' device, batched, differentiable (no PIL round trip)."""
    x = images.movedim(-1, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                            antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pad_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> normalised [B, 3, size, size] the way HPSv2 preprocesses: the longer side resized
    to `size` (bicubic), the shorter padded with black on both sides (left / top get the smaller half), then CLIP
    mean/std.  Nothing is cropped.  On the images' device, batched, differentiable."""
    x = images.movedim(-1, 1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                            antialias=scale < 1)
    pad_h, pad_w = size - nh, size - nw
    x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


TEXT_CACHE_SIZE = 256   # distinct texts remembered per model
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reward_model_dtype(precision: str, device) -> torch.dtype:
    """auto: half precision where ComfyUI says it is safe and fast on the device (a GPU that supports fp16),
    float32 otherwise (every CPU).  The head and the scores always stay in float32."""
    import comfy.model_management
    if precision == "auto":
        return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return DTYPES[precision]


def remembered_text_embeddings(cache: dict, texts: list[str], device, encode) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] on `device`; `encode(list of new texts)` runs only for the texts
    `cache` does not hold yet (at most TEXT_CACHE_SIZE are kept)."""
    new = [t for t in dict.fromkeys(texts) if t not in cache]
    if new:
        emb = encode(new).float()
        if len(cache) + len(new) > TEXT_CACHE_SIZE:
            cache.clear()
        cache.update(zip(new, torch.nn.functional.normalize(emb, dim=-1).cpu()))
    return torch.stack([cache[t] for t in texts]).to(device)


class OpenClipModel:
    """An open_clip model (image + text towers) placed on the GPU through ComfyUI's model management, so ComfyUI
    accounts for it and can offload it when the diffusion model needs room."""

    differentiable = True

    def __init__(self, model, tokenizer, arch: str, source: str, precision: str = "auto"):
        import comfy.model_management
        import comfy.model_patcher
        self.dtype = reward_model_dtype(precision, comfy.model_management.get_torch_device())
        with torch.inference_mode(False):
            self.model = model.eval().to(self.dtype)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}
        self.arch = arch
        self.source = source
        self.image_size = int(getattr(model.visual, "image_size", (224, 224))[0]
                              if isinstance(getattr(model.visual, "image_size", 224), (tuple, list))
                              else getattr(model.visual, "image_size", 224))
        self.patcher = comfy.model_patcher.ModelPatcher(self.model,
                                                        load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model.visual, "proj", None)
        if proj is not None:
            return proj.shape[1]
        return self.model.visual.output_dim

    def device(self) -> torch.device:
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.load_device

    def image_embeddings(self, images: torch.Tensor, preprocess=clip_preprocess) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (differentiable w.r.t. the images)."""
        device = self.device()
        x = preprocess(images.to(device, torch.float32), self.image_size).to(self.dtype)
        emb = self.model.encode_image(x)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [len(texts), D].  Each distinct text is encoded once and remembered: a
        sampler scores every step against the same prompt, usually one prompt for the whole batch."""
        device = self.device()
        return remembered_text_embeddings(self._text_cache, texts, device,
                                          lambda new: self.model.encode_text(self.tokenizer(new).to(device)))

    @property
    def activation(self) -> str:
        """The MLP activation the towers run with: QuickGELU (OpenAI's CLIP) or GELU (open_clip's default)."""
        return "QuickGELU" if any(type(m).__name__ == "QuickGELU" for m in self.model.modules()) else "GELU"

    def describe(self) -> str:
        return f"{self.arch}, {self.activation} ({self.source})"


ENCODER_NAMES = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP", "siglip2_vision_model": "SigLIP 2",
                 "dinov2": "DINOv2", "dinov3": "DINOv3"}


def clip_vision_kind(clip_vision) -> str:
    """The model_type of a core CLIP_VISION ('clip_vision_model', 'siglip_vision_model', 'siglip2_vision_model',
    'dinov2', ...).  Newer ComfyUI keeps it on the object; older ComfyUI only in what it built: a SigLIP returns
    all hidden states, and any other encoder than CLIP / SigLIP has its own class (named instead)."""
    import comfy.clip_model
    kind = getattr(clip_vision, "model_type", None) or (getattr(clip_vision, "config", None) or {}).get("model_type")
    if kind:
        return kind
    if getattr(clip_vision, "return_all_hidden_states", False):
        return "siglip_vision_model"
    model = getattr(clip_vision, "model", None)
    is_clip = isinstance(model, comfy.clip_model.CLIPVisionModelProjection)
    return "clip_vision_model" if is_clip else type(model).__name__


class ComfyClipVision:
    """ComfyUI's own CLIP vision model (core CLIPVisionLoader, models/clip_vision) behind the same image-embedding
    interface as OpenClipModel.  Uses the model's projected image embedding (`encode_image(...).image_embeds`),
    preprocessed on the device, batched.  Not differentiable: ComfyUI's CLIP code adds residuals in place, which
    autograd cannot go back through -- gradient-guided SMC needs the open_clip backbone (Load OpenCLIP).
    Only CLIP models: core's loader also returns SigLIP, SigLIP 2 and DINO encoders, which this preprocessing and
    the CLIP-trained heads do not fit."""

    differentiable = False

    def __init__(self, clip_vision, source: str = "the CLIP vision model"):
        self.clip_vision = clip_vision
        self.model = clip_vision.model
        kind = clip_vision_kind(clip_vision)
        if kind != "clip_vision_model":
            why = (" (SigLIP models need their own preprocessing -- mean/std 0.5" +
                   (", patch-count resizing" if kind == "siglip2_vision_model" else "") +
                   " -- and their embeddings are not CLIP's)" if kind.startswith("siglip") else "")
            raise ValueError(f"{source} is a {ENCODER_NAMES.get(kind, kind)} image encoder, not a CLIP one{why}; "
                             "the CLIP rewards need a CLIP vision model (ViT-L/14 for the LAION aesthetic head) "
                             "from models/clip_vision")
        if not hasattr(self.model.visual_projection, "weight"):
            raise ValueError(f"{source} is a CLIP image encoder without a CLIP image projection; the CLIP rewards "
                             "need a CLIP vision model with one (ViT-L/14 for the LAION aesthetic head) from "
                             "models/clip_vision")
        self.image_size = int(clip_vision.image_size)
        self.source = source

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual_projection.weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.model.visual_projection.weight.shape[1])

    def device(self) -> torch.device:
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.clip_vision.patcher])
        return self.clip_vision.load_device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        device = self.device()
        x = clip_preprocess(images.to(device, torch.float32), self.image_size,
                            self.clip_vision.image_mean, self.clip_vision.image_std)
        with torch.no_grad():
            out = self.model(pixel_values=x, intermediate_output=-2)
        return torch.nn.functional.normalize(out[2].float(), dim=-1)

    def describe(self) -> str:
        return f"CLIP vision {self.width}-wide ({self.source}; no gradients: use Load OpenCLIP for those)"


OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def load_open_clip(arch: str, weights_path: str, precision: str = "auto") -> OpenClipModel:
    """An open_clip architecture with weights from a local file (no downloads).  A JSON config beside the file
    (same name, .json) registers a custom architecture first."""
    import json
    import os

    import open_clip
    config = os.path.splitext(weights_path)[0] + ".json"
    if os.path.exists(config):
        try:  # read before open_clip registers it: it re-reads every registered file at each registration
            with open(config, encoding="utf-8") as f:
                json.load(f)
        except ValueError as e:   # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{os.path.basename(config)} ({config}) is not a valid open_clip architecture JSON "
                             f"file -- corrupt or truncated ({e})") from e
        open_clip.add_model_config(config)
        arch = os.path.splitext(os.path.basename(config))[0]
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models()[:8])}...")
    with torch.inference_mode(False):
        state = _load_state_dict(weights_path)
        # OpenAI's CLIP runs QuickGELU; its own state dicts carry these three entries.  open_clip switches QuickGELU
        # on only for pretrained='openai', so a file of OpenAI weights under a plain name (ViT-L-14) would silently
        # run GELU.  Files converted without them need the architecture's -quickgelu name.
        openai_layout = any(key in state for key in OPENAI_ONLY_KEYS)
        state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, force_quick_gelu=openai_layout)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{os.path.basename(weights_path)} does not fit the {arch} architecture: "
                             f"{str(e).splitlines()[0]} (pick the architecture the file was trained with)") from None
    return OpenClipModel(model, open_clip.get_tokenizer(arch), arch, os.path.basename(weights_path), precision)


def _load_state_dict(path: str) -> dict:
    """A weights file's state dict; a file that cannot be read as one is named in the error."""
    import os
    import re

    import comfy.utils
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' and torch's own errors ("header too large", unpickling, zip) name no file
        kind = "safetensors" if path.lower().endswith((".safetensors", ".sft")) else "PyTorch (torch.save)"
        first_sentence = re.split(r"(?<=\.)\s", (str(e).strip().splitlines() or [""])[0])[0]
        raise ValueError(f"{os.path.basename(path)} ({path}) is not a valid {kind} file -- corrupt, truncated or "
                         f"of another format ({type(e).__name__}: {first_sentence}); download or copy it again") from e
    if not isinstance(state, dict):
        raise ValueError(f"{os.path.basename(path)} ({path}) holds a {type(state).__name__}, not a state dict of "
                         "weights")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
