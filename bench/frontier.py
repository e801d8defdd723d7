#!/usr/bin/env python3
"""One frontier for every method (issue 15): mean final reward (± SE) against model calls per image on the exact
reference model (eps, 8x8 latent, neutral conditioning), for plain sampling, best-of-N, pruned best-of-N (the
calls pruning saves spent on new seeds), Demon (Tweedie and ODE estimators, and the paper default), FK / SMC, DTS
and DTS*, on the linear reward and the nonlinear one, in one run; then the error of DTS's law (total variation over
mixture components against the exact tilted law) against calls, beside FK's.

    .host/v0.3.75/venv/bin/python bench/frontier.py [--images 64] [--populations 300] [--tiny]
Writes bench/results/frontier.json and frontier.png (--tiny: a seconds-long smoke run to --out, for tests).

Settings: 30 steps for every method but the paper default (64 Karras steps); best-of-N and the pruned search use
euler (the deterministic sampler, as the other benches); DTS / DTS* use the ancestral step (eta 1), widening
1 * visits^0.5, one rollout per item per model call; SMC and DTS share lambda per reward (smc_bench's).  Each row
is `--images` items, each from its own seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demon_bench as common  # noqa: E402  (bootstraps ComfyUI in-process and loads the pack)
import smc_bench  # noqa: E402
import plotting  # noqa: E402  (bench/plotting.py, beside this file)

import torch  # noqa: E402

import comfy.samplers  # noqa: E402

cm, scoring = common.cm, common.scoring
tree = common.harness.pack_submodule("samplers.tree")
pruning = common.harness.pack_submodule("samplers.pruning")
target = common.harness.pack_submodule("reference.target")
REPO = common.REPO
STEPS = 30
PAPER_CALL_FRACTION = 30       # the target: reach the paper default's reward with 1/30 of its calls
DTS_STAR_CALL_FRACTION = 5     # the target: DTS* reaches best-of-N's reward with 1/5 of its calls


def sigmas_for(patcher, steps=STEPS, scheduler="normal"):
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)


def scorer(reward):
    return scoring.make_latent_scorer(cm.ReferenceVAE(), reward)


def run_tree(patcher, reward, images, seed, mode, rollouts, lam, output_scores=True):
    summary = {}
    sampler = comfy.samplers.KSAMPLER(tree.sample_tree, extra_options={
        "score_fn": scorer(reward), "mode": mode, "lam": lam, "rollouts": rollouts,
        "report": lambda s: summary.update(s) if s.get("done") else None})
    out = common.sample(patcher, sampler, sigmas_for(patcher), images, seed)
    return (common.score(reward, out) if output_scores else out), summary["model_calls_per_image"]


def run_pruned(patcher, reward, images, seed, budget, prune_at=(10, 20), keep_fraction=0.5):
    """Pruned best-of-N with as many starting seeds as fit `budget` calls per image (spend_saved_calls)."""
    bounds = pruning.segment_bounds(list(prune_at), STEPS)
    plan = pruning.plan_seeds([b - a for a, b in zip(bounds[:-1], bounds[1:])], keep_fraction, budget)
    report = {}
    sampler = comfy.samplers.KSAMPLER(pruning.sample_pruned, extra_options={
        "inner_function": comfy.samplers.sampler_object("euler").sampler_function, "inner_options": {},
        "score_fn": scorer(reward), "batch": images, "prune_at": list(prune_at), "keep_fraction": keep_fraction,
        "report": report.update})
    out = common.sample(patcher, sampler, sigmas_for(patcher), images * plan.seeds, seed)
    best = common.score(reward, out).reshape(-1, images).max(0).values
    return best, report["model_calls_per_image"], plan.seeds


def reward_vs_calls(images: int, tiny: bool) -> dict:
    patcher = cm.build_reference_model(cm.ReferenceSpec(parametrization="eps"))
    results = {}
    ns = [1, 4] if tiny else [1, 2, 4, 8, 16, 32, 64]
    for reward_name, reward in common.oracle_rewards().items():
        rows, lam = [], smc_bench.LAMBDAS[reward_name]

        def add(label, family, fn):
            t = time.perf_counter()
            scores, calls, *extra = fn()
            rows.append(common.point(label, family, scores, calls, time.perf_counter() - t))
            if extra:
                rows[-1]["starting_seeds"] = extra[0]
            print(f"  {reward_name[:24]:24s} {label:40s} reward {rows[-1]['mean_reward']:+.4f} ± "
                  f"{rows[-1]['standard_error']:.4f}  calls/image {calls:8.0f}  ({rows[-1]['seconds']}s)", flush=True)

        if not tiny:
            add("Demon paper default (K16 T64 ode<=20)", "Demon paper default", lambda: common.run_demon(
                patcher, reward, images, 1, 64, "karras", k=16, beta=0.1, weighting="tanh", estimator="ode",
                max_rollout_steps=20, min_sigma=0.11))
        for n in ns:
            add("plain sampling" if n == 1 else f"best-of-{n}", "best-of-N",
                lambda n=n: common.run_best_of_n(patcher, reward, images, 2, n))
        for n in ns[1:]:
            add(f"pruned best-of-N, budget of best-of-{n}", "pruned best-of-N",
                lambda n=n: run_pruned(patcher, reward, images, 9, n * STEPS))
        for k in ([2] if tiny else [2, 4, 8, 16]):
            add(f"Demon tweedie K{k}", "Demon tweedie", lambda k=k: common.run_demon(
                patcher, reward, images, 3, STEPS, "normal", k=k, beta=0.1))
        for k in ([] if tiny else [2, 4]):
            add(f"Demon ode K{k} (rollout<=20)", "Demon ode", lambda k=k: common.run_demon(
                patcher, reward, images, 3, STEPS, "normal", k=k, beta=0.1, estimator="ode", max_rollout_steps=20))
        for n in ([2] if tiny else [2, 4, 8, 16, 32]):
            def fk(n=n):
                out, calls = smc_bench.run_smc(patcher, reward, images, 6, n, lam)
                return common.score(reward, out), calls
            add(f"FK / SMC, {n} particles (best)", "FK / SMC", fk)
        for mode, family in (("dts", "DTS"), ("dts_star", "DTS*")):
            for r in ([1, 4] if tiny else [1, 2, 4, 8, 16, 32, 64]):
                add(f"{family}, {r} rollouts", family,
                    lambda r=r, mode=mode: run_tree(patcher, reward, images, 11, mode, r, lam))
        results[reward_name] = rows
    return results


def curve(rows, family):
    return sorted((r["model_calls_per_image"], r["mean_reward"], r["standard_error"]) for r in rows
                  if r["family"] == family)


def calls_to_reach(points, reward):
    """The fewest calls at which a method's curve reaches `reward` (log-linear between measured points)."""
    for (c0, r0, _), (c1, r1, _) in zip([(points[0][0], -math.inf, 0)] + points, points):
        if r1 >= reward:
            if r0 == -math.inf or r1 == r0:
                return c1
            f = (reward - r0) / (r1 - r0)
            return math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0)))
    return None


