"""CLIP-based rewards on real open_clip architecture code with weights the tests create (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import harness

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, pack):
    """A tiny open_clip checkpoint (+ its architecture JSON) and an aesthetic head with the official key names,
    in folders registered with ComfyUI's folder_paths like models/open_clip and models/aesthetic."""
    import folder_paths
    import open_clip
    from safetensors.torch import save_file
    harness.pack_submodule("nodes.clip_rewards")   # registers the folders
    root = tmp_path_factory.mktemp("models")
    clip_dir, head_dir = root / "open_clip", root / "aesthetic"
    clip_dir.mkdir()
    head_dir.mkdir()
    (clip_dir / "tiny-test-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(clip_dir / "tiny-test-clip.json"))
    torch.manual_seed(0)
    with torch.inference_mode(False):
        model = open_clip.create_model("tiny-test-clip", pretrained=None, load_weights=False)
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_dir / "tiny-test-clip.safetensors"))
        gen = torch.Generator().manual_seed(1)
        dims = [32, 1024, 128, 64, 16, 1]
        head = {}
        for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
            head[f"layers.{layer}.weight"] = torch.randn(o, i, generator=gen) * 0.1
            head[f"layers.{layer}.bias"] = torch.randn(o, generator=gen) * 0.1
        torch.save(head, head_dir / "tiny-head.pth")
        bad = dict(head)
        bad["layers.0.weight"] = torch.randn(1024, 768, generator=gen)
        torch.save(bad, head_dir / "vit-l-head.pth")
    folder_paths.add_model_folder_path("open_clip", str(clip_dir))
    folder_paths.add_model_folder_path("aesthetic", str(head_dir))
    return clip_dir, head_dir, model


def load(model_dirs):
    nodes = harness.pack_submodule("nodes.clip_rewards")
    return nodes.LoadOpenClip.execute("ViT-B-32", "tiny-test-clip.safetensors")[0]


def test_loader_reads_the_real_format_from_the_registered_folder(model_dirs):
    clip = load(model_dirs)
    original = model_dirs[2].state_dict()
    loaded = clip.model.state_dict()
    assert set(original) == set(loaded)
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert clip.arch == "tiny-test-clip" and clip.embed_dim == 32
    assert load(model_dirs) is clip      # kept across prompts


def test_aesthetic_equals_hand_computed_pipeline(model_dirs):
    clip = load(model_dirs)
    nodes = harness.pack_submodule("nodes.clip_rewards")
    reward = nodes.AestheticRewardNode.execute(clip, "tiny-head.pth")[0]
    images = torch.rand(3, 48, 64, 3, generator=torch.Generator().manual_seed(2))
    got = reward(images)
    # by hand: shorter side 48 -> 32 (bicubic, antialiased), centre crop 32x32, CLIP mean/std, embed, L2, MLP
    x = torch.nn.functional.interpolate(images.movedim(-1, 1), size=(32, 43), mode="bicubic", align_corners=False,
                                        antialias=True)[..., 5:37]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = clip.model.encode_image((x - mean) / std)
    h = emb / emb.norm(dim=-1, keepdim=True)
    state = torch.load(model_dirs[1] / "tiny-head.pth")
    for layer in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    assert torch.allclose(got, h.squeeze(-1), atol=1e-5)


