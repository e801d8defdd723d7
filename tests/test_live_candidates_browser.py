"""The live candidate view in a real browser (ComfyUI's own frontend in headless Chromium, as in
tests/test_manual_pick_browser.py): the demo graph is queued from the page; while its Demon and SMC nodes run, the
pack's page script draws each scored step's candidate grid on the executing node, the grid updates step by step,
and it freezes (labelled "final") when the run ends.  A mid-run screenshot goes to test-artifacts/live_candidates.png."""
from __future__ import annotations

import json
import time

from comfy_client import DEMO_WORKFLOW, REPO
from test_manual_pick_browser import ARTIFACTS, LAUNCH_ARGS, NODE_BY_ID_JS, browser, comfy  # noqa: F401 (fixtures)

WORKFLOW = DEMO_WORKFLOW
READY_JS = """() => { const app = window.comfyAPI?.app?.app;
        return app && app.graph && window.comfyAPI.api.api.clientId && window.__rewardSteeringLive &&
               app.extensions.some(e => e.name === 'RewardSteering.LiveCandidates'); }"""
# every live event the page received, and what the extension had drawn by then
RECORD_JS = """() => { window.__rsLiveSeen = []; window.comfyAPI.api.api.addEventListener('reward_steering.live',
    e => window.__rsLiveSeen.push({node: e.detail.node, kind: e.detail.kind, step: e.detail.step, k: e.detail.k,
                                   rewards: e.detail.rewards.length, weights: e.detail.weights.length})); }"""
STATE_JS = "() => ({...window.__rewardSteeringLive, seen: window.__rsLiveSeen})"


def test_the_grid_appears_updates_and_freezes_during_the_demo(browser, comfy):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.wait_for_timeout(500)
    if page.query_selector(".p-dialog"):
        page.keyboard.press("Escape")
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", json.loads(WORKFLOW.read_text()))
    page.evaluate(RECORD_JS)
    demon = page.evaluate(f"() => ({NODE_BY_ID_JS})(9).type")
    assert demon == "RewardSteerKSamplerDemon", demon
    page.evaluate("""(id) => { const app = window.comfyAPI.app.app; const node = (""" + NODE_BY_ID_JS + """)(id);
        const ds = app.canvas.ds; ds.scale = 1.0; ds.offset[0] = -node.pos[0] + 80; ds.offset[1] = -(node.pos[1] + node.size[1]) + 250;
        app.canvas.setDirty(true, true); }""", "9")
    page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__rewardSteeringLive.count >= 3 && window.__rewardSteeringLive.node === '9'",
                           timeout=300_000)
    mid = page.evaluate(STATE_JS)
    assert not mid["frozen"]
    page.wait_for_timeout(200)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live_candidates.png"))
    drawn_mid = page.evaluate(f"() => ({NODE_BY_ID_JS})(9).rsLive?.img?.naturalWidth ?? 0")
    assert drawn_mid > 0                        # the grid image is on the node
    page.wait_for_function("() => window.__rewardSteeringLive.frozen", timeout=600_000)
    end = page.evaluate(STATE_JS)
    seen = end["seen"]
    demon_steps = [e["step"] for e in seen if e["node"] == "9"]
    smc_steps = [e["step"] for e in seen if e["node"] == "14"]
    assert len(demon_steps) >= 3 and demon_steps == sorted(set(demon_steps))   # updated step by step
    assert len(smc_steps) >= 3 and smc_steps == sorted(set(smc_steps))
    assert all(e["rewards"] == e["weights"] == min(e["k"], 16) for e in seen)
    assert all(e["k"] == 16 for e in seen)
    assert end["count"] == len(seen)            # every event was drawn
    frozen = page.evaluate(f"() => ({NODE_BY_ID_JS})(14).rsLive?.frozen")
    assert frozen is True                       # the last grid stays, frozen
    page.close()
