"""The files users need: every reward loader's missing-file error says the exact file names, what each file is
(architecture, size), where users get it (the public page, by name) and the folder it goes in -- when the prompt is
queued (the nodes' validate_inputs, shown by ComfyUI in place of "value not in list") and when a node runs -- and
the pack's model folders are searched in the folders an extra_model_paths.yaml names, loaded with ComfyUI's own
utils.extra_config (in process) and with the server's --extra-model-paths-config flag."""
from __future__ import annotations

import copy
import json

import pytest

import harness

# loader node, the input naming the file, its folder
LOADERS = [("RewardSteerLoadOpenClip", "LoadOpenClip", "weights", "open_clip"),
           ("RewardSteerAestheticReward", "AestheticRewardNode", "head", "aesthetic"),
           ("RewardSteerHPSReward", "HPSRewardNode", "weights", "hps"),
           ("RewardSteerPickScoreReward", "PickScoreRewardNode", "weights", "pickscore"),
           ("RewardSteerImageReward", "ImageRewardNode", "weights", "image_reward")]
OPEN_CLIP_STUB = type("OpenClipStub", (), {"image_embeddings": None})()   # the head's file is looked up first
MODULES = {"open_clip": "nodes.clip_rewards", "aesthetic": "nodes.clip_rewards"}


def catalogue():
    return harness.pack_submodule("rewards.model_files").REWARD_FOLDERS


def node_class(class_name: str, folder: str):
    return getattr(harness.pack_submodule(MODULES.get(folder, "nodes.preference_rewards")), class_name)


def assert_says_what_where_and_folder(message: str, folder: str, filename: str):
    entry = catalogue()[folder]
    assert filename in message and f"models/{folder}" in message, message
    for f in entry.files:   # every file the folder takes: exact name, what it is, size, public page
        assert f.name in message and f.what in message and f.size in message and f.source in message, (f, message)


@pytest.fixture
def restored_folder_paths(pack):
    """folder_paths as it was before the test (extra search paths added here must not leak into other tests)."""
    import folder_paths
    harness.pack_submodule("nodes.preference_rewards")    # registers the pack's folders
    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    yield folder_paths
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.mark.parametrize("node_id,class_name,input_name,folder", LOADERS, ids=[f for *_, f in LOADERS])
def test_missing_file_errors_say_what_the_file_is_where_to_get_it_and_where_it_goes(restored_folder_paths, node_id,
                                                                                    class_name, input_name, folder):
    node = node_class(class_name, folder)
    missing = "not-there-" + catalogue()[folder].files[0].name.replace("/", "-")
    message = node.validate_inputs(**{input_name: missing})        # at queue time
    assert isinstance(message, str)
    assert_says_what_where_and_folder(message, folder, missing)
    inputs = {"weights": missing} if input_name == "weights" else {"clip": OPEN_CLIP_STUB, "head": missing}
    if node_id == "RewardSteerLoadOpenClip":
        inputs["architecture"] = "ViT-B-32"
    with pytest.raises(FileNotFoundError) as error:                 # and when the node runs
        node.execute(**inputs)
    assert str(error.value) == message