def test_clip_score_equals_direct_cosine_and_uses_the_prompt(model_dirs):
    import open_clip
    clip = load(model_dirs)
    nodes = harness.pack_submodule("nodes.clip_rewards")
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    x = (images.movedim(-1, 1) - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tok = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)
        cat = torch.nn.functional.normalize(clip.model.encode_text(tok(["a cat"])), dim=-1)
        dog = torch.nn.functional.normalize(clip.model.encode_text(tok(["a dog"])), dim=-1)
    fixed = nodes.ClipScoreRewardNode.execute(clip, "a cat", "")[0]
    assert torch.allclose(fixed(images), (img * cat).sum(-1), atol=1e-5)
    contrast = nodes.ClipScoreRewardNode.execute(clip, "a cat", "a dog")[0]
    assert torch.allclose(contrast(images), (img * cat).sum(-1) - (img * dog).sum(-1), atol=1e-5)
    from_prompt = nodes.ClipScoreRewardNode.execute(clip, "", "")[0]
    assert from_prompt.needs_prompt and from_prompt.differentiable
    assert torch.allclose(from_prompt(images, ["a cat", "a dog"]), torch.stack([(img[0] * cat[0]).sum(),
                                                                                (img[1] * dog[0]).sum()]), atol=1e-5)


def test_each_distinct_text_is_encoded_once(model_dirs, monkeypatch):
    """A sampler scores every step against the same prompt(s): the text tower runs once per distinct text."""
    clip = load(model_dirs)
    clip._text_cache.clear()
    reference = clip.text_embeddings(["a cat", "a dog"]).clone()
    clip._text_cache.clear()
    encoded = []
    real = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda tokens: encoded.append(tokens.shape[0]) or real(tokens))
    nodes = harness.pack_submodule("nodes.clip_rewards")
    reward = nodes.ClipScoreRewardNode.execute(clip, "", "a dog")[0]
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    first = reward(images, ["a cat"] * 4)
    for _ in range(3):
        assert torch.equal(reward(images, ["a cat"] * 4), first)
    assert encoded == [1, 1]            # "a cat" once (for 4 images), the negative "a dog" once
    assert torch.allclose(clip.text_embeddings(["a dog", "a cat", "a dog"]), reference[[1, 0, 1]], atol=1e-6)
    assert encoded == [1, 1]


def test_clip_reward_drives_a_demon_run_in_the_executor(executor, model_dirs):
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "flow", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "3": {"class_type": "RewardSteerLoadOpenClip",
              "inputs": {"architecture": "ViT-B-32", "weights": "tiny-test-clip.safetensors"}},
        "4": {"class_type": "RewardSteerAestheticReward", "inputs": {"clip": ["3", 0], "head": "tiny-head.pth"}},
        "5": {"class_type": "RewardSteerKSamplerDemon",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": 6, "cfg": 1.0, "scheduler": "simple",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["4", 0], "vae": ["1", 1], "k": 4, "beta": 0.1, "weighting": "tanh", "tau": 0.0,
                         "estimator": "tweedie", "max_rollout_steps": 20, "min_sigma": 0.0, "start": 0.0,
                         "end": 1.0, "chunk_items": 0, "budget": 0, "decoder": "vae", "prompt": ""}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}},
        "7": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["6", 0], "reward": ["4", 0]}},
    }
    executor.run(prompt)
    scores = executor.history["outputs"]["7"]["scores"]
    assert len(scores) == 2 and all(s == s for s in scores)


def test_gradients_flow_and_bad_inputs_are_explained(model_dirs):
    clip = load(model_dirs)
    nodes = harness.pack_submodule("nodes.clip_rewards")
    reward = nodes.AestheticRewardNode.execute(clip, "tiny-head.pth")[0]
    with torch.inference_mode(False), torch.enable_grad():
        images = torch.rand(2, 40, 40, 4, requires_grad=True)      # any size, with an alpha channel
        reward(images).sum().backward()
    assert images.grad[..., :3].abs().sum() > 0 and images.grad[..., 3].abs().sum() == 0
    with pytest.raises(ValueError, match="expects 768-d embeddings but the CLIP backbone .* gives 32-d"):
        nodes.AestheticRewardNode.execute(clip, "vit-l-head.pth")
    with pytest.raises(FileNotFoundError, match=r"missing.pth is missing: put it in models/aesthetic .* "
                                                r"tiny-head.pth.* sac\+logos\+ava1-l14-linearMSE.pth"):
        nodes.AestheticRewardNode.execute(clip, "missing.pth")
    with pytest.raises(ValueError, match="empty"):
        reward(torch.zeros(0, 8, 8, 3))


