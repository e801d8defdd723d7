#!/usr/bin/env python3
"""Reward scoring speed: 16 candidate images scored in one batch vs one at a time (target: batched >= 3x faster
on CPU), on real architectures with random weights: LAION aesthetic (open_clip ViT-L-14 + the official head
shape) and CLIP score (ViT-B-32).  512x512 inputs, as a candidate of SD1.5 would be.

    .host/venv/bin/python bench/reward_bench.py
Writes bench/results/rewards.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demon_bench as common  # noqa: E402  (bootstraps ComfyUI in-process and loads the pack)

import torch  # noqa: E402

clip_common = common.harness.pack_submodule("rewards.clip_common")
aesthetic = common.harness.pack_submodule("rewards.aesthetic")
clip_score = common.harness.pack_submodule("rewards.clip_score")


def random_clip(arch: str):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    return clip_common.OpenClipModel(model, open_clip.get_tokenizer(arch), arch, "random weights")


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
    vit_l = random_clip("ViT-L-14")
    head_state = {}
    dims = [768, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        head_state[f"layers.{layer}.weight"] = torch.randn(o, i) * 0.02
        head_state[f"layers.{layer}.bias"] = torch.zeros(o)
    rewards = {"LAION aesthetic (ViT-L-14)": aesthetic.AestheticReward(vit_l, aesthetic.AestheticHead(head_state)),
               "CLIP score (ViT-B-32)": clip_score.ClipScoreReward(random_clip("ViT-B-32"), "a photo of a cat")}
    results = {}
    with torch.inference_mode():
        for name, reward in rewards.items():
            batched = timed(lambda: reward(images))
            single = timed(lambda: [reward(images[i:i + 1]) for i in range(16)], repeats=1)
            results[name] = {"batched_seconds": batched, "one_at_a_time_seconds": single,
                             "speedup": single / batched, "per_image_batched_ms": 1000 * batched / 16}
            print(f"{name:28s} batched {batched:6.2f}s  one at a time {single:6.2f}s  speed-up {single / batched:4.1f}x"
                  f"  ({1000 * batched / 16:.0f} ms/image batched, {torch.get_num_threads()} threads)", flush=True)
    out = common.REPO / "bench" / "results" / "rewards.json"
    out.write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "images": 16,
                               "image_size": 512, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
