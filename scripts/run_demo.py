#!/usr/bin/env python3
"""The main job on the embedded default: install the host if missing, start ComfyUI headless on 127.0.0.1,
queue workflows/demo_reference.json (plain sampling vs the Demon sampler vs SMC / FK steering), save the images and a summary
(mean rewards next to the exact answers),
print where they are, and stop the server.

    python3 scripts/run_demo.py [--output DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import REPO, ComfyServer, ui_to_api, validate_ui_workflow  # noqa: E402

WORKFLOW = REPO / "workflows" / "demo_reference.json"


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
    demon = score_summary(outputs[node_id_of(api, "RewardSteerScoreImages", "Score Demon samples")]["scores"])
    demon_node = node_id_of(api, "RewardSteerKSamplerDemon")
    demon["compute"] = outputs[demon_node]["demon"][0]
    demon["settings"] = {k: api[demon_node]["inputs"][k] for k in ("k", "beta", "weighting", "estimator", "steps")}
    fk = score_summary(outputs[node_id_of(api, "RewardSteerScoreImages", "Score FK samples")]["scores"])
    fk_node = node_id_of(api, "RewardSteerKSamplerSMC")
    fk["compute"] = {k: v for k, v in outputs[fk_node]["smc"][0].items() if k.endswith("per_image")}
    fk["settings"] = {k: api[fk_node]["inputs"][k] for k in ("particles", "lam", "potential", "output", "steps")}
    target = outputs[node_id_of(api, "RewardSteerReferenceExactTarget")]["target"][0]
    plain["exact_expected_reward"] = target["expected_reward_base"]
    plain["z_score"] = ((plain["mean_reward"] - target["expected_reward_base"]) / plain["standard_error"]
                        if plain["standard_error"] > 0 else 0.0)
    return {
        "workflow": str(WORKFLOW.relative_to(REPO)),
        "reward": target["reward"],
        "plain": plain,
        "demon": demon,
        "fk": fk,
        "exact": {"expected_reward_plain": target["expected_reward_base"],
                  "best_component_reward": max(target["component_rewards"]),
                  "lambda": target["lambda"], "expected_reward_tilted": target["expected_reward_tilted"],
                  "tilted_component_probabilities": dict(zip(target["components"],
                                                             target["tilted_probabilities"]))},
        "images": [str(p) for p in images],
    }


def write_report(summary: dict, output_dir: Path) -> Path:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    p, d, f, e = summary["plain"], summary["demon"], summary["fk"], summary["exact"]
    lines = [
        "# Reward steering demo (reference model, exact answers)",
        "",
        f"Reward: {summary['reward']}",
        "",
        "| run | samples | mean reward | model calls / image |",
        "|---|---|---|---|",
        f"| plain sampling (KSampler euler, 30 steps) | {p['samples']} | {p['mean_reward']:.4f} ± "
        f"{p['standard_error']:.4f} | 30 |",
        f"| KSampler (Demon), K={d['settings']['k']}, {d['settings']['estimator']} | {d['samples']} | "
        f"{d['mean_reward']:.4f} ± {d['standard_error']:.4f} | {d['compute']['model_calls_per_image']:.0f} |",
        f"| KSampler (SMC / FK), {f['settings']['particles']} particles, λ={f['settings']['lam']:g}, weighted draw | "
        f"{f['samples']} | {f['mean_reward']:.4f} ± {f['standard_error']:.4f} | "
        f"{f['compute']['model_calls_per_image']:.0f} |",
        "",
        f"FK targets p·exp(λ·r) exactly: its mean reward should match {e['expected_reward_tilted']:.4f} (below); "
        "Demon climbs greedily and has no such target.",
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
    args = parser.parse_args()
    output_dir = args.output.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    setup = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_host.py")])
    if setup.returncode != 0:
        return setup.returncode

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
    report = write_report(summary, output_dir)
    print(report.read_text())
    print(f"images:  {output_dir / 'reward_steering_demo'}")
    print(f"summary: {output_dir / 'summary.json'} and {report}")
    print(f"(server up, run and down in {time.time() - started:.1f}s; ComfyUI log: {output_dir / 'comfyui.log'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