def test_clip_nodes_over_http_with_files_from_extra_model_paths(model_dirs, tmp_path):
    """A real server finds the user's files through extra_model_paths.yaml and scores with both CLIP rewards."""
    from comfy_client import ComfyServer
    clip_dir, head_dir, _ = model_dirs
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"tests:\n    open_clip: {clip_dir}\n    aesthetic: {head_dir}\n")
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 40, "batch_size": 3, "color": 0x884422}},
        "2": {"class_type": "RewardSteerLoadOpenClip",
              "inputs": {"architecture": "ViT-B-32", "weights": "tiny-test-clip.safetensors"}},
        "3": {"class_type": "RewardSteerAestheticReward", "inputs": {"clip": ["2", 0], "head": "tiny-head.pth"}},
        "4": {"class_type": "RewardSteerClipScoreReward",
              "inputs": {"clip": ["2", 0], "text": "", "negative_text": "a dog"}},
        "5": {"class_type": "RewardSteerCombineRewards",
              "inputs": {"normalisation": "none", "reward_1": ["3", 0], "weight_1": 1.0, "reward_2": ["4", 0],
                         "weight_2": 2.0}},
        "6": {"class_type": "RewardSteerScoreImages",
              "inputs": {"images": ["1", 0], "reward": ["5", 0], "prompt": "a cat"}},
    }
    with ComfyServer(output_dir=tmp_path / "out", extra_args=["--extra-model-paths-config", str(config)],
                     log_path=tmp_path / "server.log") as server:
        info = server.get("/object_info/RewardSteerAestheticReward")
        assert "tiny-head.pth" in info["RewardSteerAestheticReward"]["input"]["required"]["head"][1]["options"]
        scores = server.run(prompt, timeout=300)["outputs"]["6"]["scores"]
    assert len(scores) == 3 and len(set(round(s, 6) for s in scores)) == 1   # identical images, identical scores


TINY_VISION = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
               "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
               "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 32}


def random_clip_vision_state(model, seed: int) -> dict:
    """Seeded weights in ComfyUI's CLIP-vision key format (norm scales 1, others small noise)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            state[name] = torch.ones(value.shape, dtype=torch.float16)
        else:
            state[name] = (torch.randn(value.shape, generator=gen) * 0.02).to(torch.float16)
    return state


def write_vit_l_clip_vision(path, seed: int) -> None:
    """A ViT-L/14 CLIP-vision safetensors file in ComfyUI's (OpenAI) key format with seeded fp16 weights -- the
    smallest CLIP that core CLIPVisionLoader detects (also written for the examples by tests/tiny_models_dir.py)."""
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops
    from safetensors.torch import save_file
    with open(Path(comfy.clip_vision.__file__).with_name("clip_vision_config_vitl.json")) as f:
        config = json.load(f)
    with torch.inference_mode(False):
        skeleton = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
        state = random_clip_vision_state(skeleton, seed=seed)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    """ComfyUI's own ClipVisionModel (what core 'Load CLIP Vision' returns) on a tiny config, seeded weights."""
    import comfy.clip_vision
    config = tmp_path_factory.mktemp("clip_vision_config") / "tiny.json"
    config.write_text(json.dumps(TINY_VISION))
    with torch.inference_mode():           # as when loaded inside a prompt: inference-mode weights
        cv = comfy.clip_vision.ClipVisionModel(str(config))
        cv.load_sd(random_clip_vision_state(cv.model, seed=5))
    return cv


