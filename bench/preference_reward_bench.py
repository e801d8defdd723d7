#!/usr/bin/env python3
"""CPU cost per image of the preference rewards (issue 14): HPS v2.1, PickScore and ImageReward at their full
published sizes (open_clip ViT-H-14; the CLIP ViT-H/14 of PickScore_v1's config.json; BLIP ViT-L/16 + BERT-base
with cross-attention), in float32 and bfloat16, scoring a batch of 512x512 images as an SD1.5 candidate batch.

No weights can be downloaded here, so the bench writes random weights of the real sizes in the users' file formats
(HPS_v2.1_compressed.pt, the PickScore_v1 folder, ImageReward.pt + med_config.json + bert-base-uncased/vocab.txt)
to a temporary folder and loads them through the pack's own loaders -- the cost of a forward pass does not depend
on the weights' values.  Rows are measured side by side in one run; each is the best of `--repeats` batched passes
after one warm-up pass.  Both wall seconds and process CPU seconds are recorded (CPU seconds are steadier on a
shared machine).

    .host/v0.3.75/venv/bin/python bench/preference_reward_bench.py [--images 4] [--repeats 2]
Writes bench/results/preference_rewards.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demon_bench as common  # noqa: E402  (bootstraps ComfyUI in-process and loads the pack)

import torch  # noqa: E402

hps = common.harness.pack_submodule("rewards.hps")
pickscore = common.harness.pack_submodule("rewards.pickscore")
image_reward = common.harness.pack_submodule("rewards.image_reward")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PickScore_v1's config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): text 1024 wide x 24, vision 1280 wide x 32
PICKSCORE_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                  "num_hidden_layers": 24, "projection_dim": 1024, "hidden_act": "gelu"}
PICKSCORE_VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                    "num_hidden_layers": 32, "image_size": 224, "patch_size": 14, "projection_dim": 1024,
                    "hidden_act": "gelu"}
# ImageReward's med_config.json (BERT-base with cross-attention onto BLIP ViT-L's 1024-wide tokens)
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 1024, "add_cross_attention": True}
BLIP_VIT = {"width": 1024, "depth": 24, "patch": 16, "tokens": (224 // 16) ** 2 + 1, "hidden": 4096}


def small_random(module) -> None:
    """Weights that keep activations finite through 32 layers (norm scales 1, the rest small)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.ones_like(p) if norm_scale else torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)


def write_hps(folder: Path) -> Path:
    import open_clip
    model = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False)
    small_random(model)
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)   # as shipped: fp16
    return path


def write_pickscore(folder: Path) -> Path:
    import comfy.sd1_clip
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(text_config=PICKSCORE_TEXT, vision_config=PICKSCORE_VISION, projection_dim=1024,
                        logit_scale_init_value=4.6052)
    model = CLIPModel(config).eval()
    small_random(model)
    pick = folder / "PickScore_v1"
    model.half().save_pretrained(str(pick), safe_serialization=True)
    for f in Path(comfy.sd1_clip.__file__).with_name("sd1_tokenizer").iterdir():
        shutil.copy(f, pick / f.name)
    (pick / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3, "size": 224}))
    return pick / "model.safetensors"


def write_image_reward(folder: Path) -> Path:
    ir = image_reward
    vit = ir.BlipViT(BLIP_VIT["width"], BLIP_VIT["depth"], BLIP_VIT["patch"], BLIP_VIT["tokens"], BLIP_VIT["hidden"])
    bert = ir.MedBert(MED_CONFIG, BLIP_VIT["width"])
    blip = ir.Blip(vit, bert)
    small_random(blip)
    state = {f"blip.{k}": v.half() for k, v in blip.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    dims = [768, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"mlp.layers.{layer}.weight"] = torch.randn((o, i), generator=gen) / i ** 0.5
        state[f"mlp.layers.{layer}.bias"] = torch.zeros(o)
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (folder / "bert-base-uncased").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cabin", "in", "the", "snow"]
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(words) + "\n")
    path = folder / "ImageReward.pt"
    torch.save(state, path)
    return path


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, its process CPU seconds) over `repeats` runs after one warm-up run."""
    fn()
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        row = (time.perf_counter() - wall, time.process_time() - cpu)
        best = row if best is None or row[0] < best[0] else best
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images per batch (512x512)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.REPO / "bench" / "results" / "preference_rewards.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.images, 512, 512, 3)
    prompts = ["a photo of a cabin in the snow"] * args.images
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"HPS v2.1 (open_clip ViT-H-14)": (write_hps, lambda path, p: hps.HPSReward(hps.load_hps(str(path), p))),
                "PickScore (CLIP ViT-H/14)": (write_pickscore, lambda path, p: pickscore.PickScoreReward(
                    pickscore.PickScoreModel(str(path), p))),
                "ImageReward (BLIP ViT-L + BERT-base)": (write_image_reward, lambda path, p: image_reward.ImageRewardReward(
                    image_reward.ImageRewardModel(str(path), p)))}
        for name, (write, load) in rows.items():
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            with torch.inference_mode(False):
                path = write(folder)
            for precision in ("fp32", "bf16"):
                reward = load(path, precision)
                params = sum(p.numel() for p in _modules(reward).parameters())
                with torch.inference_mode():
                    scores = reward.score(images, prompts)
                    wall, cpu = timed(lambda: reward.score(images, prompts), args.repeats)
                finite = bool(torch.isfinite(scores).all())
                key = f"{name} {precision}"
                results[key] = {"parameters": params, "seconds_per_image": wall / args.images,
                                "cpu_seconds_per_image": cpu / args.images, "scores_finite": finite}
                print(f"{key:48s} {params / 1e6:7.0f} M params  {1000 * wall / args.images:7.0f} ms/image wall  "
                      f"{1000 * cpu / args.images:7.0f} ms/image CPU  finite={finite}", flush=True)
                del reward
            shutil.rmtree(folder)
    args.out.write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "images": args.images,
                                    "image_size": 512, "repeats": args.repeats, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _modules(reward) -> torch.nn.Module:
    for owner, attr in ((reward, "clip"), (reward, "model")):
        inner = getattr(owner, attr, None)
        for name in ("model", "towers", "net"):
            if isinstance(getattr(inner, name, None), torch.nn.Module):
                return getattr(inner, name)
    raise TypeError(f"no module in {type(reward).__name__}")


if __name__ == "__main__":
    sys.exit(main())
