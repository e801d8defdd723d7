"""HPS v2 / v2.1, PickScore and ImageReward from local files in the users' formats, on tiny random weights the
tests write (no downloads): each score against a reference computed here from the official definitions, batch vs
one at a time, gradients, the prompt's source, samplers in the executor, errors naming the files."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import harness

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072

# open_clip ViT-H-14's layout (GELU, head_width, separate text tower) at a tiny width
TINY_HPS = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# the tiny open_clip ViT the aesthetic backbone test uses (OpenAI's layout: the same open_clip keys)
TINY_VIT = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# ImageReward: BLIP ViT (16 heads, as ViT-L) and the med BERT at a tiny width
VIT_WIDTH, VIT_DEPTH, VIT_PATCH, VIT_IMAGE, VIT_HIDDEN, VIT_HEADS = 32, 2, 8, 32, 64, 16
TINY_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 32,
            "add_cross_attention": True}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "the", "in",
              "snow", "cabin", "##s", "blue", "apple"]
TINY_MED["vocab_size"] = len(BERT_WORDS) + 2        # + BLIP's [DEC] and [ENC]


def seeded(shape, gen, scale=0.1, offset=0.0):
    return torch.randn(shape, generator=gen) * scale + offset


def image_reward_state(gen, vocab: int, width: int = VIT_WIDTH, d: int = TINY_MED["hidden_size"]) -> dict:
    """An ImageReward.pt state dict with the official key names (BLIP's timm-style ViT, BLIP's med BERT with
    cross-attention, the unused ITC projections, the MLP head), seeded."""
    hidden, inter = VIT_HIDDEN, TINY_MED["intermediate_size"]
    v = "blip.visual_encoder."
    s = {v + "cls_token": seeded((1, 1, width), gen), v + "pos_embed": seeded((1, (VIT_IMAGE // VIT_PATCH) ** 2 + 1,
                                                                               width), gen),
         v + "patch_embed.proj.weight": seeded((width, 3, VIT_PATCH, VIT_PATCH), gen),
         v + "patch_embed.proj.bias": seeded((width,), gen),
         v + "norm.weight": seeded((width,), gen, 0.1, 1.0), v + "norm.bias": seeded((width,), gen)}
    for i in range(VIT_DEPTH):
        b = f"{v}blocks.{i}."
        s.update({b + "norm1.weight": seeded((width,), gen, 0.1, 1.0), b + "norm1.bias": seeded((width,), gen),
                  b + "attn.qkv.weight": seeded((3 * width, width), gen, 0.3),
                  b + "attn.qkv.bias": seeded((3 * width,), gen),
                  b + "attn.proj.weight": seeded((width, width), gen, 0.2), b + "attn.proj.bias": seeded((width,), gen),
                  b + "norm2.weight": seeded((width,), gen, 0.1, 1.0), b + "norm2.bias": seeded((width,), gen),
                  b + "mlp.fc1.weight": seeded((hidden, width), gen, 0.2), b + "mlp.fc1.bias": seeded((hidden,), gen),
                  b + "mlp.fc2.weight": seeded((width, hidden), gen, 0.2), b + "mlp.fc2.bias": seeded((width,), gen)})
    t = "blip.text_encoder."
    s.update({t + "embeddings.word_embeddings.weight": seeded((vocab, d), gen, 0.5),
              t + "embeddings.position_embeddings.weight": seeded((TINY_MED["max_position_embeddings"], d), gen, 0.5),
              t + "embeddings.position_ids": torch.arange(TINY_MED["max_position_embeddings"]).expand(1, -1),
              t + "embeddings.LayerNorm.weight": seeded((d,), gen, 0.1, 1.0),
              t + "embeddings.LayerNorm.bias": seeded((d,), gen)})
    for i in range(TINY_MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, source in (("attention", d), ("crossattention", width)):
            s.update({b + f"{part}.self.query.weight": seeded((d, d), gen, 0.3),
                      b + f"{part}.self.query.bias": seeded((d,), gen),
                      b + f"{part}.self.key.weight": seeded((d, source), gen, 0.3),
                      b + f"{part}.self.key.bias": seeded((d,), gen),
                      b + f"{part}.self.value.weight": seeded((d, source), gen, 0.3),
                      b + f"{part}.self.value.bias": seeded((d,), gen),
                      b + f"{part}.output.dense.weight": seeded((d, d), gen, 0.2),
                      b + f"{part}.output.dense.bias": seeded((d,), gen),
                      b + f"{part}.output.LayerNorm.weight": seeded((d,), gen, 0.1, 1.0),
                      b + f"{part}.output.LayerNorm.bias": seeded((d,), gen)})
        s.update({b + "intermediate.dense.weight": seeded((inter, d), gen, 0.2),
                  b + "intermediate.dense.bias": seeded((inter,), gen),
                  b + "output.dense.weight": seeded((d, inter), gen, 0.2), b + "output.dense.bias": seeded((d,), gen),
                  b + "output.LayerNorm.weight": seeded((d,), gen, 0.1, 1.0),
                  b + "output.LayerNorm.bias": seeded((d,), gen)})
    s.update({"blip.vision_proj.weight": seeded((16, width), gen), "blip.vision_proj.bias": seeded((16,), gen),
              "blip.text_proj.weight": seeded((16, d), gen), "blip.text_proj.bias": seeded((16,), gen)})
    dims = [d, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        s[f"mlp.layers.{layer}.weight"] = seeded((o, i), gen, 1.0 / math.sqrt(i))
        s[f"mlp.layers.{layer}.bias"] = seeded((o,), gen, 0.1)
    return s


def randomise(model, gen):
    """Seeded weights: norm scales around 1, everything else small noise."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_of_a_norm = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if scale_of_a_norm else 0.0))


