#!/usr/bin/env python3
"""Write the template browser's thumbnails, workflows/<name>.jpg (the name every frontend asks a custom node pack
for: /api/workflow_templates/<pack>/<name>.jpg).  The demo's is its real output: the same seed's images sampled
plainly, with Demon and with SMC on the reference model, one row each.  The others need model files (or a person,
or a VLM server), so theirs is the graph itself as the page draws it.  Needs the browser set-up
(scripts/setup_browser.sh).

    .host/v0.28.2/venv/bin/python scripts/make_thumbnails.py
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_workflows import FIT_VIEW_JS, load_in_renderer  # noqa: E402
from comfy_client import REPO, ComfyServer, ui_to_api  # noqa: E402

SIZE = (400, 300)
DEMO_ROWS = [("plain", "plain"), ("Demon", "demon_0"), ("SMC / FK", "fk_0")]


def save_jpeg(img: Image.Image, path: Path) -> None:
    img = img.convert("RGB")
    img.thumbnail(SIZE)
    card = Image.new("RGB", SIZE, (32, 32, 32))
    card.paste(img, ((SIZE[0] - img.width) // 2, (SIZE[1] - img.height) // 2))
    card.save(path, "JPEG", quality=80, optimize=True)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def demo_thumbnail(server: ComfyServer, output_dir: Path, info: dict) -> Image.Image:
    """Rows of the demo's first 8 images per method, labelled."""
    workflow = json.loads((REPO / "workflows" / "demo_reference.json").read_text())
    server.run(ui_to_api(workflow, info), timeout=900)
    folder = output_dir / "reward_steering_demo"
    tile, label_w = 64, 80
    card = Image.new("RGB", (label_w + 8 * tile, tile * len(DEMO_ROWS)), (32, 32, 32))
    draw = ImageDraw.Draw(card)
    for row, (label, prefix) in enumerate(DEMO_ROWS):
        files = sorted(p for p in folder.glob(f"{prefix}*.png") if "trace" not in p.name)[:8]
        if not files:
            raise RuntimeError(f"the demo wrote no {prefix}* images in {folder}")
        for col, path in enumerate(files):
            card.paste(Image.open(path).convert("RGB").resize((tile, tile)), (label_w + col * tile, row * tile))
        draw.text((6, row * tile + tile // 2 - 6), label, fill="white")
    return card


def graph_thumbnail(page, workflow: dict) -> Image.Image:
    load_in_renderer(page, workflow, vue=False)
    page.evaluate(FIT_VIEW_JS, 10)
    page.wait_for_timeout(300)
    return Image.open(io.BytesIO(page.screenshot()))


def main() -> int:
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as tmp:
        user, out = Path(tmp) / "user", Path(tmp) / "output"
        (user / "default").mkdir(parents=True)
        (user / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        with ComfyServer(output_dir=out, extra_args=["--user-directory", str(user)]) as server, \
                sync_playwright() as p:
            info = server.get("/object_info", timeout=120)
            save_jpeg(demo_thumbnail(server, out, info), REPO / "workflows" / "demo_reference.jpg")
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?."
                                   "registered_node_types?.RewardSteerKSamplerDemon", timeout=120_000)
            page.wait_for_timeout(500)
            page.keyboard.press("Escape")
            for path in sorted((REPO / "workflows").glob("*.json")):
                if path.stem != "demo_reference":
                    save_jpeg(graph_thumbnail(page, json.loads(path.read_text())), path.with_suffix(".jpg"))
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
