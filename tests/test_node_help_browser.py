"""The node-help panel of ComfyUI's own frontend shows the pack's help page (web/docs/<node id>.md), in headless
Chromium: a person selects a KSampler (Demon) node and opens its Info (the properties panel's Info tab, or on older
frontends the selection toolbox's Info button); the panel fetches
/extensions/<pack folder>/docs/RewardSteerKSamplerDemon.md and renders it (the summary, the Example heading and every
input with its tooltip) -- not the description the frontend falls back to without a page.  The panel's screenshot is
kept in test-artifacts/ (node_help.png on the newest frontend, REWARD_STEER_FRONTEND_ROOT; else
node_help_<frontend version>.png).  Set-up as in test_manual_pick_browser (scripts/setup_browser.sh)."""
from __future__ import annotations

import os

import harness
from comfy_client import REPO

from test_manual_pick_browser import ARTIFACTS, browser, comfy  # noqa: F401  (fixtures: Chromium, a server)

NODE = "RewardSteerKSamplerDemon"
HELP = ".node-help-content"
READY_JS = f"""() => {{ const app = window.comfyAPI?.app?.app;
        return app && app.graph && app.canvas && window.LiteGraph?.registered_node_types?.{NODE}; }}"""
ADD_JS = f"""() => {{ const app = window.comfyAPI.app.app; app.graph.clear();
    const node = window.LiteGraph.createNode('{NODE}'); node.pos = [300, 250]; app.graph.add(node);
    app.canvas.setDirty(true, true);
    // where its title bar is on the page, to click it as a person would
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - 15]);
    const box = app.canvas.canvas.getBoundingClientRect();
    return [node.type, box.left + x, box.top + y]; }}"""
SELECTED_JS = f"""() => {{ const app = window.comfyAPI.app.app;
    return app.graph._nodes.length === 1 && Object.values(app.canvas.selected_nodes || {{}}).some(n => n.type === '{NODE}'); }}"""


def test_the_help_panel_shows_the_nodes_markdown(browser, comfy):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/docs/" in r.url else None)
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.wait_for_timeout(500)
    if page.query_selector(".p-dialog"):        # a first-run dialog over the page: close it, as a person would
        page.keyboard.press("Escape")
    # The page loads its start-up workflow after the app is ready, and may replace the graph once more: add the node
    # and click it until it is there and selected.
    page.wait_for_function("() => window.comfyAPI.app.app.graph._nodes.length > 0", timeout=60_000)
    for attempt in range(3):
        page.wait_for_timeout(1000)
        node_type, x, y = page.evaluate(ADD_JS)
        assert node_type == NODE
        page.wait_for_timeout(300)
        page.mouse.click(x, y)       # selects the node, as a person would
        page.wait_for_timeout(500)
        if page.evaluate(SELECTED_JS):
            break
    else:
        page.screenshot(path=str(ARTIFACTS / "node_help_failure.png"))
        raise AssertionError("the node could not be selected; see test-artifacts/node_help_failure.png")
    panel_toggle = page.locator('button[aria-label="Toggle properties panel"]')
    if panel_toggle.count():     # frontends with a properties panel (1.4x+): its Info tab is the node's help
        panel_toggle.first.click()
        page.get_by_role("tab", name="Info").click(timeout=30_000)
    else:                        # older ones: the selection toolbox's Info button opens the help page
        page.click('[data-testid="info-button"]', timeout=30_000)
    page.wait_for_function(f"""() => {{ const el = document.querySelector('{HELP}');
        return el && el.querySelector('h2') && el.innerText.includes('Example'); }}""", timeout=30_000)
    page.wait_for_timeout(500)
    shown = page.inner_text(HELP)
    markdown = (REPO / "web" / "docs" / f"{NODE}.md").read_text()
    summary = markdown.split("\n")[2]
    assert summary in shown, shown[:500]
    headings = page.eval_on_selector_all(f"{HELP} h2", "els => els.map(e => e.innerText.trim())")
    assert headings[:3] == ["Example", "Inputs", "Outputs"], headings
    for line in markdown.splitlines():
        if line.startswith("- **"):         # every input and output, with its tooltip
            name, tooltip = line[4:].split("**", 1)[0], line.split("): ", 1)[1]
            assert name in shown and tooltip in shown, (name, tooltip)
    pack_docs = f"/extensions/{harness.PACK_LINK_NAME}/docs/{NODE}"      # the pack's folder under custom_nodes
    assert any(pack_docs in url for url in asked), asked
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
    name = "node_help.png" if os.environ.get("REWARD_STEER_FRONTEND_ROOT") else f"node_help_{version}.png"
    page.screenshot(path=str(ARTIFACTS / name))
    page.close()
