#!/usr/bin/env python3
"""SMC / FK steering benchmark on the exact reference model (CPU), measured in one run.

1. Mean reward vs model calls per image, linear (toward red) and nonlinear (-MSE to a mirrored picture) rewards:
   FK/SMC (best particle) vs best-of-N vs Demon.  Target: at equal calls FK >= best-of-N.
2. Error of the sampled law vs particles (linear reward, lambda = 20, 300 populations): total variation between
   the component frequencies of FK's weighted draws and the exact tilted law; reference point: best-of-N
   followed by importance resampling (N plain samples, one drawn with weight exp(lambda r)) at the same calls.
   The TV of 300 exact draws (the noise floor) is printed beside them.

    .host/v0.3.75/venv/bin/python bench/smc_bench.py [--quick]
Writes bench/results/smc.json and bench/results/smc.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demon_bench as common  # noqa: E402  (bootstraps ComfyUI in-process and loads the pack)
import plotting  # noqa: E402  (bench/plotting.py, beside this file)

import torch  # noqa: E402

import comfy.samplers  # noqa: E402

cm, rewards, scoring = common.cm, common.rewards, common.scoring
smc = common.harness.pack_submodule("samplers.smc")
target = common.harness.pack_submodule("reference.target")
REPO = common.REPO
LAMBDAS = {"linear (toward red)": 50.0, "nonlinear (-MSE to a mirrored picture)": 200.0}


def run_smc(patcher, reward, images, seed, particles, lam, steps=30, output="best", interval=3):
    summary = {}
    sampler = comfy.samplers.KSAMPLER(smc.sample_smc, extra_options={
        "score_fn": scoring.make_latent_scorer(cm.ReferenceVAE(), reward), "particles": particles, "lam": lam,
        "interval": interval, "output": output, "resampling": "systematic",
        "report": lambda s: summary.update(s) if s.get("done") else None})
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    out = common.sample(patcher, sampler, sigmas, images, seed)
    return out, summary["model_calls_per_image"]


def reward_vs_calls(images: int, quick: bool) -> dict:
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization="eps"))
    results = {}
    for reward_name, reward in common.oracle_rewards().items():
        rows = []

        def add(label, family, fn):
            t = time.perf_counter()
            scores, calls = fn()
            rows.append(common.point(label, family, scores, calls, time.perf_counter() - t))
            print(f"  {reward_name:40s} {label:34s} reward {rows[-1]['mean_reward']:+.4f} ± "
                  f"{rows[-1]['standard_error']:.4f}  calls/image {calls:6.0f}", flush=True)

        for n in ([1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]):
            add(f"best-of-{n}", "best-of-N", lambda n=n: common.run_best_of_n(patcher, reward, images, 2, n))
        for n in ([2, 8] if quick else [2, 4, 8, 16, 32]):
            def fk(n=n):
                out, calls = run_smc(patcher, reward, images, 6, n, LAMBDAS[reward_name])
                return common.score(reward, out), calls
            add(f"FK best of {n} particles", "FK / SMC", fk)
        for k in ([2, 8] if quick else [2, 4, 8, 16]):
            add(f"demon tweedie tanh K{k}", "demon", lambda k=k: common.run_demon(
                patcher, reward, images, 3, 30, "normal", k=k, beta=0.1))
        results[reward_name] = rows
    return results


def tv(freq: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((freq - p).abs().sum())


def law_error(populations: int, quick: bool) -> dict:
    lam = 20.0
    spec = cm.ReferenceSpec(parametrization="eps")
    patcher = cm.build_reference_model(spec)
    reward = rewards.LinearColorReward.toward((0.9, 0.2, 0.2))
    mix = spec.mixture(8, 8)
    w, c = target.latent_linear_form(reward, cm.latent_to_image, (3, 8, 8))
    p = mix.tilted(w, lam).weights.double()
    gen = torch.Generator().manual_seed(0)
    floor = sum(tv(torch.bincount(torch.multinomial(p, populations, replacement=True, generator=gen),
                                  minlength=8).double() / populations, p) for _ in range(200)) / 200
    rows = []
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 30)
    for n in ([2, 8, 32] if quick else [1, 2, 4, 8, 16, 32, 64]):
        out, calls = run_smc(patcher, reward, populations, 7, n, lam, output="weighted_draw")
        fk = tv(torch.bincount(mix.classify(out), minlength=8).double() / populations, p)
        plain = common.sample(patcher, comfy.samplers.sampler_object("euler"), sigmas, populations * n, 8)
        logw = (lam * common.score(reward, plain)).reshape(n, populations).T
        pick = torch.multinomial(torch.softmax(logw, dim=1), 1, generator=gen).flatten()
        chosen = plain[pick * populations + torch.arange(populations)]
        is_tv = tv(torch.bincount(mix.classify(chosen), minlength=8).double() / populations, p)
        rows.append({"particles": n, "model_calls_per_image": calls, "fk_tv": fk, "importance_resampling_tv": is_tv})
        print(f"  N={n:3d}  calls/image {calls:5.0f}  TV(FK weighted draw) {fk:.3f}   "
              f"TV(best-of-N + importance resampling) {is_tv:.3f}   (noise floor {floor:.3f})", flush=True)
    return {"lambda": lam, "populations": populations, "noise_floor_tv": floor, "rows": rows,
            "exact_tilted_probabilities": p.tolist()}


def verdict(results: dict) -> dict:
    out = {}
    for reward_name, rows in results.items():
        checks = []
        for r in rows:
            if r["family"] == "FK / SMC":
                b = common.best_of_n_at(rows, r["model_calls_per_image"])
                if b is not None:
                    checks.append({"config": r["config"], "fk": r["mean_reward"], "best_of_n_same_calls": b,
                                   "fk_at_least_best_of_n": r["mean_reward"] >= b})
        out[reward_name] = checks
    return out




def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--populations", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    print("mean reward vs model calls (reference model, eps, 8x8 latent):")
    results = reward_vs_calls(args.images, args.quick)
    print("\nerror of the sampled law vs particles:")
    law = law_error(args.populations, args.quick)
    checks = verdict(results)
    report = {"reward_vs_calls": results, "lambdas": LAMBDAS, "law_error": law, "fk_vs_best_of_n": checks}
    (out_dir / "smc.json").write_text(json.dumps(report, indent=2) + "\n")
    plotting.smc_plot(report, out_dir / "smc.png")
    print("\nverdicts:")
    for reward_name, rows in checks.items():
        print(f"  {reward_name}: FK >= best-of-N at equal calls in {sum(r['fk_at_least_best_of_n'] for r in rows)}"
              f"/{len(rows)} configurations")
    print(f"\nwrote {out_dir / 'smc.json'} and {out_dir / 'smc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