def write_tiny_preference_models(root: Path) -> dict:
    """The users' files, at a tiny width with seeded random weights, under the names the README and the examples
    use: root/hps/HPS_v2.1_compressed.pt ({'state_dict': ...} in open_clip's ViT-H-14 layout; the .json beside it
    declares the tiny width), root/pickscore/PickScore_v1/ (the Hugging Face folder: config.json,
    model.safetensors, preprocessor_config.json, CLIP tokenizer files), root/image_reward/ImageReward.pt +
    med_config.json + bert-base-uncased/vocab.txt.  Returns the three folders.  Also for tests/test_examples.py."""
    import comfy.sd1_clip
    import open_clip
    from transformers import CLIPModel
    dirs = {name: root / name for name in ("hps", "pickscore", "image_reward")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        (dirs["hps"] / "HPS_v2.1_compressed.json").write_text(json.dumps(TINY_HPS))
        open_clip.add_model_config(str(dirs["hps"] / "HPS_v2.1_compressed.json"))
        hps = open_clip.create_model("HPS_v2.1_compressed", pretrained=None, load_weights=False)
        randomise(hps, gen)
        torch.save({"state_dict": {f"module.{k}": v for k, v in hps.state_dict().items()}},
                   dirs["hps"] / "HPS_v2.1_compressed.pt")
        pick = dirs["pickscore"] / "PickScore_v1"
        torch.manual_seed(1)
        CLIPModel(tiny_pickscore_config()).eval().save_pretrained(str(pick), safe_serialization=True)
        for f in Path(comfy.sd1_clip.__file__).with_name("sd1_tokenizer").iterdir():
            shutil.copy(f, pick / f.name)
        (pick / "preprocessor_config.json").write_text(json.dumps(
            {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3, "size": 32}))
        ir = dirs["image_reward"]
        (ir / "bert-base-uncased").mkdir(exist_ok=True)
        (ir / "bert-base-uncased" / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
        (ir / "med_config.json").write_text(json.dumps(TINY_MED))
        torch.save(image_reward_state(gen, TINY_MED["vocab_size"]), ir / "ImageReward.pt")
    return dirs


def tiny_pickscore_config():
    """PickScore_v1's config.json at a tiny width (GELU, as PickScore's ViT-H/14; logit scale 100)."""
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
        projection_dim=16, logit_scale_init_value=math.log(100.0))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, pack):
    """The users' folders (write_tiny_preference_models) plus broken variants for the error tests, registered with
    folder_paths as ComfyUI would find them."""
    import folder_paths
    import open_clip
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel
    harness.pack_submodule("nodes.preference_rewards")       # registers the folders
    root = tmp_path_factory.mktemp("models")
    dirs = write_tiny_preference_models(root)
    dirs["open_clip"] = root / "open_clip"
    dirs["open_clip"].mkdir()
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode(False):
        # HPS weights of another width than the architecture JSON beside them
        wide = {**TINY_HPS, "vision_cfg": {**TINY_HPS["vision_cfg"], "width": 48}}
        (dirs["hps"] / "wrong-width.json").write_text(json.dumps(TINY_HPS))
        open_clip.add_model_config(str(dirs["hps"] / "wrong-width.json"))
        (dirs["hps"] / "wrong-width-src.json").write_text(json.dumps(wide))
        open_clip.add_model_config(str(dirs["hps"] / "wrong-width-src.json"))
        other = open_clip.create_model("wrong-width-src", pretrained=None, load_weights=False)
        torch.save({"state_dict": other.state_dict()}, dirs["hps"] / "wrong-width.pt")
        (dirs["hps"] / "wrong-width-src.json").unlink()
        # PickScore: an fp16 single file read with its folder's configs; a folder without tokenizer files; weights
        # of another width than config.json
        pick = dirs["pickscore"] / "PickScore_v1"
        weights = load_file(str(pick / "model.safetensors"))
        save_file({k: v.half() for k, v in weights.items()}, str(pick / "pickscore_fp16.safetensors"))
        no_tokenizer = dirs["pickscore"] / "no_tokenizer"
        no_tokenizer.mkdir()
        shutil.copy(pick / "config.json", no_tokenizer / "config.json")
        shutil.copy(pick / "model.safetensors", no_tokenizer / "model.safetensors")
        (dirs["pickscore"] / "weights_alone").mkdir()
        shutil.copy(pick / "model.safetensors", dirs["pickscore"] / "weights_alone" / "model.safetensors")
        narrow = dirs["pickscore"] / "narrow"
        narrow.mkdir()
        for f in pick.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, narrow / f.name)
        config = tiny_pickscore_config()
        wide_config = CLIPConfig(text_config=config.text_config.to_dict(),
                                 vision_config={**config.vision_config.to_dict(), "hidden_size": 48},
                                 projection_dim=16)
        save_file({k: v.contiguous() for k, v in CLIPModel(wide_config).state_dict().items()},
                  str(narrow / "model.safetensors"))
        # ImageReward: without its med_config.json / tokenizer folder; a wider BERT than med_config.json; an HPS file
        ir = dirs["image_reward"]
        lonely = root / "image_reward_alone"
        lonely.mkdir()
        shutil.copy(ir / "ImageReward.pt", lonely / "ImageReward-alone.pt")
        torch.save(image_reward_state(gen, TINY_MED["vocab_size"], d=48), ir / "ImageReward-wide-text.pt")
        shutil.copy(dirs["hps"] / "HPS_v2.1_compressed.pt", ir / "not-image-reward.pt")
    for name in ("hps", "pickscore", "image_reward"):
        folder_paths.add_model_folder_path(name, str(dirs[name]))
    folder_paths.add_model_folder_path("image_reward", str(lonely))
    return dirs