def test_files_beside_the_weights_are_named_with_what_they_are_and_where_to_get_them(restored_folder_paths,
                                                                                    tmp_path):
    """PickScore's config.json, ImageReward's med_config.json and BERT vocab.txt: refused at queue time."""
    folder_paths = restored_folder_paths
    pick, ir = tmp_path / "pickscore", tmp_path / "image_reward"
    (pick / "PickScore_v1").mkdir(parents=True)
    (pick / "PickScore_v1" / "model.safetensors").write_bytes(b"weights")
    ir.mkdir()
    (ir / "ImageReward.pt").write_bytes(b"weights")
    folder_paths.add_model_folder_path("pickscore", str(pick))
    folder_paths.add_model_folder_path("image_reward", str(ir))
    files = catalogue()
    message = node_class("PickScoreRewardNode", "pickscore").validate_inputs(weights="PickScore_v1/model.safetensors")
    assert files["pickscore"].file("config.json").describe() in message, message
    assert str(pick / "PickScore_v1") in message
    image_reward = node_class("ImageRewardNode", "image_reward")
    message = image_reward.validate_inputs(weights="ImageReward.pt")
    for name in ("med_config.json", "bert-base-uncased/vocab.txt"):
        assert files["image_reward"].file(name).describe() in message, message
    (ir / "med_config.json").write_text("{}")
    (ir / "bert-base-uncased").mkdir()
    (ir / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n")
    assert image_reward.validate_inputs(weights="ImageReward.pt") is True


def test_folders_named_in_extra_model_paths_yaml_are_searched(restored_folder_paths, tmp_path):
    """ComfyUI's own loader of extra_model_paths.yaml (utils.extra_config), as main.py runs it: every pack folder
    it names is searched by the loaders, listed in their file pickers, and named in the missing-file error."""
    from utils.extra_config import load_extra_path_config
    folder_paths = restored_folder_paths
    files = {"open_clip": "my-clip.safetensors", "aesthetic": "my-head.pth", "hps": "HPS_v2.1_compressed.pt",
             "pickscore": "PickScore_v1/model.safetensors", "image_reward": "ImageReward.pt"}
    lines = ["mine:", f"    base_path: {tmp_path / 'elsewhere'}"]
    for folder, name in files.items():
        target = tmp_path / "elsewhere" / f"{folder}-files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights")
        lines.append(f"    {folder}: {folder}-files")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    load_extra_path_config(str(config))
    resolve = harness.pack_submodule("nodes.clip_rewards").resolve
    for folder, name in files.items():
        where = tmp_path / "elsewhere" / f"{folder}-files"
        assert name in folder_paths.get_filename_list(folder), (folder, folder_paths.get_filename_list(folder))
        assert resolve(folder, name) == str(where / name)
        with pytest.raises(FileNotFoundError) as error:
            resolve(folder, "absent.pt")
        assert str(where) in str(error.value) and name in str(error.value), str(error.value)


def test_server_shows_the_missing_file_error_when_the_prompt_is_queued(tmp_path):
    """Over HTTP, with folders from --extra-model-paths-config: a file there is offered by the picker, and a file
    that is nowhere is refused at queue time with the pack's message (not core's "value not in list")."""
    from comfy_client import ComfyServer
    hps = tmp_path / "hps-files"
    hps.mkdir()
    (hps / "HPS_v2_compressed.pt").write_bytes(b"weights")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"mine:\n    hps: {hps}\n")
    prompt = {"1": {"class_type": "RewardSteerHPSReward",
                    "inputs": {"weights": "HPS_v2.1_compressed.pt", "text": "", "precision": "fp32"}},
              "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "3": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["2", 0], "reward": ["1", 0]}}}
    with ComfyServer(output_dir=tmp_path / "out", extra_args=["--extra-model-paths-config", str(config)],
                     log_path=tmp_path / "server.log") as server:
        info = server.get("/object_info/RewardSteerHPSReward")["RewardSteerHPSReward"]
        options = info["input"]["required"]["weights"][1]["options"]
        assert "HPS_v2_compressed.pt" in options, options
        assert "HPS_v2.1_compressed.pt" not in options, "the test needs HPS_v2.1_compressed.pt to be missing"
        with pytest.raises(RuntimeError, match="HTTP 400") as refused:
            server.post("/prompt", {"prompt": prompt})
    body = json.loads(str(refused.value).split(": ", 1)[1])
    errors = body["node_errors"]["1"]["errors"]
    text = " ".join(e["details"] for e in errors)
    assert_says_what_where_and_folder(text, "hps", "HPS_v2.1_compressed.pt")
    assert str(hps) in text and "HPS_v2_compressed.pt" in text, text