def verdicts(results: dict) -> dict:
    out = {}
    for reward_name, rows in results.items():
        bon, star = curve(rows, "best-of-N"), curve(rows, "DTS*")
        ratios = []
        for calls, reward, _ in bon[1:]:
            need = calls_to_reach(star, reward)
            ratios.append({"best_of_n_calls": calls, "best_of_n_reward": reward, "dts_star_calls": need,
                           "ratio": None if need is None else calls / need})
        reached = [r for r in ratios if r["ratio"] is not None]
        top = reached[-1] if reached else None
        pruned = []
        for calls, reward, se in curve(rows, "pruned best-of-N"):
            plain = next((r for r in rows if r["family"] == "best-of-N"
                          and r["model_calls_per_image"] >= calls - 1e-9 and r["model_calls_per_image"] <= calls
                          + STEPS), None)
            if plain is not None:
                pruned.append({"calls": calls, "pruned": reward, "best_of_n": plain["mean_reward"],
                               "difference": reward - plain["mean_reward"],
                               "se_of_difference": math.hypot(se, plain["standard_error"]),
                               "pruned_at_least_best_of_n": reward >= plain["mean_reward"]})
        paper = next((r for r in rows if r["family"] == "Demon paper default"), None)
        cheap = []
        if paper is not None:
            limit = paper["model_calls_per_image"] / PAPER_CALL_FRACTION
            cheap = [{"config": r["config"], "calls": r["model_calls_per_image"], "reward": r["mean_reward"],
                      "ratio": paper["model_calls_per_image"] / r["model_calls_per_image"]}
                     for r in rows if r is not paper and r["model_calls_per_image"] <= limit
                     and r["mean_reward"] >= paper["mean_reward"]]
        # when nothing reaches it: the best reward within the call limit, and the share of the paper default's
        # gain over plain sampling that it gets
        plain = next(r for r in rows if r["config"] == "plain sampling")["mean_reward"]
        within = [r for r in rows if paper is not None and r is not paper
                  and r["model_calls_per_image"] <= paper["model_calls_per_image"] / PAPER_CALL_FRACTION]
        closest = max(within, key=lambda r: r["mean_reward"], default=None)
        out[reward_name] = {
            "dts_star_vs_best_of_n": ratios,
            "dts_star_best_ratio": max((r["ratio"] for r in reached), default=None),
            "dts_star_ratio_at_the_highest_best_of_n_it_reaches": None if top is None else top["ratio"],
            "target_dts_star_one_fifth_met": bool(top and top["ratio"] >= DTS_STAR_CALL_FRACTION),
            "pruned_vs_best_of_n": pruned,
            "target_pruned_at_least_best_of_n_met": bool(pruned) and all(p["pruned_at_least_best_of_n"]
                                                                            for p in pruned),
            "paper_default": None if paper is None else {"calls": paper["model_calls_per_image"],
                                                         "reward": paper["mean_reward"]},
            "reach_paper_default_with_a_thirtieth": cheap,
            "best_within_a_thirtieth_of_paper_calls": None if closest is None else {
                "config": closest["config"], "calls": closest["model_calls_per_image"],
                "reward": closest["mean_reward"],
                "call_ratio": paper["model_calls_per_image"] / closest["model_calls_per_image"],
                "share_of_paper_gain_over_plain": (closest["mean_reward"] - plain) / (paper["mean_reward"] - plain)},
            "target_paper_default_one_thirtieth_met": bool(cheap),
        }
    return out


