"""ImageReward (Xu et al. 2023): BLIP's ViT-L image encoder, BLIP's BERT-base "med" text encoder that
cross-attends to the image in every layer, and an MLP head on the text encoder's [CLS] output.

score = (MLP(BERT_med(tokens(prompt), cross-attending ViT(image))[CLS]) - 0.16717362830052426) / 1.0333394966054072
with the image resized (shorter side, bicubic) and centre-cropped to 224, CLIP mean/std, and the prompt in
BLIP's BERT tokenizer (bert-base-uncased + [DEC] and [ENC]) padded / cut to 35 tokens -- as the official
`ImageReward.score` computes it.  Typical values -2 .. 2.

Files (models/image_reward): `ImageReward.pt` (a state dict: blip.visual_encoder.*, blip.text_encoder.*, mlp.*),
`med_config.json` (the BERT configuration) beside it, and the BERT tokenizer files (`vocab.txt`) in a folder
`bert-base-uncased/` beside it.  The architecture is written here on torch modules (transformers' activations);
the `image-reward` package is not needed.  The ViT's depth, width, patch and image size are read from the
weights; its head count is ViT-L's 16, which the file does not record.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from .aesthetic import AestheticHead
from .base import Reward
from .clip_common import _load_state_dict, clip_preprocess, reward_model_dtype
from .model_files import REWARD_FOLDERS, missing_companions_message

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TOKENS = 35
VIT_HEADS = 16            # BLIP's ViT-L (create_vit('large')): 16 heads of 64
VIT_EPS = 1e-6
TOKENIZER_FOLDER = "bert-base-uncased"
MED_CONFIG = "med_config.json"
MASKED = -10000.0         # BERT's additive mask for padding tokens


def attention(q, k, v, heads: int, mask=None):
    """Multi-head scaled dot-product attention on [B, N, heads * d] projections."""
    b, n, width = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, width)


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attention(q, k, v, self.heads))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=VIT_EPS), ViTAttention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=VIT_EPS), ViTMlp(width, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BlipViT(nn.Module):
    """BLIP's vision transformer (pre-norm, class token, learned positions); returns every token [B, 1 + N, D]."""

    def __init__(self, width: int, depth: int, patch: int, tokens: int, hidden: int, heads: int = VIT_HEADS):
        super().__init__()
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=VIT_EPS)
        self.width, self.image_size = width, patch * math.isqrt(tokens - 1)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, :x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertAttentionOutput(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(width, width), nn.LayerNorm(width, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, source_width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key, self.value = nn.Linear(source_width, width), nn.Linear(source_width, width)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float, source_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.self = BertSelfAttention(width, source_width or width)
        self.output = BertAttentionOutput(width, eps)

    def forward(self, x, source, mask):
        a = self.self
        return self.output(attention(a.query(x), a.key(source), a.value(source), self.heads, mask), x)


class BertDense(nn.Module):
    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)


class BertLayer(nn.Module):
    """Self-attention over the text, cross-attention to the image tokens, feed-forward (BLIP's multimodal mode)."""

    def __init__(self, config: dict, vision_width: int, act):
        super().__init__()
        width, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
        self.attention = BertAttention(width, heads, eps)
        self.crossattention = BertAttention(width, heads, eps, vision_width)
        self.intermediate = BertDense(width, config["intermediate_size"])
        self.output = BertDense(config["intermediate_size"], width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.act = act

    def forward(self, x, text_mask, image):
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image, None)   # every image token is attended (BLIP's all-ones image mask)
        return self.output.LayerNorm(self.output.dense(self.act(self.intermediate.dense(x))) + x)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (BLIP's med BERT has no token-type embeddings)."""

    def __init__(self, config: dict):
        super().__init__()
        width = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], width)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], width)
        self.LayerNorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class BertEncoder(nn.Module):
    def __init__(self, config: dict, vision_width: int, act):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, vision_width, act) for _ in range(config["num_hidden_layers"]))


class MedBert(nn.Module):
    def __init__(self, config: dict, vision_width: int):
        super().__init__()
        from transformers.activations import ACT2FN
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, vision_width, ACT2FN[config.get("hidden_act", "gelu")])

    def forward(self, ids, attention_mask, image):
        x = self.embeddings(ids)
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASKED)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class Blip(nn.Module):
    def __init__(self, visual_encoder: BlipViT, text_encoder: MedBert):
        super().__init__()
        self.visual_encoder, self.text_encoder = visual_encoder, text_encoder


class ImageRewardNet(nn.Module):
    def __init__(self, blip: Blip, mlp: AestheticHead):
        super().__init__()
        self.blip, self.mlp = blip, mlp

    def forward(self, pixels, ids, attention_mask):
        """Scores [B] in float32."""
        image = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(ids, attention_mask, image)
        return (self.mlp(text[:, 0].float()) - SCORE_MEAN) / SCORE_STD


REQUIRED = ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.0.mlp.fc1.weight",
            "blip.text_encoder.embeddings.word_embeddings.weight", "mlp.layers.0.weight")


