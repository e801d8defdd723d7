#!/usr/bin/env python3
"""The main job on the embedded default: install the newest ComfyUI host that can be installed if it is missing,
start ComfyUI headless on 127.0.0.1, queue the demo workflow (workflows/Start here, ....json) (plain sampling vs the Demon sampler vs
SMC / FK steering), save the images and a summary (mean rewards next to the exact answers), print where they are,
and stop the server.

The demo checks itself: every figure with an exact answer (plain sampling against E[r] under the model, FK
against E[r] under p·exp(λr)) must lie within 4 standard errors of it, or the demo says which one is off and
exits with status 2.

    python3 scripts/run_demo.py [--output DIR] [--host 0.3.75|0.28.2|newest]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import DEMO_WORKFLOW, REPO, ComfyServer, ui_to_api, validate_ui_workflow  # noqa: E402

WORKFLOW = DEMO_WORKFLOW


def node_id_of(api: dict, class_type: str, title: str | None = None) -> str:
    for node_id, node in api.items():
        if node["class_type"] == class_type and (title is None or node["_meta"]["title"] == title):
            return node_id
    raise KeyError(f"the demo workflow has no {class_type} node" + (f" titled {title!r}" if title else ""))


def score_summary(scores: list[float]) -> dict:
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, n - 1))
    return {"samples": n, "mean_reward": mean, "standard_error": std / math.sqrt(n)}


def summarise(history: dict, api: dict, output_dir: Path) -> dict:
    outputs = history["outputs"]
    images = [output_dir / img.get("subfolder", "") / img["filename"]
              for node in outputs.values() for img in node.get("images", [])]
    plain = score_summary(outputs[node_id_of(api, "RewardSteerScoreImages", "Score plain samples")]["scores"])
    plain["settings"] = {k: api[node_id_of(api, "KSampler")]["inputs"][k] for k in ("sampler_name", "scheduler", "steps")}
    demon = score_summary(outputs[node_id_of(api, "RewardSteerScoreImages", "Score Demon samples")]["scores"])
    demon_node = node_id_of(api, "RewardSteerKSamplerDemon")
    demon["compute"] = outputs[demon_node]["demon"][0]
    demon["settings"] = {k: api[demon_node]["inputs"][k] for k in ("k", "beta", "weighting", "estimator", "steps")}
    fk = score_summary(outputs[node_id_of(api, "RewardSteerScoreImages", "Score FK samples")]["scores"])
    fk_node = node_id_of(api, "RewardSteerKSamplerSMC")
    fk["compute"] = {k: v for k, v in outputs[fk_node]["smc"][0].items() if k.endswith("per_image")}
    fk["settings"] = {k: api[fk_node]["inputs"][k] for k in ("particles", "lam", "potential", "output", "steps")}
    target = outputs[node_id_of(api, "RewardSteerReferenceExactTarget")]["target"][0]
    return {
        "workflow": str(WORKFLOW.relative_to(REPO)),
        "reward": target["reward"],
        "plain": plain,
        "demon": demon,
        "fk": fk,
        "exact": {"expected_reward_plain": target["expected_reward_base"],
                  "best_component_reward": max(target["component_rewards"]),
                  "lambda": target["lambda"], "expected_reward_tilted": target["expected_reward_tilted"],
                  "reward_std_plain": target.get("reward_std_base"), "reward_std_tilted": target.get("reward_std_tilted"),
                  "tilted_component_probabilities": dict(zip(target["components"],
                                                             target["tilted_probabilities"]))},
        "images": [str(p) for p in images],
    }


Z_LIMIT = 4.0


def z_score(mean: float, standard_error: float, exact: float) -> float:
    """Standard errors between a Monte-Carlo mean and its exact value (inf when a zero spread misses it)."""
    if standard_error > 0:
        return (mean - exact) / standard_error
    return 0.0 if abs(mean - exact) < 1e-9 else math.copysign(math.inf, mean - exact)


def check_against_exact(summary: dict) -> list[str]:
    """The figures that are more than Z_LIMIT standard errors from their exact answer, as messages (empty = all
    agree).  The standard error is the exact law's reward std / sqrt(n) where the Exact Target gives it: with 16
    samples clustered by picture, the sample std makes z far from normal (|z| > 4 in ~1-3 % of correct runs).
    Also fills in each checked figure's `exact`, `z_score` and `z_standard_error`."""
    e = summary["exact"]
    checks = [("plain sampling", summary["plain"], e["expected_reward_plain"], e.get("reward_std_plain"),
               "E[r] under the model"),
              ("FK / SMC steering", summary["fk"], e["expected_reward_tilted"], e.get("reward_std_tilted"),
               f"E[r] under p·exp({e['lambda']:g}·r)")]
    problems = []
    for name, figure, exact, exact_std, what in checks:
        se = exact_std / math.sqrt(figure["samples"]) if exact_std else figure["standard_error"]
        z = z_score(figure["mean_reward"], se, exact)
        figure["exact"], figure["z_score"], figure["z_standard_error"] = exact, z, se
        if not abs(z) <= Z_LIMIT:
            problems.append(f"{name}: mean reward {figure['mean_reward']:.4f} ± {se:.4f} is "
                            f"{z:+.1f} standard errors from the exact {what} = {exact:.4f} (allowed: {Z_LIMIT:g})")
    return problems


