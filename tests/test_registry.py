"""Node registration: V3 nodes with stable prefixed ids; a missing optional dependency hides only its nodes."""
from __future__ import annotations

import logging

import harness

EXPECTED_NODE_IDS = {
    "RewardSteerReferenceModel", "RewardSteerReferenceExactTarget", "RewardSteerTinyTestModel",
    "RewardSteerTinyFamilyModel",
    "RewardSteerColorReward", "RewardSteerImageSimilarityReward", "RewardSteerScoreImages",
    "RewardSteerCombineRewards", "RewardSteerLoadOpenClip", "RewardSteerAestheticReward",
    "RewardSteerClipScoreReward", "RewardSteerVLMReward",
    "RewardSteerDemonSampler", "RewardSteerKSamplerDemon",
    "RewardSteerSMCSampler", "RewardSteerKSamplerSMC", "RewardSteerBestOfN",
    "RewardSteerManualPickReward",
    "RewardSteerHPSReward", "RewardSteerPickScoreReward", "RewardSteerImageReward",
    "RewardSteerTreeSampler", "RewardSteerKSamplerTree",
}


def test_all_nodes_are_v3_with_prefixed_stable_ids():
    registry = harness.pack_submodule("nodes")
    from comfy_api.latest import io
    classes = registry.load_node_classes()
    ids = [cls.GET_SCHEMA().node_id for cls in classes]
    assert len(ids) == len(set(ids))
    assert set(ids) == EXPECTED_NODE_IDS
    for cls in classes:
        assert issubclass(cls, io.ComfyNode)


def test_missing_optional_dependency_hides_only_its_nodes(caplog):
    registry = harness.pack_submodule("nodes")
    modules = [("rewards", ()), ("reference", ("surely_not_installed_pkg_123",))]
    with caplog.at_level(logging.WARNING):
        classes = registry.load_node_classes(modules)
    ids = {cls.GET_SCHEMA().node_id for cls in classes}
    assert "RewardSteerColorReward" in ids and "RewardSteerReferenceModel" not in ids
    lines = [r.getMessage() for r in caplog.records if registry.LOG_PREFIX in r.getMessage()]
    assert len(lines) == 1
    assert "reference nodes disabled" in lines[0] and "surely_not_installed_pkg_123" in lines[0]
    assert "pip install -r requirements.txt" in lines[0]


def test_pack_registers_through_comfy_entrypoint(executor):
    for node_id in EXPECTED_NODE_IDS:
        assert node_id in executor.node_classes