def law_error(populations: int, tiny: bool) -> dict:
    """TV over the 8 components between DTS's weighted draws and the exact tilted law (linear reward, lambda 20),
    against calls, beside FK's weighted draws (as smc_bench)."""
    lam = 20.0
    spec = cm.ReferenceSpec(parametrization="eps")
    patcher = cm.build_reference_model(spec)
    reward = common.rewards.LinearColorReward.toward((0.9, 0.2, 0.2))
    mix = spec.mixture(8, 8)
    w, c = target.latent_linear_form(reward, cm.latent_to_image, (3, 8, 8))
    p = mix.tilted(w, lam).weights.double()
    gen = torch.Generator().manual_seed(0)
    floor = sum(smc_bench.tv(torch.bincount(torch.multinomial(p, populations, replacement=True, generator=gen),
                                            minlength=8).double() / populations, p) for _ in range(200)) / 200
    rows = []
    for r in ([1, 4] if tiny else [1, 2, 4, 8, 16, 32, 64]):
        out, calls = run_tree(patcher, reward, populations, 13, "dts", r, lam, output_scores=False)
        rows.append({"method": "DTS", "rollouts": r, "model_calls_per_image": calls,
                     "tv": smc_bench.tv(torch.bincount(mix.classify(out), minlength=8).double() / populations, p)})
        print(f"  DTS   {r:3d} rollouts  calls/image {calls:6.0f}  TV {rows[-1]['tv']:.3f}", flush=True)
    for n in ([2, 4] if tiny else [2, 4, 8, 16, 32, 64]):
        out, calls = smc_bench.run_smc(patcher, reward, populations, 7, n, lam, output="weighted_draw")
        rows.append({"method": "FK / SMC", "particles": n, "model_calls_per_image": calls,
                     "tv": smc_bench.tv(torch.bincount(mix.classify(out), minlength=8).double() / populations, p)})
        print(f"  FK    {n:3d} particles calls/image {calls:6.0f}  TV {rows[-1]['tv']:.3f}", flush=True)
    print(f"  noise floor (TV of {populations} exact draws): {floor:.3f}")
    return {"lambda": lam, "populations": populations, "noise_floor_tv": floor, "rows": rows,
            "exact_tilted_probabilities": p.tolist()}


def fmt(x):
    return "none" if x is None else f"{x:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--populations", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="a smoke run of seconds (tests)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "frontier.json")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.populations = 4, 8
    start = time.perf_counter()
    print("mean reward vs model calls per image (reference model, eps, 8x8 latent):")
    results = reward_vs_calls(args.images, args.tiny)
    print("\nerror of the sampled law vs model calls:")
    law = law_error(args.populations, args.tiny)
    checks = verdicts(results)
    report = {"settings": {"images_per_row": args.images, "steps": STEPS, "lambdas": smc_bench.LAMBDAS,
                           "tiny": args.tiny}, "reward_vs_calls": results, "law_error": law, "targets": checks,
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plotting.frontier_plot(report, args.out.with_suffix(".png"))
    print("\ntargets:")
    for reward_name, v in checks.items():
        print(f"  {reward_name}:\n    DTS* reaches best-of-N with <= 1/{DTS_STAR_CALL_FRACTION} of its calls: "
              f"{'met' if v['target_dts_star_one_fifth_met'] else 'NOT met'} (ratio at the highest best-of-N it "
              f"reaches: {fmt(v['dts_star_ratio_at_the_highest_best_of_n_it_reaches'])}, best over budgets: "
              f"{fmt(v['dts_star_best_ratio'])})")
        print(f"    pruned best-of-N >= best-of-N at equal calls: "
              f"{'met' if v['target_pruned_at_least_best_of_n_met'] else 'NOT met'} "
              + ", ".join(f"{p['difference']:+.4f}±{p['se_of_difference']:.4f}" for p in v["pruned_vs_best_of_n"]))
        print(f"    a method reaches the paper default with <= 1/{PAPER_CALL_FRACTION} of its calls: "
              f"{'met' if v['target_paper_default_one_thirtieth_met'] else 'NOT met'} "
              + ", ".join(f"{c['config']} ({c['ratio']:.0f}x)" for c in v["reach_paper_default_with_a_thirtieth"]))
        if v["best_within_a_thirtieth_of_paper_calls"]:
            b = v["best_within_a_thirtieth_of_paper_calls"]
            print(f"      best within the limit: {b['config']} ({b['call_ratio']:.0f}x fewer calls), reward "
                  f"{b['reward']:+.4f} vs {v['paper_default']['reward']:+.4f}, "
                  f"{100 * b['share_of_paper_gain_over_plain']:.0f}% of the paper default's gain over plain sampling")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
