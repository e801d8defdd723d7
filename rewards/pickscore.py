"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human choices.

The score is PickScore's own definition: logit_scale.exp() times the cosine between the L2-normalised image and
prompt embeddings (typical values around 20).  The model is the Hugging Face checkpoint folder (PickScore_v1:
config.json, the weights, preprocessor_config.json and the CLIP tokenizer files), read with `transformers` from
local files only.  The activation (GELU for PickScore's ViT-H/14) comes from config.json, as transformers builds
it; the image size and mean/std from preprocessor_config.json when present (else CLIP's, as LAION's processor
that PickScore's own code loads).  A folder without tokenizer files uses ComfyUI's copy of the CLIP BPE tokenizer
(comfy/sd1_tokenizer): OpenAI's and LAION's CLIP share that vocabulary.
"""
from __future__ import annotations

import json
import os

import torch

from .base import Reward
from .clip_common import (CLIP_MEAN, CLIP_STD, _load_state_dict, clip_preprocess, remembered_text_embeddings,
                          reward_model_dtype)
from .model_files import REWARD_FOLDERS, missing_companions_message

CONFIG_FILE = "config.json"


def check_pickscore_files(weights_path: str) -> None:
    """config.json must sit beside the weights (the PickScore_v1 folder); the error names it and its source."""
    folder = os.path.dirname(weights_path)
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise FileNotFoundError(missing_companions_message(
            "PickScore", os.path.basename(weights_path), folder, [REWARD_FOLDERS["pickscore"].file(CONFIG_FILE)])
            + " Copy the whole PickScore_v1 folder into models/pickscore/ and pick its weights file.")


def tokenizer_folder(folder: str) -> str:
    """The folder's own tokenizer (tokenizer.json, or vocab.json + merges.txt), else ComfyUI's CLIP tokenizer."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if has("tokenizer.json") or (has("vocab.json") and has("merges.txt")):
        return folder
    import comfy.sd1_clip
    return os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")


class _Towers(torch.nn.Module):
    """Holds the transformers CLIPModel for ComfyUI's ModelPatcher, which sets `.device` on the module it manages
    (a read-only property on transformers models)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip


def _build_clip(config, state: dict, source: str):
    """transformers' CLIPModel with the file's weights, built on the meta device (no random initialisation of a
    billion parameters that are overwritten at once)."""
    from transformers import CLIPModel
    with torch.device("meta"):
        model = CLIPModel(config)
    model.to_empty(device="cpu")
    for name, buffer in list(model.named_buffers()):
        if name.endswith("position_ids"):   # not saved in the file: rebuild it
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(1, -1), persistent=False)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        problems = (["missing " + ", ".join(result.missing_keys[:4])] if result.missing_keys else []) + \
                   (["unexpected " + ", ".join(result.unexpected_keys[:4])] if result.unexpected_keys else [])
        raise ValueError(f"{source} does not fit the CLIP described by its config.json ({'; '.join(problems)}): "
                         "the weights and config.json must come from the same PickScore checkpoint")
    return model


class PickScoreModel:
    """The PickScore CLIP towers, placed on the GPU through ComfyUI's model management and kept across prompts."""

    differentiable = True

    def __init__(self, weights_path: str, precision: str = "auto"):
        import comfy.model_management
        import comfy.model_patcher
        from transformers import AutoTokenizer, CLIPConfig
        folder = os.path.dirname(weights_path)
        check_pickscore_files(weights_path)
        self.source = os.path.basename(weights_path)
        config = CLIPConfig.from_pretrained(folder, local_files_only=True)
        with torch.inference_mode(False):
            try:
                model = _build_clip(config, _load_state_dict(weights_path), f"{self.source} ({weights_path})")
            except RuntimeError as e:     # a tensor of another shape: another width than config.json says
                raise ValueError(f"{self.source} ({weights_path}) does not fit the CLIP described by its "
                                 f"config.json: {str(e).splitlines()[-1].strip()}") from None
            self.dtype = reward_model_dtype(precision, comfy.model_management.get_torch_device())
            self.towers = _Towers(model.eval().to(self.dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder), local_files_only=True)
        self.image_size, self.mean, self.std = _image_settings(folder, config.vision_config.image_size)
        self.activation = config.vision_config.hidden_act
        self._text_cache: dict[str, torch.Tensor] = {}
        self.patcher = comfy.model_patcher.ModelPatcher(self.towers,
                                                        load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())

    @property
    def clip(self):
        return self.towers.clip

    def device(self) -> torch.device:
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.load_device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings [B, D] (differentiable w.r.t. the images)."""
        device = self.device()
        x = clip_preprocess(images.to(device, torch.float32), self.image_size, self.mean, self.std).to(self.dtype)
        pooled = self.clip.vision_model(pixel_values=x).pooler_output
        return torch.nn.functional.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        device = self.device()

        def encode(new):
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=77, return_tensors="pt")
            pooled = self.clip.text_model(input_ids=tokens["input_ids"].to(device),
                                          attention_mask=tokens["attention_mask"].to(device)).pooler_output
            return self.clip.text_projection(pooled)
        return remembered_text_embeddings(self._text_cache, texts, device, encode)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().float().exp())

    def describe(self) -> str:
        return f"PickScore {self.activation} ({self.source})"


def _image_settings(folder: str, default_size: int):
    """(crop size, mean, std) from preprocessor_config.json, or CLIP's defaults at the model's image size."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return int(default_size), CLIP_MEAN, CLIP_STD
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    size = config.get("crop_size", default_size)
    if isinstance(size, dict):
        size = size.get("height", default_size)
    return int(size), tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


class PickScoreReward(Reward):
    differentiable = True

    def __init__(self, model: PickScoreModel, text: str = ""):
        self.model, self.text = model, text.strip()
        self.needs_prompt = not self.text
        what = f"'{self.text}'" if self.text else "the prompt"
        self.name = f"PickScore vs {what} ({model.describe()})"

    def score(self, images, prompts=None, context=None):  # scores each image alone
        img = self.model.image_embeddings(images)
        texts = [self.text] * images.shape[0] if self.text else list(prompts)
        txt = self.model.text_embeddings(texts).to(img.device)
        return self.model.logit_scale * (img * txt).sum(-1)
