"""Every input and output of every node of the pack has a tooltip, as the page gets them: walked from a real
server's /object_info (inputs: the `tooltip` option of each required / optional input; outputs:
`output_tooltips`, one per output)."""
from __future__ import annotations

import harness

# Inputs whose meaning depends on others: their tooltip must name those others (the examples).
MUST_MENTION = {
    ("RewardSteerDemonSampler", "weighting"): ["tau"],
    ("RewardSteerDemonSampler", "min_sigma"): ["start", "end"],
    ("RewardSteerDemonSampler", "start"): ["end", "min_sigma"],
    ("RewardSteerDemonSampler", "budget"): ["K", "window", "budget_seconds"],
    ("RewardSteerDemonSampler", "k"): ["budget"],
    ("RewardSteerSMCSampler", "lam"): ["tempering", "potential"],
    ("RewardSteerSMCSampler", "potential"): ["lambda"],
    ("RewardSteerSMCSampler", "gamma"): ["tempering"],
    ("RewardSteerSMCSampler", "eta"): ["resampling"],
    ("RewardSteerSMCSampler", "ess_threshold"): ["reward_start", "interval"],
}


def pack_nodes(object_info: dict) -> dict:
    module = f"custom_nodes.{harness.PACK_LINK_NAME}"
    return {name: info for name, info in object_info.items() if info.get("python_module") == module}


def inputs_of(info: dict):
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            yield name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def test_every_input_and_output_has_a_tooltip(server):
    nodes = pack_nodes(server.object_info)
    registered = {node.GET_SCHEMA().node_id for node in harness.pack_submodule("nodes").load_node_classes()}
    assert set(nodes) == registered, sorted(set(nodes) ^ registered)
    missing, counts = [], {"inputs": 0, "outputs": 0}
    for node, info in sorted(nodes.items()):
        assert info.get("description"), f"{node} has no description"
        for name, options in inputs_of(info):
            counts["inputs"] += 1
            if len((options.get("tooltip") or "").split()) < 3:
                missing.append(f"{node} input {name}: {options.get('tooltip')!r}")
        tooltips = info.get("output_tooltips") or []
        assert len(tooltips) == len(info["output"]), (node, tooltips, info["output"])
        for name, tooltip in zip(info["output_name"], tooltips):
            counts["outputs"] += 1
            if len((tooltip or "").split()) < 3:
                missing.append(f"{node} output {name}: {tooltip!r}")
    print(f"{len(nodes)} nodes, {counts['inputs']} inputs, {counts['outputs']} outputs")
    assert not missing, f"{len(missing)} without a tooltip (of 3 words or more):\n" + "\n".join(missing)
    assert counts["inputs"] > 150 and counts["outputs"] > 30


def test_tooltips_say_how_inputs_interact(server):
    nodes = pack_nodes(server.object_info)
    for (node, name), words in MUST_MENTION.items():
        tooltip = dict(inputs_of(nodes[node]))[name].get("tooltip", "")
        assert all(w in tooltip for w in words), (node, name, words, tooltip)
    # the all-in-one nodes show the same text as the SAMPLER nodes they wrap
    for wrapper, sampler in (("RewardSteerKSamplerDemon", "RewardSteerDemonSampler"),
                             ("RewardSteerKSamplerSMC", "RewardSteerSMCSampler"),
                             ("RewardSteerKSamplerTree", "RewardSteerTreeSampler")):
        shared = dict(inputs_of(nodes[sampler]))
        for name, options in inputs_of(nodes[wrapper]):
            if name in shared:
                assert options.get("tooltip") == shared[name].get("tooltip"), (wrapper, name)
