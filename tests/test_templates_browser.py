"""The example workflows in workflows/ as templates, in a real browser: ComfyUI's template browser lists every file
under the pack's name, and choosing one loads its graph.  ComfyUI serves `workflows/` as a legacy alias of
`example_workflows/`; this test is how we learn if a ComfyUI or frontend release drops the alias.  Runs on every
host, and again against the newest comfyui-frontend-package (scripts/test.sh)."""
from __future__ import annotations

import itertools
import json
import os
import urllib.parse
import urllib.request

import pytest

from build_workflows import FIT_VIEW_JS, load_in_renderer, renderers
from comfy_client import DEMO_WORKFLOW, REPO, TITLE_HEIGHT, node_group
from test_manual_pick_browser import READY_JS, browser, comfy  # noqa: F401  (fixtures)

PACK_NAME = "comfyui-reward-steering"
TEMPLATES = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
GRAPHS = REPO / "test-artifacts" / "graphs"
GROUP_TITLES = {"model", "reward", "steering", "output"}

def overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(box, outer) -> bool:
    return (outer[0] <= box[0] and box[0] + box[2] <= outer[0] + outer[2] and
            outer[1] <= box[1] and box[1] + box[3] <= outer[1] + outer[3])


@pytest.fixture(scope="module")
def page(browser, comfy):  # noqa: F811
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.wait_for_timeout(500)
    if page.query_selector(".p-dialog"):
        page.keyboard.press("Escape")
    yield page
    page.close()


@pytest.mark.parametrize("name", TEMPLATES)
def test_example_graph_reads_at_a_glance_in_every_renderer(page, comfy, name):  # noqa: F811
    """Loaded in the page, in the classic renderer and (where the frontend has it) the Vue node renderer: no two
    nodes overlap as drawn; every node sits inside the group named for its role (model / reward / steering /
    output); one Note says what the graph shows; the workflow has a description.  A screenshot of each is kept."""
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert workflow["extra"].get("description"), "no workflow-level description"
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "What it shows" in notes[0]["widgets_values"][0]
    assert {g["title"] for g in workflow["groups"]} <= GROUP_TITLES
    GRAPHS.mkdir(parents=True, exist_ok=True)
    checked = []
    for vue in renderers(page):
        renderer = "vue" if vue else "classic"
        boxes = load_in_renderer(page, workflow, vue)
        assert not [b for b in boxes.values() if b.get("missing")], f"{renderer}: nodes not drawn"
        assert sorted(b["type"] for b in boxes.values()) == sorted(n["type"] for n in workflow["nodes"])
        clashes = [(f"{a} {boxes[a]['type']}", f"{b} {boxes[b]['type']}")
                   for a, b in itertools.combinations(boxes, 2) if overlaps(boxes[a]["box"], boxes[b]["box"])]
        assert clashes == [], f"{name}, {renderer} renderer: overlapping nodes {clashes}"
        groups = {g["title"]: g["bounding"] for g in workflow["groups"]}
        if vue:   # older frontends (1.32.x) place the whole Vue node layer at a common offset from the canvas the
            # groups are drawn on: measure containment in the layer's own frame when the offset is common to all
            pos = {str(n["id"]): n["pos"] for n in workflow["nodes"]}
            shifts = [(b["box"][0] - pos[k][0], b["box"][1] - pos[k][1] + TITLE_HEIGHT) for k, b in boxes.items()]
            mid = sorted(shifts)[len(shifts) // 2]
            if all(abs(dx - mid[0]) <= 2 and abs(dy - mid[1]) <= 2 for dx, dy in shifts):
                boxes = {k: {**b, "box": [b["box"][0] - mid[0], b["box"][1] - mid[1], *b["box"][2:]]}
                         for k, b in boxes.items()}
        outside = []
        for node_id, b in boxes.items():
            if b["type"] == "Note":
                if any(overlaps(b["box"], g) for g in groups.values()):
                    outside.append(f"the Note {b['box']} overlaps a group")
                continue
            role = node_group(b["type"], comfy.object_info[b["type"]])
            if not inside(b["box"], groups[role]):
                outside.append(f"node {node_id} {b['type']} outside {role}: {b['box']} vs {groups[role]}")
        if outside and vue and not os.environ.get("REWARD_STEER_FRONTEND_ROOT"):
            # Known defect: the host's own older frontend (v0.3.75 ships 1.32.x) draws Vue nodes wider than the
            # saved sizes and off the groups; the layout is checked strictly with the newest frontend.
            page.screenshot(path=str(GRAPHS / f"{name}-{renderer}-host-frontend.png"))
            pytest.xfail(f"{name}: the host frontend's Vue renderer puts nodes outside their groups: {outside[:2]}")
        assert outside == [], f"{name}, {renderer}: {outside}"
        page.evaluate(FIT_VIEW_JS, 20)
        page.wait_for_timeout(300)
        page.screenshot(path=str(GRAPHS / f"{name}-{renderer}.png"))
        checked.append(renderer)
    assert "classic" in checked


def test_server_lists_the_example_workflows_as_the_packs_templates(comfy):  # noqa: F811
    listed = comfy.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == TEMPLATES, listed
    served = comfy.get(f"/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(DEMO_WORKFLOW.name)}")
    assert served == json.loads(DEMO_WORKFLOW.read_text())


# The image of the template card titled `title`: the smallest ancestor of the title's text that holds an <img>
# (the frontend loads thumbnails as blob: URLs, so the card, not the src, says whose image it is)
CARD_IMAGE_JS = """(title) => { const texts = Array.from(document.querySelectorAll('[role="dialog"] *'))
    .filter(e => e.children.length === 0 && e.textContent.trim() === title);
  for (const text of texts) { let card = text; while (card && !card.querySelector('img')) card = card.parentElement;
    const img = card && card.querySelector('img');
    if (img) return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight}; }
  return null; }"""


def test_thumbnails_are_served(comfy):  # noqa: F811
    """Every example has its workflows/<name>.jpg, served where the frontend asks (HTTP 200, a JPEG, the file)."""
    for name in TEMPLATES:
        path = REPO / "workflows" / f"{name}.jpg"
        assert path.exists(), f"no thumbnail for {name}: run scripts/make_thumbnails.py"
        url = f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(name)}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg", name
            assert response.read() == path.read_bytes(), name


