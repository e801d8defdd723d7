"""The demo's results and costs in the page (issue 16, item 6), in ComfyUI's own frontend in headless Chromium.

The demo graph is queued from the page.  While it runs, the steering nodes' first text is their planned cost.
When it ends, Score Images (plain, Demon, FK), Exact Target and both steering nodes show their UI text in the
box web/results_text.js adds, and the box says exactly what /history says.  The box is also drawn by the Vue node
renderer where the frontend has one.  Screenshot: test-artifacts/results_in_page.png."""
from __future__ import annotations

import json

from comfy_client import DEMO_WORKFLOW
from test_manual_pick_browser import ARTIFACTS, NODE_BY_ID_JS, browser, comfy  # noqa: F401 (fixtures)

WORKFLOW = DEMO_WORKFLOW
RESULT_NODES = {"7": "mean", "12": "mean", "17": "mean", "8": "E_p[r]", "9": "spent:", "14": "spent:"}
READY_JS = """() => { const app = window.comfyAPI?.app?.app;
        return app && app.graph && window.comfyAPI.api.api.clientId &&
               app.extensions.some(e => e.name === 'RewardSteering.ResultsText'); }"""
# the run's prompt id and end, and every node text (ComfyUI's progress_text event) in the order it came
RECORD_JS = """() => { const api = window.comfyAPI.api.api; window.__rsRun = {done: false, texts: []};
    api.addEventListener('progress_text', e => window.__rsRun.texts.push({node: String(e.detail.nodeId), text: e.detail.text}));
    api.addEventListener('execution_success', () => { window.__rsRun.done = true; });
    api.addEventListener('executing', e => { if (e.detail === null) window.__rsRun.done = true; }); }"""
BOXES_JS = """() => Object.fromEntries(Array.from(document.querySelectorAll('textarea[data-reward-steer-result]'))
    .map(el => [el.dataset.rewardSteerResult, {text: el.value, visible: el.offsetParent !== null && el.offsetHeight > 20}]))"""

CENTRE_JS = """(id) => { const app = window.comfyAPI.app.app; const node = (""" + NODE_BY_ID_JS + """)(id);
    const ds = app.canvas.ds; ds.scale = 1.0; ds.offset = [-node.pos[0] + 60, -node.pos[1] + 60];
    app.canvas.setDirty(true, true); }"""


def load_demo(page, comfy):  # noqa: F811
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.wait_for_timeout(500)
    if page.query_selector(".p-dialog"):
        page.keyboard.press("Escape")
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", json.loads(WORKFLOW.read_text()))


def test_demo_results_and_costs_show_on_their_nodes(browser, comfy):  # noqa: F811
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    load_demo(page, comfy)
    page.evaluate(RECORD_JS)
    assert page.evaluate(BOXES_JS) == {}                    # nothing before a run
    page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__rsRun.done", timeout=600_000)
    page.wait_for_function(f"() => ({BOXES_JS})()['14'] !== undefined", timeout=30_000)
    boxes = page.evaluate(BOXES_JS)
    texts = page.evaluate("() => window.__rsRun.texts")
    history = comfy.get("/history", timeout=30)
    (entry,) = history.values()
    outputs = entry["outputs"]
    for node_id, word in RESULT_NODES.items():
        assert node_id in boxes, (node_id, sorted(boxes))
        assert boxes[node_id]["text"] == "\n".join(outputs[node_id]["text"]), node_id   # what /history says
        assert word in boxes[node_id]["text"], (node_id, boxes[node_id])
        page.evaluate(CENTRE_JS, node_id)                   # in view at scale 1: the box is drawn, with room
        page.wait_for_timeout(300)
        assert page.evaluate(BOXES_JS)[node_id]["visible"], node_id
    for node_id in ("9", "14"):                             # the plan came first, before any step
        mine = [t["text"] for t in texts if t["node"] == node_id]
        assert mine[0].startswith("planned: "), mine[:2]
        assert "model calls per image" in boxes[node_id]["text"]
    # the results columns (Score Images, Exact Target, the images) at a scale the canvas draws text at
    page.evaluate("() => { const app = window.comfyAPI.app.app; const ds = app.canvas.ds; ds.scale = 0.8; "
                  "ds.offset = [-2320, -40]; app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "results_in_page.png"))

    # The Vue node renderer, where the frontend has one: the same output through the node's onExecuted (what the
    # frontend calls on "executed") puts the box inside the Vue node.
    has_vue = page.evaluate("() => !!window.comfyAPI.app.app.extensionManager?.setting?.get && "
                            "window.comfyAPI.app.app.extensionManager.setting.get('Comfy.VueNodes.Enabled') !== undefined")
    if has_vue:
        page.evaluate("async () => { await window.comfyAPI.app.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
        load_demo(page, comfy)
        page.evaluate("(args) => { const [id, out] = args; (" + NODE_BY_ID_JS + ")(id).onExecuted(out); }",
                      ["7", outputs["7"]])
        page.wait_for_timeout(500)
        inside = page.evaluate("""() => { const el = document.querySelector('textarea[data-reward-steer-result="7"]');
            const node = document.querySelector('[data-node-id="7"]');
            return {box: !!el, inside: !!(el && node && node.contains(el)), text: el?.value ?? ''}; }""")
        if inside["box"] and page.query_selector('[data-node-id="7"]'):
            assert inside["inside"] and inside["text"].startswith(outputs["7"]["text"][0][:10]), inside
        page.evaluate("async () => { await window.comfyAPI.app.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")
    page.close()
