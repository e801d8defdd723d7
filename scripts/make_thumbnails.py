#!/usr/bin/env python3
"""Write the template browser's thumbnails, workflows/<name>.jpg (the name every frontend asks a custom node pack
for: /api/workflow_templates/<pack>/<name>.jpg), 400 x 300.

- The reference-model examples' are their real outputs (a ComfyUI server runs them): the demo's same-seed images
  sampled plainly, with Demon and with SMC, one row each; the manual-pick example as it runs when nobody answers
  (its fallback colour reward steers); the VLM example judged by tests/scripted_vlm.py's stand-in judge (prefers red).
- The examples on real models need their model files, so theirs is a card drawn from the graph itself:
  the title, model -> steering -> reward in the graph's group colours, the steering's size (K, particles, n) and
  the files the graph loads.  No screenshot: a graph without its model files would show missing-model banners.

    .host/v0.28.2/venv/bin/python scripts/make_thumbnails.py            # all
    .host/v0.28.2/venv/bin/python scripts/make_thumbnails.py --cards    # the cards only (no server)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_workflows import NOTES, WORKFLOWS, api_graph  # noqa: E402
from comfy_client import (DEMO_WORKFLOW, GROUPS, MANUAL_PICK_WORKFLOW, MODEL_FILE_SUFFIXES, REPO,  # noqa: E402
                          ComfyServer, ui_to_api)

sys.path.insert(0, str(REPO / "tests"))
from scripted_vlm import ScriptedVLM  # noqa: E402

VLM_WORKFLOW = REPO / "workflows" / "Reference model + Demon, a VLM judges.json"

SIZE = (400, 300)
BACKGROUND = (32, 32, 32)
DEMO_ROWS = [("plain", "plain"), ("Demon", "demon_0"), ("SMC / FK", "fk_0")]
# the steering node's size, as the card states it
STEERING_SIZE = {"RewardSteerKSamplerDemon": ("k", "K = {}"), "RewardSteerDemonSampler": ("k", "K = {}"),
                 "RewardSteerKSamplerSMC": ("particles", "{} particles"),
                 "RewardSteerSMCSampler": ("particles", "{} particles"), "RewardSteerBestOfN": ("n", "n = {}")}


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:   # no DejaVu on this machine: Pillow's own scalable font
        return ImageFont.load_default(size)


def wrap(text: str, face: ImageFont.ImageFont, width: int, sep: str = " ") -> list[str]:
    """Lines of `text` no wider than `width` px, broken at `sep`."""
    lines: list[str] = []
    for word in text.split(sep):
        if lines and face.getlength(lines[-1] + sep + word) <= width:
            lines[-1] += sep + word
        else:
            lines.append(word)
    return lines


def save_jpeg(img: Image.Image, path: Path) -> None:
    img = img.convert("RGB")
    img.thumbnail(SIZE)
    card = Image.new("RGB", SIZE, BACKGROUND)
    card.paste(img, ((SIZE[0] - img.width) // 2, (SIZE[1] - img.height) // 2))
    card.save(path, "JPEG", quality=85, optimize=True)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def demo_thumbnail(server: ComfyServer, output_dir: Path, info: dict) -> Image.Image:
    """Rows of the demo's first 8 images per method, labelled."""
    workflow = json.loads(DEMO_WORKFLOW.read_text())
    server.run(ui_to_api(workflow, info), timeout=900)
    folder = output_dir / "reward_steering_demo"
    tile, label_w = 64, 80
    card = Image.new("RGB", (label_w + 8 * tile, tile * len(DEMO_ROWS)), BACKGROUND)
    draw = ImageDraw.Draw(card)
    for row, (label, prefix) in enumerate(DEMO_ROWS):
        files = sorted(p for p in folder.glob(f"{prefix}*.png") if "trace" not in p.name)[:8]
        if not files:
            raise RuntimeError(f"the demo wrote no {prefix}* images in {folder}")
        for col, path in enumerate(files):
            card.paste(Image.open(path).convert("RGB").resize((tile, tile)), (label_w + col * tile, row * tile))
        draw.text((6, row * tile + tile // 2 - 6), label, fill="white")
    return card


def model_files(graph: dict) -> list[str]:
    return sorted({v for node in graph.values() for v in node["inputs"].values()
                   if isinstance(v, str) and v.endswith(MODEL_FILE_SUFFIXES)})


def graph_card(filename: str) -> Image.Image:
    """model -> steering -> reward, from the file's title (`<model> + <steering>, <reward>`) and its graph."""
    title = Path(filename).stem
    graph = api_graph(filename)
    model, rest = title.split(" + ", 1)
    steering, reward = rest.split(", ", 1)
    size = next((fmt.format(node["inputs"][key]) for node in graph.values()
                 if (spec := STEERING_SIZE.get(node["class_type"])) for key, fmt in [spec]), "")
    card = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(card)
    y = 14
    for line in wrap(title, font(22, bold=True), SIZE[0] - 32):
        draw.text((16, y), line, font=font(22, bold=True), fill="white")
        y += 28
    boxes = [("model", model, ""), ("steering", steering, size), ("reward", reward, "")]
    w, gap, top = 112, 10, max(y + 14, 84)
    for i, (group, name, detail) in enumerate(boxes):
        x = 16 + i * (w + gap)
        draw.rounded_rectangle((x, top, x + w, top + 92), radius=8, fill=GROUPS[group])
        draw.text((x + 8, top + 6), group, font=font(12), fill=(235, 235, 235))
        lines = wrap(name, font(14, bold=True), w - 14)[:3] + ([detail] if detail else [])
        for j, line in enumerate(lines):
            draw.text((x + 8, top + 26 + 16 * j), line, font=font(14, bold=j < len(lines) - bool(detail)),
                      fill="white")
        if i < 2:
            draw.polygon([(x + w + 2, top + 40), (x + w + gap - 2, top + 46), (x + w + 2, top + 52)], fill="white")
    y = top + 106
    description = NOTES[filename][1]
    for line in wrap(description, font(14), SIZE[0] - 32)[:2]:
        draw.text((16, y), line, font=font(14), fill=(220, 220, 220))
        y += 19
    files = model_files(graph)
    needs = "needs: " + ", ".join(files) if files else "needs no model files"
    for line in wrap(needs, font(12), SIZE[0] - 32, sep=", ")[:4]:
        draw.text((16, y + 4), line, font=font(12), fill=(170, 170, 170))
        y += 16
    return card


def output_thumbnail(server: ComfyServer, output_dir: Path, info: dict, workflow_path: Path, caption: str,
                     vlm_url: str | None = None) -> Image.Image:
    """A reference-model example's own saved images (its batch, side by side) over a one-line caption."""
    api = ui_to_api(json.loads(workflow_path.read_text()), info)
    for node in api.values():
        if vlm_url and "base_url" in node["inputs"]:
            node["inputs"]["base_url"] = vlm_url
        if node["class_type"] == "SaveImage":
            slug = "".join(c if c.isalnum() else "_" for c in workflow_path.stem)
            node["inputs"]["filename_prefix"] = f"thumbnail_{slug}/out"
            prefix = node["inputs"]["filename_prefix"]
    server.run(api, timeout=900)
    files = sorted((output_dir / prefix).parent.glob("out*.png"))
    if not files:
        raise RuntimeError(f"{workflow_path.name} saved no images under {output_dir / prefix}")
    tile = min(SIZE[0] // len(files), 240)
    card = Image.new("RGB", (tile * len(files), tile + 28), BACKGROUND)
    for col, path in enumerate(files):
        card.paste(Image.open(path).convert("RGB").resize((tile, tile)), (col * tile, 0))
    ImageDraw.Draw(card).text((6, tile + 8), caption, fill="white", font=font(13))
    return card


def main() -> int:
    real_runs = {DEMO_WORKFLOW.name, MANUAL_PICK_WORKFLOW.name, VLM_WORKFLOW.name}
    for filename in WORKFLOWS:
        if filename not in real_runs:
            save_jpeg(graph_card(filename), (REPO / "workflows" / filename).with_suffix(".jpg"))
    if "--cards" in sys.argv:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "output"
        with ComfyServer(output_dir=out) as server:
            info = server.get("/object_info", timeout=120)
            save_jpeg(demo_thumbnail(server, out, info), DEMO_WORKFLOW.with_suffix(".jpg"))
            save_jpeg(output_thumbnail(server, out, info, MANUAL_PICK_WORKFLOW,
                                       "nobody picked: the fallback (redness) steered"),
                      MANUAL_PICK_WORKFLOW.with_suffix(".jpg"))
            judge = ScriptedVLM()
            try:
                save_jpeg(output_thumbnail(server, out, info, VLM_WORKFLOW,
                                           "judged by a stand-in VLM that prefers red", vlm_url=judge.url),
                          VLM_WORKFLOW.with_suffix(".jpg"))
            finally:
                judge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