def tiny_head(path, width: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dims = [width, 1024, 128, 64, 16, 1]
    head = {}
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        head[f"layers.{layer}.weight"] = torch.randn(o, i, generator=gen) * 0.1
        head[f"layers.{layer}.bias"] = torch.randn(o, generator=gen) * 0.1
    torch.save(head, path)
    return head


def run_head(state, h):
    for layer in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    return h.squeeze(-1)


def test_aesthetic_on_comfy_clip_vision_equals_core_encode_image(model_dirs, tiny_clip_vision):
    """ComfyUI's CLIP_VISION as the backbone: the reward equals core encode_image(...).image_embeds, L2-normalised,
    through the head -- on 8-bit images at the model's size, where core's rounding is exact."""
    nodes = harness.pack_submodule("nodes.clip_rewards")
    reward = nodes.AestheticRewardNode.execute(tiny_clip_vision, "tiny-head.pth")[0]
    images = torch.randint(0, 256, (3, 32, 32, 3), generator=torch.Generator().manual_seed(4)).float() / 255
    with torch.inference_mode():
        emb = tiny_clip_vision.encode_image(images)["image_embeds"].float()
    expected = run_head(torch.load(model_dirs[1] / "tiny-head.pth"), torch.nn.functional.normalize(emb, dim=-1))
    assert torch.allclose(reward(images), expected, atol=1e-4)
    assert "CLIP vision 32-wide" in reward.describe()
    # ComfyUI's CLIP code is not differentiable (in-place residuals): declared, and refused cleanly by guidance
    scoring = harness.pack_submodule("samplers.scoring")
    assert not reward.differentiable
    with pytest.raises(scoring.SteeringInputError, match="needs a differentiable reward.*use Load OpenCLIP"):
        scoring.make_latent_scorer(None, reward, differentiable=True)


def test_clip_vision_of_the_wrong_kind_or_width_is_explained(model_dirs, tiny_clip_vision):
    nodes = harness.pack_submodule("nodes.clip_rewards")
    with pytest.raises(ValueError, match=r"expects 768-d embeddings but the CLIP backbone CLIP vision 32-wide "
                                         r".* gives 32-d"):
        nodes.AestheticRewardNode.execute(tiny_clip_vision, "vit-l-head.pth")

    class NotClip:   # an encoder of a kind this pack has never heard of: named by its class
        model = torch.nn.Linear(4, 4)
        image_size = 224
    with pytest.raises(ValueError, match="is a Linear image encoder, not a CLIP one"):
        nodes.AestheticRewardNode.execute(NotClip(), "tiny-head.pth")


TINY_SIGLIP = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32, "image_size": 32,
               "intermediate_size": 64, "model_type": "siglip_vision_model", "num_attention_heads": 2,
               "num_hidden_layers": 2, "patch_size": 8, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
TINY_DINOV2 = {"hidden_size": 32, "use_mask_token": True, "patch_size": 8, "image_size": 32, "num_channels": 3,
               "num_attention_heads": 2, "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0,
               "hidden_act": "gelu", "mlp_ratio": 4, "model_type": "dinov2", "num_hidden_layers": 2,
               "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False, "layerscale_value": 1.0,
               "drop_path_rate": 0.0, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def core_clip_vision(tmp_path, config: dict):
    """core's ClipVisionModel (what Load CLIP Vision returns) on a tiny config: the model core builds for it."""
    import comfy.clip_vision
    path = tmp_path / f"{config['model_type']}.json"
    path.write_text(json.dumps(config))
    return comfy.clip_vision.ClipVisionModel(str(path))


def siglip2_clip_vision(tmp_path):
    """A SigLIP 2 CLIP_VISION: core's own on a ComfyUI that has one (siglip2_vision_model in IMAGE_ENCODERS);
    on an older one, a tiny CLIP-type model with a projection, marked the way newer core marks SigLIP 2."""
    import comfy.clip_vision
    if "siglip2_vision_model" in comfy.clip_vision.IMAGE_ENCODERS:
        return core_clip_vision(tmp_path, {**TINY_SIGLIP, "model_type": "siglip2_vision_model", "image_size": -1,
                                           "patch_size": 8, "num_patches": 16})
    cv = core_clip_vision(tmp_path, {**TINY_SIGLIP, "projection_dim": 32})
    cv.model_type = "siglip2_vision_model"
    return cv


@pytest.mark.parametrize("kind,named", [
    ("siglip", "SigLIP image encoder, not a CLIP one (SigLIP models need their own preprocessing"),
    ("siglip_projected", "SigLIP image encoder, not a CLIP one (SigLIP models need their own preprocessing"),
    ("siglip2", "SigLIP 2 image encoder, not a CLIP one (SigLIP models need their own preprocessing"),
    ("dinov2", "image encoder, not a CLIP one; the CLIP rewards need a CLIP vision model"),
])
def test_core_clip_vision_that_is_not_clip_is_refused_by_name(model_dirs, tmp_path, kind, named):
    """core's Load CLIP Vision also returns SigLIP, SigLIP 2 and DINO encoders; the aesthetic reward takes only CLIP
    (CLIP preprocessing, CLIP-trained heads) and names the kind it got.  A SigLIP with a projection used to pass."""
    nodes = harness.pack_submodule("nodes.clip_rewards")
    cv = {"siglip": lambda: core_clip_vision(tmp_path, TINY_SIGLIP),
          "siglip_projected": lambda: core_clip_vision(tmp_path, {**TINY_SIGLIP, "projection_dim": 32}),
          "siglip2": lambda: siglip2_clip_vision(tmp_path),
          "dinov2": lambda: core_clip_vision(tmp_path, TINY_DINOV2)}[kind]()
    with pytest.raises(ValueError) as error:
        nodes.AestheticRewardNode.execute(cv, "tiny-head.pth")
    assert named in str(error.value), str(error.value)
    if kind == "dinov2":
        assert "dinov2" in str(error.value).lower()


def test_vit_l_clip_vision_file_through_core_loader_in_the_executor(executor, model_dirs, tmp_path_factory):
    """The real format end to end: a ViT-L/14 CLIP-vision safetensors file (OpenAI key names, seeded fp16 weights)
    in models/clip_vision, loaded by ComfyUI's core CLIPVisionLoader, into the aesthetic reward with a 768-wide
    head, scored by the Score node -- equal to core CLIPVisionEncode's image_embeds through the head by hand."""
    import folder_paths
    root = tmp_path_factory.mktemp("clip_vision_models")
    write_vit_l_clip_vision(root / "test-vit-l-14.safetensors", seed=7)
    head = tiny_head(model_dirs[1] / "vit-l-test-head.pth", 768, seed=8)
    folder_paths.add_model_folder_path("clip_vision", str(root))
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 224, "height": 224, "batch_size": 2, "color": 0x336699}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "test-vit-l-14.safetensors"}},
        "3": {"class_type": "RewardSteerAestheticReward", "inputs": {"clip": ["2", 0], "head": "vit-l-test-head.pth"}},
        "4": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["1", 0], "reward": ["3", 0], "prompt": ""}},
        "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["2", 0], "image": ["1", 0], "crop": "center"}},
    }
    out = executor.run(prompt, want=("5",))
    scores = executor.history["outputs"]["4"]["scores"]
    embeds = out["5"][0][0]["image_embeds"].float()
    assert embeds.shape == (2, 768)
    expected = run_head(head, torch.nn.functional.normalize(embeds, dim=-1))
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-4), (scores, expected)


