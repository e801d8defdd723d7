#!/usr/bin/env python3
"""Demon benchmark on the exact reference model (CPU), all configurations measured in one run.

1. Mean reward vs model calls per image, for a linear reward (toward red) and a nonlinear one (negative MSE to a
   picture that is not in the mixture): Demon (Tweedie / ODE-rollout estimators, tanh / Boltzmann weights) vs
   best-of-N vs the paper's default configuration (K=16, T=64, beta=0.1, tanh with adaptive tau, ODE rollout of
   up to 20 steps, steering while sigma >= 0.11).
   Targets: some Demon configuration reaches the paper default's mean reward with <= 1/10 of its model calls;
   Demon beats best-of-N at equal calls.
2. Overhead on a mid-size random-weight SD1.5-family UNet: wall time / (model calls x per-item time of plain
   sampling at the same batch size), with and without the time spent decoding and scoring candidates, for the
   VAE decoder (a random TAESD) and the latent-RGB preview decoder.

    .host/v0.3.75/venv/bin/python bench/demon_bench.py [--images 32] [--quick]
Writes bench/results/demon.json and bench/results/demon.png and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import harness  # noqa: E402
import plotting  # noqa: E402  (bench/plotting.py, beside this file)
from comfy_client import host_paths  # noqa: E402

harness.bootstrap_comfy(host_paths()[1])
logging.disable(logging.WARNING)

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

cm = harness.pack_submodule("reference.comfy_model")
pictures = harness.pack_submodule("reference.pictures")
rewards = harness.pack_submodule("rewards")
demon = harness.pack_submodule("samplers.demon")
scoring = harness.pack_submodule("samplers.scoring")
model_calls = harness.pack_submodule("samplers.model_calls")
tiny = harness.pack_submodule("reference.tiny_unet")

LATENT = 8  # 8x8 latent = 64x64 images


def oracle_rewards():
    target = pictures.draw_picture(4, LATENT * 8, LATENT * 8).flip(-1).movedim(0, -1)[None].float()
    return {"linear (toward red)": rewards.LinearColorReward.toward((0.9, 0.2, 0.2)),
            "nonlinear (-MSE to a mirrored picture)": rewards.ImageSimilarityReward(target, "neg_mse")}


def sample(patcher, sampler, sigmas, n, seed):
    latent = torch.zeros(n, 3, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = cm.neutral_conditioning()
    with torch.inference_mode():
        return comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                          disable_pbar=True, seed=seed)


def score(reward, latents):
    return reward(cm.latent_to_image(latents)).double()


def run_demon(patcher, reward, images, seed, steps, scheduler, **options):
    summary = {}
    sampler = comfy.samplers.KSAMPLER(demon.sample_demon, extra_options={
        "score_fn": scoring.make_latent_scorer(cm.ReferenceVAE(), reward),
        "report": lambda s: summary.update(s) if s.get("done") else None, **options})
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)
    out = sample(patcher, sampler, sigmas, images, seed)
    return score(reward, out), summary["model_calls_per_image"]


def run_best_of_n(patcher, reward, images, seed, n, steps=30):
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    out = sample(patcher, comfy.samplers.sampler_object("euler"), sigmas, images * n, seed)
    return score(reward, out).reshape(n, images).max(0).values, float(n * steps)


def point(label, family, scores, calls, seconds):
    return {"config": label, "family": family, "mean_reward": float(scores.mean()),
            "standard_error": float(scores.std() / math.sqrt(len(scores))), "model_calls_per_image": calls,
            "seconds": round(seconds, 2)}


def reward_vs_calls(images: int, quick: bool) -> dict:
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization="eps"))
    results = {}
    for reward_name, reward in oracle_rewards().items():
        rows = []

        def timed(label, family, fn):
            t = time.perf_counter()
            s, calls = fn()
            rows.append(point(label, family, s, calls, time.perf_counter() - t))
            print(f"  {reward_name:40s} {label:42s} reward {rows[-1]['mean_reward']:+.4f} ± "
                  f"{rows[-1]['standard_error']:.4f}  calls/image {calls:8.0f}  ({rows[-1]['seconds']}s)", flush=True)

        timed("paper default (K16 T64 ode<=20 tanh)", "paper", lambda: run_demon(
            patcher, reward, images, 1, 64, "karras", k=16, beta=0.1, weighting="tanh", estimator="ode",
            max_rollout_steps=20, min_sigma=0.11))
        for n in ([1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128]):
            timed(f"best-of-{n} (euler 30)", "best-of-N", lambda n=n: run_best_of_n(patcher, reward, images, 2, n))
        for k in ([2, 8] if quick else [2, 4, 8, 16]):
            timed(f"demon tweedie tanh K{k} T30", "demon tweedie tanh", lambda k=k: run_demon(
                patcher, reward, images, 3, 30, "normal", k=k, beta=0.1))
        for k in ([4] if quick else [4, 16]):
            timed(f"demon tweedie boltzmann K{k} T30", "demon tweedie boltzmann", lambda k=k: run_demon(
                patcher, reward, images, 3, 30, "normal", k=k, beta=0.1, weighting="boltzmann"))
        timed("demon ode tanh K4 T30 (rollout<=20)", "demon ode tanh", lambda: run_demon(
            patcher, reward, images, 3, 30, "normal", k=4, beta=0.1, estimator="ode", max_rollout_steps=20))
        # The paper's window (sigma >= 0.11) assumes SD's sigma_max of 14.6; with this model's zero-terminal-SNR
        # schedule the first ~60% of a Karras grid sits at sigma > 50, where every candidate is noise.  Skipping
        # those steps keeps the ODE estimator where it pays.
        timed("demon ode tanh K16 T64 steps 60-100% (rollout<=10)", "demon ode tanh (late window)",
              lambda: run_demon(patcher, reward, images, 5, 64, "karras", k=16, beta=0.1, min_sigma=0.11,
                                start=0.6, estimator="ode", max_rollout_steps=10))
        for k in ([4] if quick else [4, 8]):
            timed(f"demon tweedie tanh K{k} T15", "demon tweedie tanh (15 steps)", lambda k=k: run_demon(
                patcher, reward, images, 4, 15, "normal", k=k, beta=0.1))
        # the paper's schedule and window with the one-call estimator instead of the ODE rollout
        for k in ([4, 16] if quick else [4, 8, 16, 32]):
            timed(f"demon tweedie tanh K{k} T64 karras", "demon tweedie tanh (paper schedule)",
                  lambda k=k: run_demon(patcher, reward, images, 5, 64, "karras", k=k, beta=0.1, min_sigma=0.11))
        results[reward_name] = rows
    return results


def best_of_n_at(rows, calls):
    """Best-of-N mean reward interpolated (in log calls) at `calls`; None outside the measured range."""
    pts = sorted((r["model_calls_per_image"], r["mean_reward"]) for r in rows if r["family"] == "best-of-N")
    for (c0, r0), (c1, r1) in zip(pts, pts[1:]):
        if c0 <= calls <= c1:
            f = (math.log(calls) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return r0 + f * (r1 - r0)
    return None


def verdicts(results: dict) -> dict:
    out = {}
    for reward_name, rows in results.items():
        paper = next(r for r in rows if r["family"] == "paper")
        # "reaches" = not significantly below: within two combined standard errors of the paper default
        cheap = [r for r in rows if r["family"].startswith("demon")
                 and r["model_calls_per_image"] <= paper["model_calls_per_image"] / 10
                 and r["mean_reward"] >= paper["mean_reward"]
                 - 2 * math.hypot(paper["standard_error"], r["standard_error"])]
        beats = []
        for r in rows:
            if r["family"].startswith("demon"):
                b = best_of_n_at(rows, r["model_calls_per_image"])
                if b is not None:
                    beats.append({"config": r["config"], "demon": r["mean_reward"], "best_of_n_same_calls": b,
                                  "beats": r["mean_reward"] > b})
        out[reward_name] = {
            "paper_default_calls": paper["model_calls_per_image"], "paper_default_reward": paper["mean_reward"],
            "reaches_paper_with_a_tenth_of_calls": [r["config"] for r in cheap],
            "cheapest_ratio": min((paper["model_calls_per_image"] / r["model_calls_per_image"] for r in cheap),
                                  default=None),
            "vs_best_of_n": beats,
        }
    return out


def overhead(quick: bool) -> dict:
    """Mid-size random UNet (SD1.5 code, model_channels 64) at a 4x32x32 latent, batch 2, K=4, 8 steps."""
    config = dict(tiny.TINY_UNET_CONFIG, model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                  transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1], context_dim=64)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    cfg = comfy.supported_models.SD15(config)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    tiny._init_(base.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    vae = tiny.build_tiny_vae(0)
    reward = rewards.LinearColorReward((1.0, 0.0, 0.0))
    cond = [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(0)), {}]]
    batch, k, steps = 2, 4, (4 if quick else 8)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "karras", steps)

    def run(sampler, n, seed=0):
        latent = torch.zeros(n, 4, 32, 32)
        noise = comfy.sample.prepare_noise(latent, seed)
        t = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True,
                                       seed=seed)
        return time.perf_counter() - t

    euler = comfy.samplers.sampler_object("euler")
    run(euler, batch * k)  # warm-up
    per_item = {n: min(run(euler, n) for _ in range(3)) / (steps * n) for n in (batch, batch * k)}
    result = {"unet_parameters": params, "latent": [4, 32, 32], "batch": batch, "k": k, "steps": steps,
              "per_item_call_seconds": {str(n): v for n, v in per_item.items()}}
    for decoder in ("vae", "latent_rgb"):
        score_time = {"s": 0.0}
        inner = scoring.make_latent_scorer(vae, reward, decoder=decoder)

        def timed_score(*args, inner=inner, score_time=score_time):
            t = time.perf_counter()
            out = inner(*args)
            score_time["s"] += time.perf_counter() - t
            return out

        summary = {}
        sampler = comfy.samplers.KSAMPLER(demon.sample_demon, extra_options={
            "score_fn": timed_score, "k": k, "report": lambda s: summary.update(s) if s.get("done") else None})
        run(sampler, batch)  # warm-up
        walls = []
        for _ in range(3):   # min of three, like the plain timings: a 2-core machine is noisy
            score_time["s"] = 0.0
            walls.append((run(sampler, batch), score_time["s"]))
        wall, score_seconds = min(walls)
        base_items = steps * batch
        cand_items = summary["model_calls_per_image"] * batch - base_items
        expected = base_items * per_item[batch] + cand_items * per_item[batch * k]
        result[decoder] = {"demon_wall_seconds": wall, "decode_and_score_seconds": score_seconds,
                           "model_calls_per_image": summary["model_calls_per_image"],
                           "overhead_ratio_total": wall / expected,
                           "overhead_ratio_excluding_decode_and_score": (wall - score_seconds) / expected}
    return result




def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32, help="images per configuration")
    parser.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    args = parser.parse_args()
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("reward vs model calls (reference model, eps, 8x8 latent):")
    results = reward_vs_calls(args.images, args.quick)
    summary = verdicts(results)
    print("\noverhead (mid-size random UNet, CPU):")
    over = overhead(args.quick)
    for decoder in ("vae", "latent_rgb"):
        o = over[decoder]
        print(f"  decoder {decoder:10s}: total {o['overhead_ratio_total']:.3f}, excluding decode+score "
              f"{o['overhead_ratio_excluding_decode_and_score']:.3f}")
    report = {"device": "cpu", "threads": torch.get_num_threads(), "images_per_config": args.images,
              "reward_vs_calls": results, "verdicts": summary, "overhead": over}
    (out_dir / "demon.json").write_text(json.dumps(report, indent=2) + "\n")
    plotting.demon_plot(report, out_dir / "demon.png")
    print("\nverdicts:")
    for reward_name, v in summary.items():
        wins = sum(b["beats"] for b in v["vs_best_of_n"])
        print(f"  {reward_name}: paper default {v['paper_default_reward']:+.4f} at {v['paper_default_calls']:.0f} "
              f"calls; reached with <= 1/10 of the calls by {v['reaches_paper_with_a_tenth_of_calls'] or 'none'} "
              f"(best ratio {v['cheapest_ratio'] and round(v['cheapest_ratio'], 1)}x); "
              f"beats best-of-N at equal calls in {wins}/{len(v['vs_best_of_n'])} configs")
    print(f"\nwrote {out_dir / 'demon.json'} and {out_dir / 'demon.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