def write_report(summary: dict, output_dir: Path) -> Path:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    p, d, f, e = summary["plain"], summary["demon"], summary["fk"], summary["exact"]
    lines = [
        "# Reward steering demo (reference model, exact answers)",
        "",
        f"Reward: {summary['reward']}",
        "",
        "| run | samples | mean reward | exact | z | model calls / image |",
        "|---|---|---|---|---|---|",
        f"| plain sampling (KSampler {p['settings']['sampler_name']}, {p['settings']['scheduler']}, "
        f"{p['settings']['steps']} steps) | {p['samples']} | {p['mean_reward']:.4f} ± {p['standard_error']:.4f} | "
        f"{p['exact']:.4f} | {p['z_score']:+.1f} | {p['settings']['steps']} |",
        f"| KSampler (Demon), K={d['settings']['k']}, {d['settings']['estimator']} | {d['samples']} | "
        f"{d['mean_reward']:.4f} ± {d['standard_error']:.4f} | (no target) | | "
        f"{d['compute']['model_calls_per_image']:.0f} |",
        f"| KSampler (SMC / FK), {f['settings']['particles']} particles, λ={f['settings']['lam']:g}, weighted draw | "
        f"{f['samples']} | {f['mean_reward']:.4f} ± {f['standard_error']:.4f} | {f['exact']:.4f} | "
        f"{f['z_score']:+.1f} | {f['compute']['model_calls_per_image']:.0f} |",
        "",
        f"Plain sampling should match E[r] under the model, and FK E[r] under p·exp(λ·r), within Monte-Carlo error "
        f"(the demo fails beyond {Z_LIMIT:g} standard errors); Demon climbs greedily and has no such target.",
        "",
        f"Exact answers: E[r] under the model = {e['expected_reward_plain']:.4f}; best picture's reward = "
        f"{e['best_component_reward']:.4f}; E[r] under p·exp({e['lambda']:g}·r) = {e['expected_reward_tilted']:.4f}.",
        "",
        f"Images: {len(summary['images'])} files under {output_dir} (plain_*, demon_*, fk_*, *_trace_*)",
    ]
    path = output_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "demo_output", help="where images and summary go")
    parser.add_argument("--host", default="newest", help="which ComfyUI host to run on: 0.3.75, 0.28.2 or newest "
                        "(default: the newest that can be installed)")
    args = parser.parse_args()
    output_dir = args.output.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    setup = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_host.py"), "--host", args.host],
                           stdout=subprocess.PIPE, text=True)
    if setup.returncode != 0:
        return setup.returncode
    host = dict(item.split("=", 1) for item in setup.stdout.strip().splitlines()[-1].split())
    os.environ.update({"COMFYUI_DIR": host["COMFYUI_DIR"], "COMFYUI_PYTHON": host["COMFYUI_PYTHON"]})
    print(f"ComfyUI host: {host['COMFYUI_HOST']} ({host['COMFYUI_DIR']})")

    started = time.time()
    with ComfyServer(output_dir=output_dir, log_path=output_dir / "comfyui.log") as server:
        info = server.get("/object_info", timeout=120)
        workflow = json.loads(WORKFLOW.read_text())
        problems = validate_ui_workflow(workflow, info)
        if problems:
            print("the demo workflow does not match this ComfyUI:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        api = ui_to_api(workflow, info)
        history = server.run(api, timeout=900)
    summary = summarise(history, api, output_dir)
    summary["comfyui_host"] = host["COMFYUI_HOST"]
    problems = check_against_exact(summary)
    summary["checks"] = {"z_limit": Z_LIMIT, "passed": not problems, "problems": problems}
    report = write_report(summary, output_dir)
    print(report.read_text())
    print(f"images:  {output_dir / 'reward_steering_demo'}")
    print(f"summary: {output_dir / 'summary.json'} and {report}")
    print(f"(server up, run and down in {time.time() - started:.1f}s; ComfyUI log: {output_dir / 'comfyui.log'})")
    if problems:
        print("\nDEMO FAILED: a figure disagrees with its exact answer, so something in the pack or in this ComfyUI "
              "is wrong:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    print(f"check: every figure with an exact answer is within {Z_LIMIT:g} standard errors of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
