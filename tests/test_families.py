"""Tiny models of every family on ComfyUI's own model code (reference/tiny_families.py): each builds as its family's
class, runs the family's plain core workflow through the real executor with the family's real conditioning shapes
at the model interface, deterministically; where the host's model detection takes the tiny file, core UNETLoader
loads it as the same model."""
from __future__ import annotations

import inspect

import pytest
import torch

import harness

# The conditioning each family's real text encoders give its model for a short prompt: (context tokens, width),
# the pooled / ADM vector width, and the FluxGuidance value.  Written out here, not read from FAMILY_INFO.
REAL_CONDITIONING = {
    "sd15": ((77, 768), None, None),
    "sd2_v": ((77, 1024), None, None),
    "sdxl": ((77, 2048), 2816, None),      # ADM: pooled CLIP-G 1280 + six 256-wide size embeddings
    "sd3": ((154, 4096), 2048, None),      # CLIP-L/G padded to 4096, then T5; pooled L + G
    "flux": ((256, 4096), 768, 3.5),       # T5-XXL; pooled CLIP-L
    "flux2": ((512, 15360), None, 4.0),    # Mistral Small 3, three layers stacked
    "wan21": ((512, 4096), None, None),    # UMT5-XXL
    "zimage": ((None, 2560), None, None),  # Qwen3-4B; the length is the templated prompt's
    "qwen_image": ((None, 3584), None, None),  # Qwen2.5-VL-7B; the length is the templated prompt's
}
REAL_CLASSES = {"sd15": "SD15", "sd2_v": "SD20", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "flux2": "Flux2",
                "wan21": "WAN21_T2V", "zimage": "ZImage", "qwen_image": "QwenImage"}
# (latent channels, spatial downscale, model type) of the real families
REAL_LAYOUT = {"sd15": (4, 8, "EPS"), "sd2_v": (4, 8, "V_PREDICTION"), "sdxl": (4, 8, "EPS"), "sd3": (16, 8, "FLOW"),
               "flux": (16, 8, "FLUX"), "flux2": (128, 16, "FLUX"), "wan21": (16, 8, "FLOW"),
               "zimage": (16, 8, "FLOW"), "qwen_image": (16, 8, "FLUX")}
UNET_FAMILIES = {"sd15", "sd2_v", "sdxl"}


def tiny():
    return harness.pack_submodule("reference.tiny_families")


def families():
    return list(tiny().FAMILIES)


def test_every_listed_family_is_offered_where_the_host_has_its_class():
    import comfy.supported_models
    expected = [f for f, cls in REAL_CLASSES.items() if hasattr(comfy.supported_models, cls)]
    assert list(tiny().FAMILIES) == expected
    assert {"sd15", "sdxl", "flux", "wan21"} <= set(expected)   # both hosts have these


@pytest.mark.parametrize("family", families())
def test_family_builds_as_its_real_class_with_its_latent_layout(family):
    info = tiny().FAMILY_INFO[family]
    model, clip, vae = tiny().build_family(family, seed=0)
    channels, downscale, model_type = REAL_LAYOUT[family]
    assert type(model.model.model_config).__name__ == REAL_CLASSES[family] == info.model_class
    assert model.model.model_type.name == model_type == info.model_type
    assert model.model.latent_format.latent_channels == channels == info.latent_channels == vae.latent_channels
    assert info.downscale == downscale and vae.spacial_compression_decode() == downscale
    assert info.video == (family == "wan21")
    # weights are all set (ComfyUI's ops leave them uninitialised) and the network's output is not degenerate
    state = model.model.diffusion_model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values() if t.dtype.is_floating_point)
    assert all(t.dtype == torch.float32 for t in state.values() if t.dtype.is_floating_point)
    again = tiny().build_family_model(family, seed=0).model.diffusion_model.state_dict()
    other = tiny().build_family_model(family, seed=1).model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state if state[k].dtype.is_floating_point)


class InterfaceRecorder:
    """Wraps the diffusion network's forward to record the tensors that reach it, by argument name."""

    def __init__(self, monkeypatch, network_class):
        self.calls = []
        original = network_class.forward
        signature = inspect.signature(original)
        recorder = self

        def forward(this, *args, **kwargs):
            bound = signature.bind(this, *args, **kwargs)
            recorder.calls.append({k: v.detach().clone() for k, v in bound.arguments.items()
                                   if isinstance(v, torch.Tensor)})
            out = original(this, *args, **kwargs)
            recorder.calls[-1]["output"] = out.detach().clone()
            return out

        monkeypatch.setattr(network_class, "forward", forward)


