"""bench/gpu_bench.py cannot rot: its --tiny mode (the same code paths as the GPU run, on tiny configs of the same
ComfyUI model classes, on the CPU) runs on this host's Python, and its JSON has every section with finite numbers,
model-call counts that match the samplers' arithmetic, positive overhead ratios, and a memory-cap section whose
chunk sizes respect the cap it computed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import host_paths  # noqa: E402

FAMILIES = ("sdxl_tiny", "flux_tiny")
PER_FAMILY = ("build", "build_vae", "plain", "steering", "decode")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_bench") / "tiny.json"
    env = dict(os.environ, COMFYUI_DIR=str(host_paths()[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert out.exists() and out.with_suffix(".png").exists(), run.stdout[-3000:]
    return json.loads(out.read_text())


def numbers(node, path=""):
    """Every int / float in the JSON with its path (booleans excluded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_every_section_ran_with_finite_numbers(tiny_report):
    env = tiny_report["environment"]
    assert env["mode"] == "tiny" and env["device"] == "cpu"
    assert env["torch"] and env["comfyui"] not in ("", "unknown")
    sections = tiny_report["sections"]
    expected = {f"{s}:{f}" for f in FAMILIES for s in PER_FAMILY} | {"memory_cap:sdxl_tiny", "rewards"}
    assert expected <= set(sections), sorted(expected - set(sections))
    assert tiny_report["failed_sections"] == [], {k: sections[k].get("error") for k in tiny_report["failed_sections"]}
    bad = [(p, v) for p, v in numbers(sections) if not math.isfinite(v)]
    assert not bad, bad[:10]
    for fam in FAMILIES:
        plain = sections[f"plain:{fam}"]
        assert [r["batch"] for r in plain["rows"]] == tiny_report["settings"]["batches"]
        assert all(r["seconds_per_item"] > 0 for r in plain["rows"]) and plain["peak_items_per_second"] > 0
        decode = sections[f"decode:{fam}"]["rows"]
        assert set(decode) == {"vae", "taesd", "latent_rgb"}
        latent = sections[f"build:{fam}"]["latent"]
        assert decode["vae"]["image_shape"][1:] == [8 * latent[1], 8 * latent[2], 3]
        assert decode["latent_rgb"]["image_shape"][1:] == [latent[1], latent[2], 3]
        assert all(r["finite"] and r["seconds_per_candidate"] > 0 for r in decode.values())
    rewards = sections["rewards"]["rows"]
    assert len(rewards) == 2
    assert all(r["finite"] and r["ms_per_image_batched"] > 0 and r["ms_per_image_one_at_a_time"] > 0
               for r in rewards.values())


def test_steering_rows_count_calls_and_give_positive_overheads(tiny_report):
    settings = tiny_report["settings"]
    for fam in FAMILIES:
        steps = tiny_report["sections"][f"build:{fam}"]["steps"]
        rows = tiny_report["sections"][f"steering:{fam}"]["rows"]
        assert [(r["sampler"], r["n"]) for r in rows] == \
            [("demon", k) for k in settings["demon_ks"]] + [("smc", n) for n in settings["smc_particles"]]
        for r in rows:
            # Demon: one call per step plus K candidates at every step but the last (which lands on sigma 0);
            # SMC: N particles at every step
            calls = steps + r["n"] * (steps - 1) if r["sampler"] == "demon" else r["n"] * steps
            assert r["model_calls_per_image"] == calls, r
            assert r["overhead_ratio"] > 0 and r["expected_seconds_from_plain"] > 0, r
            assert r["overhead_ratio_cpu_time"] > 0, r
            assert r["throughput_share_candidate_calls"] > 0 and r["seconds_per_image"] > 0, r
            assert r["output_finite"], r


def test_memory_cap_chunks_respect_the_cap(tiny_report):
    cap = tiny_report["sections"]["memory_cap:sdxl_tiny"]
    assert cap["kind"].startswith("cpu: simulated")
    assert cap["free_bytes_seen"] == cap["cap_bytes"] - cap["model_bytes"]
    fit = int(cap["free_bytes_seen"] * 0.8 // cap["per_item_estimate_bytes"])
    assert cap["items_that_fit"] == fit
    # the cap was chosen so that the K candidates do not fit one call: the sampler had to chunk, within the cap
    assert fit < cap["candidates_per_step"]
    assert cap["chunk_items"] and all(cap["batch"] <= c <= fit for c in cap["chunk_items"]), cap
    assert cap["chunked"] and cap["chunks_respect_cap"]
    assert cap["estimated_peak_bytes"] <= cap["cap_bytes"]
    steps = tiny_report["sections"]["build:sdxl_tiny"]["steps"]
    chunk = cap["chunk_items"][-1]
    # one base call per step, and the K candidates of each steered step in ceil(K / chunk) calls
    assert cap["batched_model_calls"] == steps + (steps - 1) * math.ceil(cap["candidates_per_step"] / chunk)
    assert cap["output_finite"]


def test_frontier_tiny_run_covers_every_method_with_counted_calls(tmp_path):
    """bench/frontier.py --tiny end to end: every method on both rewards, calls counted by the samplers (pruned
    best-of-N within best-of-N's budget, DTS* at one rollout = plain's calls), the targets evaluated, DTS's and
    FK's law errors beside each other, and every number finite."""
    out = tmp_path / "frontier.json"
    env = dict(os.environ, COMFYUI_DIR=str(host_paths()[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "frontier.py"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    bad = [(p, v) for p, v in numbers(report) if not math.isfinite(v)]
    assert not bad, bad
    for reward_name, rows in report["reward_vs_calls"].items():
        families = {r["family"] for r in rows}
        assert {"best-of-N", "pruned best-of-N", "Demon tweedie", "FK / SMC", "DTS", "DTS*"} <= families
        calls = {r["config"]: r["model_calls_per_image"] for r in rows}
        assert calls["plain sampling"] == 30 and calls["DTS*, 1 rollouts"] == 30
        assert 30 < calls["pruned best-of-N, budget of best-of-4"] <= calls["best-of-4"]
        targets = report["targets"][reward_name]
        assert isinstance(targets["target_dts_star_one_fifth_met"], bool)
        assert targets["pruned_vs_best_of_n"], "pruned best-of-N was not compared at equal calls"
    methods = {r["method"] for r in report["law_error"]["rows"]}
    assert methods == {"DTS", "FK / SMC"}