def test_half_precision_where_safe(model_dirs, monkeypatch):
    import comfy.model_management
    common = harness.pack_submodule("rewards.clip_common")
    assert common.reward_model_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(comfy.model_management, "should_use_fp16", lambda device=None, **kw: True)  # a fp16 GPU
    assert common.reward_model_dtype("auto", torch.device("cpu")) == torch.float16
    monkeypatch.undo()
    nodes = harness.pack_submodule("nodes.clip_rewards")
    full = load(model_dirs)
    half = nodes.LoadOpenClip.execute("ViT-B-32", "tiny-test-clip.safetensors", "bf16")[0]
    assert half is not full and next(half.model.parameters()).dtype == torch.bfloat16
    images = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(6))
    reference, approx = full.image_embeddings(images), half.image_embeddings(images)
    assert approx.dtype == torch.float32 and (reference - approx).abs().max() < 0.05
    reward = nodes.AestheticRewardNode.execute(half, "tiny-head.pth")[0]
    assert reward(images).dtype == torch.float32


@pytest.fixture(scope="module")
def corrupt_dirs(tmp_path_factory, model_dirs):
    """Broken files in registered models/open_clip and models/aesthetic folders: random bytes, and real files cut
    short (as after an interrupted download)."""
    import shutil

    import folder_paths
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("corrupt_models")
    clip_dir, head_dir = root / "open_clip", root / "aesthetic"
    clip_dir.mkdir()
    head_dir.mkdir()
    garbage = b"\xff" * 8 + b"this is not a weights file" * 4
    (clip_dir / "garbage-clip.safetensors").write_bytes(garbage)
    whole = (model_dirs[0] / "tiny-test-clip.safetensors").read_bytes()
    (clip_dir / "cut-clip.safetensors").write_bytes(whole[:len(whole) // 2])
    shutil.copy(model_dirs[0] / "tiny-test-clip.safetensors", clip_dir / "bad-json-clip.safetensors")
    (clip_dir / "bad-json-clip.json").write_text('{"embed_dim": 32, "vision_cfg": {')
    (head_dir / "garbage-head.pth").write_bytes(garbage)
    head = (model_dirs[1] / "tiny-head.pth").read_bytes()
    (head_dir / "cut-head.pth").write_bytes(head[:len(head) // 2])
    (head_dir / "garbage-head.safetensors").write_bytes(garbage)
    save_file({"weight": torch.zeros(2, 2)}, str(head_dir / "not-a-head.safetensors"))
    folder_paths.add_model_folder_path("open_clip", str(clip_dir))
    folder_paths.add_model_folder_path("aesthetic", str(head_dir))
    return clip_dir, head_dir


@pytest.mark.parametrize("filename,expected", [
    ("garbage-clip.safetensors", "is not a valid safetensors file"),
    ("cut-clip.safetensors", "is not a valid safetensors file"),
    ("bad-json-clip.json", "is not a valid open_clip architecture JSON file"),
])
def test_corrupt_open_clip_files_are_named(executor, corrupt_dirs, filename, expected):
    weights = filename.replace(".json", ".safetensors")
    prompt = {"1": {"class_type": "RewardSteerLoadOpenClip",
                    "inputs": {"architecture": "ViT-B-32", "weights": weights, "precision": "fp32"}}}
    with pytest.raises(RuntimeError) as error:
        executor.run(prompt, want=("1",))
    message = str(error.value)
    assert f"{filename} ({corrupt_dirs[0] / filename}) {expected}" in message, message


@pytest.mark.parametrize("filename,expected", [
    ("garbage-head.pth", "is not a valid PyTorch (torch.save) file"),
    ("cut-head.pth", "is not a valid PyTorch (torch.save) file"),
    ("garbage-head.safetensors", "is not a valid safetensors file"),
    ("not-a-head.safetensors", "is not an aesthetic predictor head"),
])
def test_corrupt_aesthetic_heads_are_named(executor, corrupt_dirs, filename, expected):
    prompt = {"1": {"class_type": "RewardSteerLoadOpenClip",
                    "inputs": {"architecture": "ViT-B-32", "weights": "tiny-test-clip.safetensors"}},
              "2": {"class_type": "RewardSteerAestheticReward", "inputs": {"clip": ["1", 0], "head": filename}}}
    with pytest.raises(RuntimeError) as error:
        executor.run(prompt, want=("2",))
    message = str(error.value)
    assert f"{filename} ({corrupt_dirs[1] / filename}) {expected}" in message, message