def test_template_browser_shows_every_example_and_loads_one(browser, comfy):  # noqa: F811
    """The pack's category lists the demo first, then each example titled with its file name, with its own thumbnail
    loaded (the card's image is workflows/<name>.jpg at its 400 x 300, not the frontend's placeholder); choosing the
    demo loads it."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    thumbnails = {}     # the thumbnails the page fetched from the server, by file name -> HTTP status
    page.on("response", lambda r: thumbnails.update({urllib.parse.unquote(r.url.split(prefix)[1]): r.status})
            if prefix in r.url and r.url.endswith(".jpg") else None)
    prefix = f"/api/workflow_templates/{PACK_NAME}/"
    page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000)
    page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.wait_for_selector(f'[role="dialog"]:has-text("{PACK_NAME}")', timeout=30_000)
    dialog.wait_for_selector(f"text={PACK_NAME}", timeout=30_000).click()
    shown = page.wait_for_function("""(names) => { const order = Array.from(document.querySelectorAll(
        '[role="dialog"] *')).filter(e => e.children.length === 0 && names.includes(e.textContent.trim()))
        .map(e => e.textContent.trim()); return order.length > 0 && order; }""", arg=TEMPLATES,
        timeout=30_000).json_value()
    assert shown[0] == DEMO_WORKFLOW.stem, shown    # web/template_order.js: the demo first, whatever the disk order
    for name in TEMPLATES:   # each template's card, titled with its file name, its thumbnail loaded
        dialog.wait_for_selector(f"text={name}", timeout=30_000).scroll_into_view_if_needed()
        image = page.wait_for_function(f"(t) => {{ const i = ({CARD_IMAGE_JS})(t); return i && i.complete && "
                                       "i.width > 0 && i; }", arg=name, timeout=30_000).json_value()
        assert (image["width"], image["height"]) == (400, 300), (name, image)   # ours, not a placeholder
    assert sorted(thumbnails) == sorted(f"{name}.jpg" for name in TEMPLATES), thumbnails
    assert set(thumbnails.values()) == {200}, thumbnails
    dialog.query_selector(f"text={DEMO_WORKFLOW.stem}").scroll_into_view_if_needed()
    page.wait_for_timeout(1000)     # the cards fade their images in
    page.screenshot(path=str(REPO / "test-artifacts" / "template_browser.png"))
    dialog.wait_for_selector(f"text={DEMO_WORKFLOW.stem}", timeout=10_000).click()
    page.wait_for_selector(f'[role="dialog"]:has-text("{PACK_NAME}")', state="detached", timeout=30_000)
    types = page.wait_for_function("""() => { const nodes = window.comfyAPI.app.app.graph._nodes.map(n => n.type);
        return nodes.includes('RewardSteerKSamplerDemon') && nodes; }""", timeout=30_000).json_value()
    demo = json.loads(DEMO_WORKFLOW.read_text())
    assert sorted(types) == sorted(n["type"] for n in demo["nodes"])
    page.wait_for_timeout(500)
    # Frontends from 1.45 fit every template to the window whatever the file says (loadGraphData: source
    # "template" -> fitView); web/template_view.js puts the file's saved view (0.8) back, on every frontend.
    page.wait_for_timeout(1000)
    view = page.evaluate("""() => ({scale: window.comfyAPI.app.app.canvas.ds.scale,
                                    offset: Array.from(window.comfyAPI.app.app.canvas.ds.offset)})""")
    assert abs(view["scale"] - demo["extra"]["ds"]["scale"]) < 1e-6, view      # readable: 80 %, not fitted
    assert view["offset"] == demo["extra"]["ds"]["offset"], view
    (REPO / "test-artifacts" / "demo_from_template.json").write_text(json.dumps(view))
    page.screenshot(path=str(REPO / "test-artifacts" / "demo_from_template.png"))
    assert errors == []
    page.close()