def nodes():
    return harness.pack_submodule("nodes.preference_rewards")


def load(kind: str, weights: str | None = None, text: str = "", precision: str = "fp32"):
    node = {"hps": nodes().HPSRewardNode, "pickscore": nodes().PickScoreRewardNode,
            "image_reward": nodes().ImageRewardNode}[kind]
    default = {"hps": "HPS_v2.1_compressed.pt", "pickscore": "PickScore_v1/model.safetensors",
               "image_reward": "ImageReward.pt"}[kind]
    return node.execute(weights or default, text, precision)[0]


def normalise(x):
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def images(seed: int, n: int = 3, h: int = 48, w: int = 72):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- references


def hps_reference(model_dirs, imgs, prompts):
    """HPS as the official scorer computes it: open_clip's model with the checkpoint's state_dict, HPS's
    ResizeMaxSize (longer side to 224 -- here 32 -- bicubic, black padding, left/top get the smaller half),
    ToTensor, Normalize; score = diag(image_features @ text_features.T) of open_clip's forward."""
    import open_clip
    import torchvision.transforms.functional as TF
    model = open_clip.create_model("HPS_v2.1_compressed", pretrained=None, load_weights=False)
    state = torch.load(model_dirs["hps"] / "HPS_v2.1_compressed.pt")["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    out = []
    for image, prompt in zip(imgs, prompts):
        x = image.movedim(-1, 0)
        h, w = x.shape[-2:]
        scale = 32 / float(max(h, w))
        new = tuple(round(dim * scale) for dim in (h, w))
        x = TF.resize(x, list(new), TF.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = 32 - new[0], 32 - new[1]
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        x = TF.normalize(x, CLIP_MEAN, CLIP_STD).unsqueeze(0)
        with torch.no_grad():
            image_features, text_features, _ = model(x, open_clip.get_tokenizer("ViT-H-14")([prompt]))
        out.append((image_features @ text_features.T).diagonal()[0])
    return torch.stack(out)


def center_crop_transform(imgs, size):
    """CLIP's / ImageReward's torchvision transform on tensors: Resize(size, bicubic), CenterCrop, Normalize."""
    import torchvision.transforms as T
    t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                   T.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([t(image.movedim(-1, 0)) for image in imgs])


def pickscore_reference(folder, imgs, prompts):
    """PickScore's definition on transformers' own CLIPModel forward: logits_per_image = logit_scale.exp() *
    cos(image, text) -- the diagonal, one (image, prompt) pair at a time."""
    from transformers import AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    pixels = center_crop_transform(imgs, 32)
    out = []
    for x, prompt in zip(pixels, prompts):
        tokens = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            out.append(model(pixel_values=x[None], **tokens).logits_per_image[0, 0])
    return torch.stack(out)


def linear(x, state, name):
    return x @ state[name + ".weight"].T + state[name + ".bias"]


def image_reward_reference(model_dirs, imgs, prompts):
    """ImageReward.score written out from BLIP's definitions (timm ViT, med BERT in multimodal mode, -10000
    padding mask), tokens from BERT's tokenizer with BLIP's [DEC] / [ENC] added, padded to 35."""
    from transformers import BertTokenizer
    state = torch.load(model_dirs["image_reward"] / "ImageReward.pt")
    tokenizer = BertTokenizer.from_pretrained(str(model_dirs["image_reward"] / "bert-base-uncased"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    x = center_crop_transform(imgs, VIT_IMAGE)

    def heads_attention(q, k, v, heads, mask=None):
        b, n, w = q.shape
        split = lambda t: t.reshape(b, t.shape[1], heads, w // heads).permute(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // heads)
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, n, w)

    v = "blip.visual_encoder."
    ln = lambda h, name, eps: F.layer_norm(h, h.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)  # noqa
    h = F.conv2d(x, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=VIT_PATCH)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([state[v + "cls_token"].expand(h.shape[0], -1, -1), h], 1) + state[v + "pos_embed"]
    for i in range(VIT_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = linear(ln(h, b + "norm1", 1e-6), state, b + "attn.qkv").chunk(3, -1)
        h = h + linear(heads_attention(q, k, val, VIT_HEADS), state, b + "attn.proj")
        h = h + linear(F.gelu(linear(ln(h, b + "norm2", 1e-6), state, b + "mlp.fc1")), state, b + "mlp.fc2")
    image = ln(h, v + "norm", 1e-6)
    t = "blip.text_encoder."
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    e = state[t + "embeddings.word_embeddings.weight"][ids] + \
        state[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(e, t + "embeddings.LayerNorm", 1e-12)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    heads = TINY_MED["num_attention_heads"]
    for i in range(TINY_MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, source, m in (("attention", None, extended), ("crossattention", image, None)):
            src = h if source is None else source
            a = heads_attention(linear(h, state, b + f"{part}.self.query"), linear(src, state, b + f"{part}.self.key"),
                                linear(src, state, b + f"{part}.self.value"), heads, m)
            h = ln(linear(a, state, b + f"{part}.output.dense") + h, b + f"{part}.output.LayerNorm", 1e-12)
        f = linear(F.gelu(linear(h, state, b + "intermediate.dense")), state, b + "output.dense")
        h = ln(f + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for layer in (0, 2, 4, 6, 7):
        r = linear(r, state, f"mlp.layers.{layer}")
    return ((r - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)


REFERENCES = {"hps": lambda dirs, imgs, prompts: hps_reference(dirs, imgs, prompts),
              "pickscore": lambda dirs, imgs, prompts: pickscore_reference(dirs["pickscore"] / "PickScore_v1", imgs,
                                                                           prompts),
              "image_reward": image_reward_reference}
KINDS = ("hps", "pickscore", "image_reward")


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
def test_score_equals_the_official_definition_on_the_same_weights(model_dirs, kind):
    imgs = images(2, n=3)
    prompts = ["a photo of a cat", "a red dog in the snow", "a blue apple"]
    reward = load(kind)
    got = reward(imgs, prompts)
    expected = REFERENCES[kind](model_dirs, imgs, prompts)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got, expected)
    assert (expected.max() - expected.min()) > 1e-3      # the images / prompts are told apart


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_one_at_a_time_and_the_model_is_cached(model_dirs, kind):
    reward = load(kind)
    imgs = images(3, n=4, h=40, w=40)
    prompts = ["a cat", "a photo of a dog", "the red cabin in snow", "a cat"]
    batched = reward(imgs, prompts)
    alone = torch.cat([reward(imgs[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    assert torch.allclose(batched, alone, atol=1e-5), (batched, alone)
    again = load(kind)
    model = {"hps": lambda r: r.clip, "pickscore": lambda r: r.model, "image_reward": lambda r: r.model}[kind]
    assert model(again) is model(reward)          # loaded once, kept across prompts


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_to_the_pixels(model_dirs, kind):
    reward = load(kind)
    assert reward.differentiable
    with torch.inference_mode(False), torch.enable_grad():
        imgs = torch.rand(2, 36, 36, 4, requires_grad=True)       # any size, with an alpha channel
        reward(imgs, ["a cat", "a dog"]).sum().backward()
    assert imgs.grad[..., :3].abs().sum() > 0 and imgs.grad[..., 3].abs().sum() == 0
    assert torch.isfinite(imgs.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_text_input_or_the_callers_prompt(model_dirs, kind):
    imgs = images(4, n=2, h=32, w=32)
    fixed = load(kind, text="a photo of a cat")
    from_prompt = load(kind, text="")
    assert not fixed.needs_prompt and from_prompt.needs_prompt
    assert torch.equal(fixed(imgs), from_prompt(imgs, ["a photo of a cat"]))
    assert not torch.allclose(from_prompt(imgs, ["a dog"]), fixed(imgs), atol=1e-4)
    rewards = harness.pack_submodule("rewards")
    with pytest.raises(rewards.RewardInputError, match="needs a prompt"):
        from_prompt(imgs)


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_stays_close_and_scores_stay_float32(model_dirs, kind):
    imgs = images(5, n=2, h=32, w=32)
    full, half = load(kind), load(kind, precision="bf16")
    a, b = full(imgs, ["a cat"]), half(imgs, ["a cat"])
    assert b.dtype == torch.float32
    scale = {"hps": 0.05, "pickscore": 5.0, "image_reward": 0.1}[kind]     # bf16 has 8 bits of mantissa
    assert (a - b).abs().max() < scale, (a, b)


def test_hps_pads_the_short_side_instead_of_cropping(model_dirs):
    """HPS evaluates whole images (black bars), not CLIP's centre crop: a change at the far left of a wide image
    changes its HPS."""
    reward = load("hps")
    imgs = images(6, n=1, h=24, w=64)
    edited = imgs.clone()
    edited[:, :, :4] = 1.0 - edited[:, :, :4]      # outside any centre crop
    assert (reward(imgs, ["a cat"]) - reward(edited, ["a cat"])).abs().item() > 1e-5


def test_pickscore_without_tokenizer_files_uses_comfys_clip_tokenizer(model_dirs):
    """A PickScore folder without tokenizer files tokenizes with ComfyUI's copy of the CLIP BPE tokenizer (the
    vocabulary of OpenAI's and LAION's CLIP): the same scores as with the files (the test's folder has ComfyUI's
    files, so equal scores show the fallback is that tokenizer and nothing else changed)."""
    imgs = images(9, n=2, h=32, w=32)
    alone = load("pickscore", "no_tokenizer/model.safetensors")
    assert alone.model.tokenizer.name_or_path.endswith("sd1_tokenizer")
    assert torch.allclose(alone(imgs, ["a photo of a cat"]), load("pickscore")(imgs, ["a photo of a cat"]),
                          atol=1e-5)


def test_pickscore_reads_a_single_weights_file_with_its_folders_configs(model_dirs):
    full = load("pickscore")
    single = load("pickscore", "PickScore_v1/pickscore_fp16.safetensors")
    imgs = images(7, n=2, h=32, w=32)
    assert single.model is not full.model
    assert torch.allclose(single(imgs, ["a cat"]), full(imgs, ["a cat"]), atol=0.05)


def test_activation_comes_from_the_checkpoint(model_dirs):
    """HPS's ViT-H-14 runs GELU; PickScore's activation is its config.json's (GELU here, as PickScore_v1's)."""
    hps = load("hps").clip
    assert hps.activation == "GELU" and not any(type(m).__name__ == "QuickGELU" for m in hps.model.modules())
    pick = load("pickscore").model
    assert pick.activation == "gelu"
    assert type(pick.clip.vision_model.encoder.layers[0].mlp.activation_fn).__name__ == "GELUActivation"


def test_aesthetic_backbone_with_openai_weights_runs_quickgelu(model_dirs):
    """OpenAI's CLIP uses QuickGELU.  The same tiny weights give other embeddings under GELU; a file in OpenAI's
    state-dict layout (its input_resolution / context_length / vocab_size entries) is loaded with QuickGELU and
    matches a forward pass written the way OpenAI's CLIP computes it, whatever architecture name was picked."""
    import open_clip
    clip_nodes = harness.pack_submodule("nodes.clip_rewards")
    import folder_paths
    d = model_dirs["open_clip"]
    (d / "tiny-openai.json").write_text(json.dumps(TINY_VIT))
    (d / "tiny-laion.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(str(d / "tiny-openai.json"))
    gen = torch.Generator().manual_seed(11)
    with torch.inference_mode(False):
        model = open_clip.create_model("tiny-openai", pretrained=None, load_weights=False)
        randomise(model, gen)
        with torch.no_grad():
            for name, p in model.named_parameters():   # MLP inputs of order 1, where the two activations differ,
                if "c_fc" in name:                       # and a stronger MLP branch
                    p.mul_(7.0)
                if "c_proj" in name:
                    p.mul_(20.0)
        state = dict(model.state_dict())
    openai = {**state, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    torch.save(openai, d / "tiny-openai.pt")
    torch.save(state, d / "tiny-laion.pt")
    folder_paths.add_model_folder_path("open_clip", str(d))
    loaded = clip_nodes.LoadOpenClip.execute("ViT-L-14", "tiny-openai.pt", "fp32")[0]
    plain = clip_nodes.LoadOpenClip.execute("ViT-L-14", "tiny-laion.pt", "fp32")[0]
    assert loaded.activation == "QuickGELU" and plain.activation == "GELU"
    assert "QuickGELU" in loaded.describe()
    x = images(8, n=2, h=32, w=32)
    openai_way = openai_image_embeddings(state, normalise(x.movedim(-1, 1)), quick_gelu=True)
    gelu_way = openai_image_embeddings(state, normalise(x.movedim(-1, 1)), quick_gelu=False)
    assert (openai_way - gelu_way).abs().max() > 1e-3     # 100x the tolerance below: the activation matters here
    got = loaded.image_embeddings(x)
    assert torch.allclose(got, openai_way, atol=1e-5), (got - openai_way).abs().max()
    assert torch.allclose(plain.image_embeddings(x), gelu_way, atol=1e-5)


def openai_image_embeddings(state, x, quick_gelu: bool):
    """OpenAI CLIP's VisionTransformer.forward written out (conv1, class token, positions, ln_pre, residual
    attention blocks with x * sigmoid(1.702 x) in the MLP, ln_post on the class token, proj), L2-normalised."""
    width = state["visual.conv1.weight"].shape[0]
    heads = width // TINY_VIT["vision_cfg"]["head_width"]
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if quick_gelu else F.gelu
    ln = lambda h, name: F.layer_norm(h, (width,), state[name + ".weight"], state[name + ".bias"])  # noqa: E731
    h = F.conv2d(x, state["visual.conv1.weight"], stride=TINY_VIT["vision_cfg"]["patch_size"])
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([state["visual.class_embedding"].expand(h.shape[0], 1, -1), h], 1)
    h = h + state["visual.positional_embedding"]
    h = ln(h, "visual.ln_pre")
    for i in range(TINY_VIT["vision_cfg"]["layers"]):
        b = f"visual.transformer.resblocks.{i}."
        q, k, v = (ln(h, b + "ln_1") @ state[b + "attn.in_proj_weight"].T + state[b + "attn.in_proj_bias"]).chunk(3, -1)
        n = h.shape[1]
        split = lambda t: t.reshape(t.shape[0], n, heads, width // heads).transpose(1, 2)  # noqa: E731
        a = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)).softmax(-1) @ split(v)
        h = h + linear(a.transpose(1, 2).reshape(h.shape[0], n, width), state, b + "attn.out_proj")
        h = h + linear(act(linear(ln(h, b + "ln_2"), state, b + "mlp.c_fc")), state, b + "mlp.c_proj")
    emb = ln(h[:, 0], "visual.ln_post") @ state["visual.proj"]
    return F.normalize(emb, dim=-1)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_files_are_named_with_their_folder(model_dirs):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed.pt is missing: put it in models/hps .* "
                                                r"HPS_v2.1_compressed.pt .* xswu/HPSv2"):
        load("hps", "HPS_v2_compressed.pt")
    with pytest.raises(FileNotFoundError) as error:
        load("pickscore", "weights_alone/model.safetensors")
    message = str(error.value)
    assert "needs config.json beside model.safetensors in " + str(model_dirs["pickscore"] / "weights_alone") \
        in message and "Hugging Face page yuvalkirstain/PickScore_v1" in message
    with pytest.raises(FileNotFoundError) as error:
        load("image_reward", "ImageReward-alone.pt")
    message = str(error.value)
    assert "med_config.json" in message and "bert-base-uncased/vocab.txt" in message
    assert "image_reward_alone" in message


def test_checkpoints_of_another_architecture_or_width_are_named(model_dirs):
    with pytest.raises(ValueError, match=r"wrong-width.pt does not fit the wrong-width architecture"):
        load("hps", "wrong-width.pt")
    with pytest.raises(ValueError, match=r"model.safetensors \(.*narrow.*\) does not fit the CLIP described by its "
                                         r"config.json"):
        load("pickscore", "narrow/model.safetensors")
    with pytest.raises(ValueError, match=r"ImageReward-wide-text.pt .* does not fit the ImageReward architecture of "
                                         r"med_config.json: .*size mismatch"):
        load("image_reward", "ImageReward-wide-text.pt")
    with pytest.raises(ValueError, match=r"not-image-reward.pt .* is not an ImageReward checkpoint: missing "
                                         r"blip.visual_encoder.cls_token"):
        load("image_reward", "not-image-reward.pt")


# ------------------------------------------------------------------------------------------ in the samplers


NODE_IDS = {"hps": ("RewardSteerHPSReward", "HPS_v2.1_compressed.pt"),
            "pickscore": ("RewardSteerPickScoreReward", "PickScore_v1/model.safetensors"),
            "image_reward": ("RewardSteerImageReward", "ImageReward.pt")}


def reward_node(kind: str, text: str = "") -> dict:
    node_id, weights = NODE_IDS[kind]
    return {"class_type": node_id, "inputs": {"weights": weights, "text": text, "precision": "fp32"}}


def demon_graph(kind: str, text: str, prompt: str) -> dict:
    return {
        "1": harness.reference_model_node("flow"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "3": reward_node(kind, text),
        "5": {"class_type": "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": 4, "cfg": 1.0, "scheduler": "simple",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1], "k": 3, "beta": 0.1, "weighting": "tanh", "tau": 0.0,
                         "estimator": "tweedie", "max_rollout_steps": 20, "min_sigma": 0.0, "start": 0.0,
                         "end": 1.0, "chunk_items": 0, "budget": 0, "decoder": "vae", "prompt": prompt}},
    }


@pytest.mark.parametrize("kind", KINDS)
def test_drives_demon_with_the_samplers_prompt(executor, model_dirs, kind):
    """Demon steers with each reward; the reward's text and the sampler's prompt are interchangeable, and another
    prompt steers elsewhere."""
    by_sampler = executor.run(demon_graph(kind, "", "a photo of a cat"), want=("5",))["5"][0][0]["samples"]
    by_text = executor.run(demon_graph(kind, "a photo of a cat", ""), want=("5",))["5"][0][0]["samples"]
    other = executor.run(demon_graph(kind, "", "a blue apple in the snow"), want=("5",))["5"][0][0]["samples"]
    assert torch.isfinite(by_sampler).all()
    assert torch.equal(by_sampler, by_text)
    assert not torch.allclose(by_sampler, other, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_guided_smc_best_of_n_and_score_images(executor, model_dirs, kind):
    prompt = {
        "1": {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": "a red apple"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": reward_node(kind),
        "4": {"class_type": "RewardSteerKSamplerSMC",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": 3, "cfg": 2.0, "scheduler": "karras",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1], "particles": 2, "lam": 10.0, "potential": "difference",
                         "tempering": "none", "gamma": 0.008, "resampling": "systematic", "ess_threshold": 0.5,
                         "reward_start": 0, "reward_end": -1, "reward_interval": 1, "eta": 1.0,
                         "gradient_guidance": True, "output": "weighted_draw", "chunk_items": 0, "decoder": "vae",
                         "prompt": "a red apple"}},
        "5": {"class_type": "RewardSteerBestOfN",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
                         "scheduler": "karras", "positive": ["1", 2], "negative": ["1", 2],
                         "latent_image": ["2", 0], "denoise": 1.0, "reward": ["3", 0], "vae": ["1", 1], "n": 3,
                         "prompt": "a red apple"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 1], "vae": ["1", 1]}},
        "7": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["6", 0], "reward": ["3", 0],
                                                                 "prompt": "a red apple"}},
    }
    out = executor.run(prompt, want=("4", "5"))
    assert torch.isfinite(out["4"][0][0]["samples"]).all()
    best_of_n = json.loads(out["5"][2][0])
    assert len(best_of_n["scores"][0]) == 3 and best_of_n["best"][0] == max(best_of_n["scores"][0])
    scores = executor.history["outputs"]["7"]["scores"]
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)


def test_all_three_over_http_from_extra_model_paths(model_dirs, tmp_path):
    """A real server finds the folders through extra_model_paths.yaml, lists the files, and combines the three
    rewards on one batch."""
    from comfy_client import ComfyServer
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text("tests:\n" + "".join(f"    {k}: {model_dirs[k]}\n" for k in KINDS))
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 40, "batch_size": 2, "color": 0x884422}},
        "2": reward_node("hps"), "3": reward_node("pickscore"), "4": reward_node("image_reward"),
        "5": {"class_type": "RewardSteerCombineRewards",
              "inputs": {"normalisation": "none", "reward_1": ["2", 0], "weight_1": 1.0, "reward_2": ["3", 0],
                         "weight_2": 1.0, "reward_3": ["4", 0], "weight_3": 1.0}},
        "6": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["1", 0], "reward": ["5", 0],
                                                                 "prompt": "a cat"}},
        **{f"demon_{kind}": node for kind in KINDS for node in [demon_graph(kind, "", "a cat")["5"]]},
        "r1": harness.reference_model_node("flow"),
        "r2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "r3": reward_node("hps"), "r4": reward_node("pickscore"), "r5": reward_node("image_reward"),
    }
    for kind, reward in zip(KINDS, ("r3", "r4", "r5")):      # each reward steers a Demon run
        inputs = prompt[f"demon_{kind}"]["inputs"]
        inputs.update(model=["r1", 0], positive=["r1", 2], negative=["r1", 2], latent_image=["r2", 0],
                      vae=["r1", 1], reward=[reward, 0])
        prompt[f"save_{kind}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"demon_{kind}", 0],
                                                                         "filename_prefix": f"demon_{kind}"}}
    with ComfyServer(output_dir=tmp_path / "out", extra_args=["--extra-model-paths-config", str(config)],
                     log_path=tmp_path / "server.log") as server:
        info = server.get("/object_info/RewardSteerPickScoreReward")
        options = info["RewardSteerPickScoreReward"]["input"]["required"]["weights"][1]["options"]
        assert "PickScore_v1/model.safetensors" in options and not any(o.endswith(".json") for o in options)
        history = server.run(prompt, timeout=300)
    scores = history["outputs"]["6"]["scores"]
    assert all(history["outputs"][f"save_{kind}"]["latents"] for kind in KINDS)
    imgs = torch.full((2, 40, 40, 3), 0x88 / 255)
    imgs[..., 1], imgs[..., 2] = 0x44 / 255, 0x22 / 255
    expected = sum(load(k)(imgs, ["a cat"]) for k in KINDS)
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-3), (scores, expected)


def test_aesthetic_head_on_a_gelu_vit_l_backbone_is_warned_about(model_dirs, caplog):
    """The official head (768-d input) on a GELU backbone of that width is logged as likely wrong; on the same
    weights in OpenAI's layout (QuickGELU) it is not."""
    import logging

    import folder_paths
    import open_clip
    clip_nodes = harness.pack_submodule("nodes.clip_rewards")
    aesthetic = harness.pack_submodule("rewards.aesthetic")
    d = model_dirs["open_clip"]
    wide = {**TINY_VIT, "embed_dim": 768}
    for name in ("tiny768-gelu", "tiny768-openai"):
        (d / f"{name}.json").write_text(json.dumps(wide))
    open_clip.add_model_config(str(d / "tiny768-gelu.json"))
    with torch.inference_mode(False):
        state = open_clip.create_model("tiny768-gelu", pretrained=None, load_weights=False).state_dict()
    torch.save(state, d / "tiny768-gelu.pt")
    torch.save({**state, "input_resolution": torch.tensor(32)}, d / "tiny768-openai.pt")
    folder_paths.add_model_folder_path("open_clip", str(d))
    gen = torch.Generator().manual_seed(12)
    dims = [768, 1024, 128, 64, 16, 1]
    head = aesthetic.AestheticHead({f"layers.{layer}.{kind}": torch.randn((o, i) if kind == "weight" else (o,),
                                                                           generator=gen) * 0.01
                                    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:]))
                                    for kind in ("weight", "bias")})
    for weights, warned in (("tiny768-gelu.pt", True), ("tiny768-openai.pt", False)):
        clip = clip_nodes.LoadOpenClip.execute("ViT-L-14", weights, "fp32")[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            aesthetic.AestheticReward(clip, head, "head.pth")
        lines = [r.getMessage() for r in caplog.records if "runs GELU" in r.getMessage()]
        assert bool(lines) == warned, (weights, lines)
        if warned:
            assert "ViT-L-14-quickgelu" in lines[0] and "tiny768-gelu" in lines[0]
