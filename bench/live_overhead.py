#!/usr/bin/env python3
"""Cost of the live candidate view (samplers/live.py) on the demo reference graph (the demo workflow:
Demon K=16 and SMC N=16, 30 steps, 16 images of 256 px on the exact reference model), CPU.

One real ComfyUI server; the demo is queued alternately with the view on (its client id has an open websocket, so
every scored step builds and sends a grid) and off (a client id with no websocket: the view sends nothing), each time
with a new seed so nothing is cached.  Wall time = execution_start -> execution_success in /history.

    .host/v0.28.2/venv/bin/python bench/live_overhead.py [--repeats 3]
Writes bench/results/live_overhead.json and prints the ratio on / off."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import build_workflows  # noqa: E402
from comfy_client import ComfyServer  # noqa: E402
from test_live_candidates import LiveEvents  # noqa: E402


def seconds(entry: dict) -> float:
    stamps = {m[0]: m[1].get("timestamp") for m in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def run(server, client_id: str, seed: int) -> float:
    prompt = build_workflows.demo_reference()
    for node in ("3", "9", "14"):
        prompt[node]["inputs"]["seed"] = seed
    return seconds(server.wait(server.queue(prompt, client_id=client_id), timeout=900))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = REPO / "bench" / "results"
    with ComfyServer(output_dir=Path("/tmp") / f"live-overhead-{uuid.uuid4().hex[:8]}") as server:
        listener = LiveEvents(server.url)
        run(server, listener.client_id, seed=0)            # warm-up (imports, first allocations), not counted
        on, off, events = [], [], []
        for r in range(args.repeats):
            before = len(listener.events)
            on.append(run(server, listener.client_id, seed=2 * r + 1))
            events.append(len(listener.events) - before)
            off.append(run(server, uuid.uuid4().hex, seed=2 * r + 2))
        sizes = [len(e["image"] or "") for e in listener.events]
        listener.close()
    result = {"graph": "the demo workflow (Demon K=16 + SMC N=16, 30 steps, 16 images, 256 px)",
              "seconds_view_on": on, "seconds_view_off": off, "events_per_run": events,
              "mean_grid_base64_bytes": statistics.mean(sizes) if sizes else 0,
              "ratio_on_over_off": statistics.mean(on) / statistics.mean(off)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "live_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