@pytest.mark.parametrize("family", families())
def test_plain_core_workflow_runs_with_the_real_conditioning_shapes(executor, monkeypatch, family):
    tf = tiny()
    info = tf.FAMILY_INFO[family]
    network_class = type(tf.build_family_model(family).model.diffusion_model)
    recorder = InterfaceRecorder(monkeypatch, network_class)
    prompt = tf.plain_sampling_prompt(family, steps=2, width=64, height=64, frames=5)
    image = executor.run(prompt, want=("9",))["9"][0][0]
    calls, recorder.calls = recorder.calls, []
    again = executor.run(prompt, want=("9",))["9"][0][0]

    frames = 5 if info.video else 1
    assert image.shape == (frames, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert torch.equal(image, again)                    # same workflow and seed: the same image, bit for bit
    assert image.std() > 0                              # the tiny VAE decodes to a picture, not a flat colour

    (tokens, width), vector_width, guidance = REAL_CONDITIONING[family]
    assert len(calls) == 2                              # two steps; cond and uncond go in one batch
    for call in calls:
        context, vector = call["context"], call.get("y")
        assert context.shape[2] == width and context.shape[1] == (tokens or context.shape[1])
        if vector_width is None:
            assert vector is None
        else:
            assert vector.shape[1:] == (vector_width,)
        if guidance is None:
            assert call.get("guidance") is None
        else:
            assert torch.all(call["guidance"] == guidance)
        x = call["x"]
        latent_hw = (64 // info.downscale, 64 // info.downscale)
        expected_x = ((info.latent_channels, (frames - 1) // 4 + 1) + latent_hw if info.video
                      else (info.latent_channels,) + latent_hw)
        assert x.shape[1:] == expected_x or (not info.video and x.shape[1:] == expected_x[:1] + (1,) + latent_hw)
        out = call["output"]
        assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 1e-3
        if info.guider == "cfg" and out.shape[0] == 2:   # the prompt and the negative reach the network apart
            assert (out[0] - out[1]).abs().max() > 1e-4


def test_prompt_text_decides_the_conditioning(executor):
    """Deterministic per text: the same prompt gives the same conditioning, another prompt another."""
    def encode(text):
        prompt = {"1": {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": "flux", "seed": 0}},
                  "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}}
        return executor.run(prompt, want=("2",))["2"][0][0][0]

    a, b, c = encode("a red apple"), encode("a red apple"), encode("a blue car")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["pooled_output"], b[1]["pooled_output"])
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1]["pooled_output"], c[1]["pooled_output"])


def test_flux_text_node_finds_its_tokenizer_keys(executor):
    """CLIPTextEncodeFlux tokenizes clip_l and t5xxl apart: the context follows the T5 text, the pooled vector the
    CLIP-L text, as with the real encoders."""
    def encode(clip_l, t5xxl):
        prompt = {"1": {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": "flux", "seed": 0}},
                  "2": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["1", 1], "clip_l": clip_l,
                                                                      "t5xxl": t5xxl, "guidance": 3.5}}}
        cond = executor.run(prompt, want=("2",))["2"][0][0][0]
        return cond[0], cond[1]["pooled_output"]

    context, pooled = encode("a red apple", "a blue car")
    context_t5, _ = encode("a green bird", "a blue car")
    _, pooled_l = encode("a red apple", "a green bird")
    assert context.shape == (1, 256, 4096) and pooled.shape == (1, 768)
    assert torch.equal(context, context_t5) and torch.equal(pooled, pooled_l)
    assert not torch.equal(pooled, encode("a green bird", "a blue car")[1])


def register_folder(monkeypatch, folder):
    """Add `folder` to the diffusion_models search paths for this test (ComfyUI's own list, restored after)."""
    import folder_paths
    paths, extensions = folder_paths.folder_names_and_paths["diffusion_models"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", (paths + [str(folder)], extensions))


@pytest.mark.parametrize("family", families())
def test_core_unet_loader_takes_the_tiny_file_where_detection_recognises_it(executor, monkeypatch, tmp_path, family):
    import comfy.utils
    import folder_paths
    tf = tiny()
    info = tf.FAMILY_INFO[family]
    register_folder(monkeypatch, tmp_path)
    path = tf.write_tiny_model_file(family, str(tmp_path), seed=3)
    if family in UNET_FAMILIES:
        assert path is None                           # UNet detection needs full-size shapes
    if path is None:
        # the builder route is right: core loading of the tiny weights does not give this model
        forced = tmp_path / f"forced_{family}.safetensors"
        comfy.utils.save_torch_file(tf.tiny_state_dict(family, seed=3), str(forced))
        loader = {"class_type": "UNETLoader", "inputs": {"unet_name": forced.name, "weight_dtype": "default"}}
        with pytest.raises(RuntimeError, match="execution failed"):
            executor.run({"u": loader}, want=("u",))
        return
    name = path.rsplit("/", 1)[-1]
    assert name in folder_paths.get_filename_list("diffusion_models")
    builder = {"class_type": "RewardSteerTinyFamilyModel", "inputs": {"family": family, "seed": 3}}
    prompt = tf.plain_sampling_prompt(family, model_node=builder)
    from_file = dict(prompt, u={"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}})
    sampler = dict(prompt["8"], inputs=dict(prompt["8"]["inputs"]))
    if "model" in sampler["inputs"]:
        sampler["inputs"]["model"] = ["u", 0]
    from_file["8"] = sampler
    for node_id in ("6", "7"):                      # the guider and scheduler of SamplerCustomAdvanced
        if node_id in prompt:
            from_file[node_id] = dict(prompt[node_id], inputs=dict(prompt[node_id]["inputs"], model=["u", 0]))
    built = executor.run(prompt, want=("9",))["9"][0][0]
    outputs = executor.run(from_file, want=("9", "u"))
    loaded = outputs["u"][0][0]
    assert type(loaded.model.model_config).__name__ == info.model_class
    assert loaded.model.model_type.name == info.model_type
    assert torch.equal(outputs["9"][0][0], built)
