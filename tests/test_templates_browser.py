"""The example workflows in workflows/ as templates, in a real browser: ComfyUI's template browser lists every file
under the pack's name, and choosing one loads its graph.  ComfyUI serves `workflows/` as a legacy alias of
`example_workflows/`; this test is how we learn if a ComfyUI or frontend release drops the alias.  Runs on every
host, and again against the newest comfyui-frontend-package (scripts/test.sh)."""
from __future__ import annotations

import json

from comfy_client import REPO
from test_manual_pick_browser import READY_JS, browser, comfy  # noqa: F401  (fixtures)

PACK_NAME = "comfyui-reward-steering"
TEMPLATES = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


def test_server_lists_the_example_workflows_as_the_packs_templates(comfy):  # noqa: F811
    listed = comfy.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == TEMPLATES, listed
    served = comfy.get(f"/api/workflow_templates/{PACK_NAME}/demo_reference.json")
    assert served == json.loads((REPO / "workflows" / "demo_reference.json").read_text())


def test_template_browser_shows_every_example_and_loads_one(browser, comfy):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.wait_for_selector(f'[role="dialog"]:has-text("{PACK_NAME}")', timeout=30_000)
    dialog.wait_for_selector(f"text={PACK_NAME}", timeout=30_000).click()
    for name in TEMPLATES:   # each template's card, titled with its file name
        dialog.wait_for_selector(f"text={name}", timeout=30_000)
    page.screenshot(path=str(REPO / "test-artifacts" / "template_browser.png"))
    dialog.wait_for_selector("text=demo_reference", timeout=10_000).click()
    page.wait_for_selector(f'[role="dialog"]:has-text("{PACK_NAME}")', state="detached", timeout=30_000)
    types = page.wait_for_function("""() => { const nodes = window.comfyAPI.app.app.graph._nodes.map(n => n.type);
        return nodes.includes('RewardSteerKSamplerDemon') && nodes; }""", timeout=30_000).json_value()
    demo = json.loads((REPO / "workflows" / "demo_reference.json").read_text())
    assert sorted(types) == sorted(n["type"] for n in demo["nodes"])
    assert errors == []
    page.close()
