#!/usr/bin/env python3
"""Reward scoring speed: 16 candidate images scored in one batch vs one at a time (the issue's target: batched
>= 3x faster on CPU), on real architectures with random weights -- LAION aesthetic on an open_clip ViT-L-14 and on
ComfyUI's own CLIP vision ViT-L/14, CLIP score on ViT-B-32 -- each in float32 and bfloat16.  512x512 inputs, as a
candidate of SD1.5 would be.  Rows are measured side by side in one run.

    .host/v0.3.75/venv/bin/python bench/reward_bench.py
Writes bench/results/rewards.json and bench/results/rewards.png.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demon_bench as common  # noqa: E402  (bootstraps ComfyUI in-process and loads the pack)
import plotting  # noqa: E402  (bench/plotting.py, beside this file)

import torch  # noqa: E402

clip_common = common.harness.pack_submodule("rewards.clip_common")
aesthetic = common.harness.pack_submodule("rewards.aesthetic")
clip_score = common.harness.pack_submodule("rewards.clip_score")


def random_clip(arch: str, precision: str = "fp32"):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    return clip_common.OpenClipModel(model, open_clip.get_tokenizer(arch), arch, "random weights", precision)


def random_comfy_clip_vision():
    """ComfyUI's ClipVisionModel with the ViT-L/14 config (what core 'Load CLIP Vision' builds), seeded weights."""
    import comfy.clip_vision
    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_vitl.json")
    cv = comfy.clip_vision.ClipVisionModel(str(config))
    gen = torch.Generator().manual_seed(0)
    cv.load_sd({k: (torch.ones(v.shape) if "norm" in k and k.endswith("weight") else
                    torch.randn(v.shape, generator=gen) * 0.02).to(v.dtype) for k, v in cv.model.state_dict().items()})
    return clip_common.ComfyClipVision(cv, "random weights")




def timed(fn, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    images = torch.rand(16, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    head_state = {}
    dims = [768, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        head_state[f"layers.{layer}.weight"] = torch.randn(o, i) * 0.02
        head_state[f"layers.{layer}.bias"] = torch.zeros(o)
    head = aesthetic.AestheticHead(head_state)
    rewards = {  # built one at a time, so only one ViT-L is in memory at once
        "aesthetic, open_clip ViT-L-14 fp32": lambda: aesthetic.AestheticReward(random_clip("ViT-L-14"), head),
        "aesthetic, open_clip ViT-L-14 bf16": lambda: aesthetic.AestheticReward(random_clip("ViT-L-14", "bf16"), head),
        "aesthetic, ComfyUI CLIP vision ViT-L/14": lambda: aesthetic.AestheticReward(random_comfy_clip_vision(), head),
        "CLIP score, ViT-B-32 fp32": lambda: clip_score.ClipScoreReward(random_clip("ViT-B-32"), "a photo of a cat"),
        "CLIP score, ViT-B-32 bf16": lambda: clip_score.ClipScoreReward(random_clip("ViT-B-32", "bf16"),
                                                                        "a photo of a cat"),
    }
    results = {}
    for name, build in rewards.items():
        reward = build()   # outside inference mode, as the loader nodes build them
        with torch.inference_mode():
            heavy = "ViT-L" in name
            batched = timed(lambda: reward(images), repeats=1 if heavy else 3)
            single = timed(lambda: [reward(images[i:i + 1]) for i in range(16)], repeats=1)
            del reward
            results[name] = {"batched_seconds": batched, "one_at_a_time_seconds": single,
                             "speedup": single / batched, "per_image_batched_ms": 1000 * batched / 16}
            print(f"{name:40s} batched {batched:6.2f}s  one at a time {single:6.2f}s  speed-up {single / batched:4.1f}x"
                  f"  ({1000 * batched / 16:.0f} ms/image batched, {torch.get_num_threads()} threads)", flush=True)
    best = max(r["speedup"] for r in results.values())
    print(f"target batched >= 3x one at a time: {'met' if best >= 3 else 'NOT met'} on this CPU (best {best:.1f}x); "
          f"bf16 vs fp32, aesthetic batched: {results['aesthetic, open_clip ViT-L-14 fp32']['batched_seconds'] / results['aesthetic, open_clip ViT-L-14 bf16']['batched_seconds']:.1f}x")
    out = common.REPO / "bench" / "results" / "rewards.json"
    report = {"device": "cpu", "threads": torch.get_num_threads(), "images": 16, "image_size": 512, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    plotting.rewards_plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