def build_image_reward(state: dict, med_config: dict, source: str) -> ImageRewardNet:
    """The network for an ImageReward state dict: ViT sizes from the weights, BERT sizes from med_config.json."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{source} is not an ImageReward checkpoint: missing {', '.join(missing)}")
    vit = "blip.visual_encoder."
    width = state[vit + "cls_token"].shape[-1]
    depth = len({k.split(".")[3] for k in state if k.startswith(vit + "blocks.")})
    vision = BlipViT(width, depth, state[vit + "patch_embed.proj.weight"].shape[-1],
                     state[vit + "pos_embed"].shape[1], state[vit + "blocks.0.mlp.fc1.weight"].shape[0])
    head = AestheticHead({k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}, source)
    net = ImageRewardNet(Blip(vision, MedBert(med_config, width)), head)
    wanted = {k: v for k, v in state.items()
              if k.startswith(("blip.visual_encoder.", "blip.text_encoder.")) and not k.endswith("position_ids")}
    try:
        result = net.blip.load_state_dict({k[len("blip."):]: v for k, v in wanted.items()}, strict=False)
    except RuntimeError as e:
        line = next((s.strip() for s in str(e).splitlines() if "size mismatch" in s), str(e).splitlines()[0])
        raise ValueError(f"{source} does not fit the ImageReward architecture of {MED_CONFIG}: {line} (the "
                         f"checkpoint and {MED_CONFIG} must both come from THUDM/ImageReward)") from None
    if result.missing_keys or result.unexpected_keys:
        problems = (["missing " + ", ".join(result.missing_keys[:4])] if result.missing_keys else []) + \
                   (["unexpected " + ", ".join(result.unexpected_keys[:4])] if result.unexpected_keys else [])
        raise ValueError(f"{source} does not fit the ImageReward architecture of {MED_CONFIG}: "
                         f"{'; '.join(problems)} (the checkpoint and {MED_CONFIG} must both come from "
                         "THUDM/ImageReward)")
    return net.eval()


def image_reward_files(weights_path: str) -> tuple[str, str]:
    """(med_config.json, tokenizer folder) beside the weights; missing ones are named with the folder."""
    folder = os.path.dirname(weights_path)
    config, tokenizer = os.path.join(folder, MED_CONFIG), os.path.join(folder, TOKENIZER_FOLDER)
    needed = {MED_CONFIG: config, f"{TOKENIZER_FOLDER}/vocab.txt": os.path.join(tokenizer, "vocab.txt")}
    missing = [REWARD_FOLDERS["image_reward"].file(name) for name, path in needed.items() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(missing_companions_message("ImageReward", os.path.basename(weights_path), folder,
                                                           missing))
    return config, tokenizer


def blip_tokenizer(folder: str):
    """BLIP's tokenizer: bert-base-uncased plus the [DEC] (bos) and [ENC] tokens BLIP adds."""
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardModel:
    """The ImageReward network, placed on the GPU through ComfyUI's model management and kept across prompts."""

    def __init__(self, weights_path: str, precision: str = "auto"):
        import comfy.model_management
        import comfy.model_patcher
        config_path, tokenizer_folder = image_reward_files(weights_path)
        self.source = os.path.basename(weights_path)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{MED_CONFIG} ({config_path}) is not valid JSON -- corrupt or truncated ({e})") from e
        with torch.inference_mode(False):
            net = build_image_reward(_load_state_dict(weights_path), config, f"{self.source} ({weights_path})")
            self.dtype = reward_model_dtype(precision, comfy.model_management.get_torch_device())
            net.blip.to(self.dtype)        # the head and the normalisation stay in float32
        self.net = net
        self.tokenizer = blip_tokenizer(tokenizer_folder)
        if len(self.tokenizer) > config["vocab_size"]:
            raise ValueError(f"the tokenizer in {tokenizer_folder} has {len(self.tokenizer)} tokens but {MED_CONFIG} "
                             f"says the text encoder has {config['vocab_size']}: use bert-base-uncased's vocab.txt")
        self.image_size = net.blip.visual_encoder.image_size
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.patcher = comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())

    def device(self) -> torch.device:
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.load_device

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) [len(texts), 35]; each distinct text tokenized once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if new:
            if len(self._tokens) + len(new) > 256:
                self._tokens.clear()
            out = self.tokenizer(new, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                 return_tensors="pt")
            self._tokens.update(zip(new, zip(out["input_ids"], out["attention_mask"])))
        return (torch.stack([self._tokens[t][0] for t in texts]), torch.stack([self._tokens[t][1] for t in texts]))

    def scores(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        device = self.device()
        ids, mask = self.tokens(texts)
        x = clip_preprocess(images.to(device, torch.float32), self.image_size).to(self.dtype)
        return self.net(x, ids.to(device), mask.to(device))

    def describe(self) -> str:
        return f"ImageReward ({self.source})"


class ImageRewardReward(Reward):
    differentiable = True

    def __init__(self, model: ImageRewardModel, text: str = ""):
        self.model, self.text = model, text.strip()
        self.needs_prompt = not self.text
        what = f"'{self.text}'" if self.text else "the prompt"
        self.name = f"ImageReward vs {what} ({model.describe()})"

    def score(self, images, prompts=None, context=None):  # scores each image alone
        texts = [self.text] * images.shape[0] if self.text else list(prompts)
        return self.model.scores(images, texts)
