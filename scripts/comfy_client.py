"""Talking to a real ComfyUI: start a headless server, queue prompts over HTTP, and convert / check UI-format
workflow files against the server's /object_info.  Used by the demo (run_demo.py) and the tests.  Only the
standard library, so it runs under any Python."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The example files' names are their titles in ComfyUI's template browser (it shows a custom pack's file stems)
DEMO_WORKFLOW = REPO / "workflows" / "Start here, Demon and SMC vs plain (no downloads).json"
MANUAL_PICK_WORKFLOW = REPO / "workflows" / "Reference model + Demon, you pick.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Example workflows name the user's model files, which a test host does not have: such values are not
# checked against the (empty) file lists.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
# Nodes that exist only in the page (no /object_info entry, never part of a prompt).
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def host_paths() -> tuple[Path, Path]:
    """(python, ComfyUI folder) of the host: COMFYUI_DIR / COMFYUI_PYTHON, else the newest one setup_host.py
    built (.host/v<version>/)."""
    if os.environ.get("COMFYUI_DIR"):
        return Path(os.environ.get("COMFYUI_PYTHON") or sys.executable), Path(os.environ["COMFYUI_DIR"])
    root = Path(os.environ.get("REWARD_STEER_HOST", REPO / ".host"))
    built = [d for d in root.glob("v*") if (d / "ComfyUI" / "main.py").exists() and (d / "venv").is_dir()]
    for d in built:   # run with a host's own python (.host/v0.3.75/venv/bin/python bench/...): that host
        if Path(sys.prefix).resolve() == (d / "venv").resolve():
            return d / "venv" / "bin" / "python", d / "ComfyUI"
    version = lambda d: tuple(int(p) for p in d.name[1:].split(".") if p.isdigit())  # noqa: E731
    host = max(built, key=version) if built else root / "v0.3.75"
    return host / "venv" / "bin" / "python", host / "ComfyUI"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`main.py --cpu` on a free 127.0.0.1 port as a subprocess; use as a context manager."""

    def __init__(self, output_dir: Path | None = None, extra_args: list[str] | None = None,
                 log_path: Path | None = None, startup_timeout: float = 180.0, env: dict | None = None):
        self.python, self.comfy_dir = host_paths()
        self.env = env  # merged into os.environ for the server process
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = output_dir
        self.extra_args = extra_args or []
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"comfyui-{self.port}.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch"] + self.extra_args
        if self.output_dir is not None:
            cmd += ["--output-directory", str(self.output_dir)]
        if os.environ.get("REWARD_STEER_FRONTEND_ROOT"):  # another frontend than the host's pinned one (tests)
            cmd += ["--front-end-root", os.environ["REWARD_STEER_FRONTEND_ROOT"]]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env} if self.env else None)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s; log: {self.log_path}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise RuntimeError(f"POST {path} -> HTTP {e.code}: {body}") from None

    def queue(self, api_prompt: dict, client_id: str | None = None) -> str:
        # no client id unless given: a made-up one names a page that never connects, and nodes that talk to the
        # page (manual pick) would wait for it; without one ComfyUI runs the prompt unattended (events broadcast)
        payload = {"prompt": api_prompt}
        if client_id is not None:
            payload["client_id"] = client_id
        reply = self.post("/prompt", payload)
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt finishes; return its history entry (raises on execution errors)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(errors)[:2000]}")
                if status.get("completed", True):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt; log:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, api_prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(api_prompt), timeout)


# ---- UI-format workflows -------------------------------------------------------------------------------------

def _input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) for every input of a node type, in widget order."""
    spec = info["input"]
    order = info.get("input_order") or {sec: list(spec.get(sec, {})) for sec in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec[section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}))
    return out


def _is_widget(io_type, options: dict) -> bool:
    return (isinstance(io_type, list) or io_type in WIDGET_TYPES) and not options.get("forceInput")


def _has_control_value(name: str, io_type, options: dict) -> bool:
    # The frontend stores "fixed/increment/randomize" right after such a widget's value.
    return io_type == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def _types_match(output_type: str, input_type) -> bool:
    if isinstance(input_type, list):
        return output_type in ("COMBO", "*")
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(str(input_type).split(",")))


def validate_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems of a UI-format workflow against /object_info: unknown node types, unknown inputs, link types that
    do not match, unlinked required inputs, widget value counts.  Empty list = valid."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, ltype = link[:6]
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} -> {dst}")
            continue
        src_info = object_info.get(nodes[src]["type"])
        if src_info is not None:
            outputs = src_info["output"]
            if src_slot >= len(outputs):
                problems.append(f"link {link_id}: {nodes[src]['type']} has no output slot {src_slot}")
            elif outputs[src_slot] != ltype and "*" not in (outputs[src_slot], ltype):
                problems.append(f"link {link_id}: {nodes[src]['type']} output {src_slot} is {outputs[src_slot]}, "
                                f"link says {ltype}")
    for node in nodes.values():
        ntype = node["type"]
        if ntype in VIRTUAL_NODE_TYPES:
            continue
        info = object_info.get(ntype)
        if info is None:
            problems.append(f"node {node['id']}: unknown node type {ntype!r} (not in /object_info)")
            continue
        specs = {name: (t, o) for name, t, o in _input_specs(info)}
        required = set(info["input"].get("required", {}))
        linked = set()
        for inp in node.get("inputs", []):
            name = inp["name"]
            if name not in specs:
                problems.append(f"node {node['id']} ({ntype}): no input named {name!r}")
                continue
            if inp.get("link") is not None:
                linked.add(name)
                link = next((l for l in workflow["links"] if l[0] == inp["link"]), None)
                if link is None:
                    problems.append(f"node {node['id']} ({ntype}): input {name} uses missing link {inp['link']}")
                elif not _types_match(link[5], specs[name][0]):
                    problems.append(f"node {node['id']} ({ntype}): input {name} expects {specs[name][0]}, "
                                    f"linked to {link[5]}")
        widgets = [(n, t, o) for n, t, o in _input_specs(info) if _is_widget(t, o)]
        for name, (t, o) in specs.items():
            if name in required and not _is_widget(t, o) and name not in linked:
                problems.append(f"node {node['id']} ({ntype}): required input {name} is not linked")
        values = node.get("widgets_values", [])
        if isinstance(values, list):
            expected = sum(1 + _has_control_value(n, t, o) for n, t, o in widgets)
            if len(values) != expected:
                problems.append(f"node {node['id']} ({ntype}): {len(values)} widget values, expected {expected} "
                                f"for {[n for n, _, _ in widgets]}")
            else:
                for (name, t, o), value in zip(widgets, _widget_values(widgets, values)):
                    if isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES):
                        continue
                    if isinstance(t, list) and value not in t:
                        problems.append(f"node {node['id']} ({ntype}): {name}={value!r} is not one of {t}")
                    if t == "COMBO" and "options" in o and value not in o["options"]:
                        problems.append(f"node {node['id']} ({ntype}): {name}={value!r} is not one of {o['options']}")
    return problems


def _widget_values(widgets, values):
    it = iter(values)
    out = []
    for name, t, o in widgets:
        out.append(next(it))
        if _has_control_value(name, t, o):
            next(it)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (what users save and load) to the API format POSTed to /prompt."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODE_TYPES:   # the page's own nodes: never sent to the server
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; the converter only handles "
                             "active nodes")
        info = object_info[node["type"]]
        inputs = {}
        widgets = [(n, t, o) for n, t, o in _input_specs(info) if _is_widget(t, o)]
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            inputs.update({n: values[n] for n, _, _ in widgets if n in values})
        else:
            inputs.update({n: v for (n, _, _), v in zip(widgets, _widget_values(widgets, values))})
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, src_slot, _, _, _ = links[inp["link"]][:6]
                if src not in nodes:
                    raise ValueError(f"link {inp['link']} comes from missing node {src}")
                inputs[inp["name"]] = [str(src), src_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


# ---- layout of generated workflows ------------------------------------------------------------------------------
# The page draws a node's title bar above its `pos` (LiteGraph's NODE_TITLE_HEIGHT) and never shrinks a node below
# the size its widgets need; a larger saved size is kept.  So a layout that saves, for every node, at least the
# size the frontends need (measured in the browser, scripts/node_sizes.json) is what both renderers draw.
TITLE_HEIGHT = 30
NODE_GAP, COLUMN_GAP, GROUP_GAP = 30, 40, 70
GROUP_PAD, GROUP_TITLE = 20, 50
MAX_COLUMN_HEIGHT = 1100
NODE_SIZES = REPO / "scripts" / "node_sizes.json"
GROUPS = {"model": "#3f789e", "reward": "#a1309b", "steering": "#b06634", "output": "#88a"}
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
STEERING_OUTPUTS = {"SAMPLER", "GUIDER", "NOISE", "SIGMAS"}
# Room beyond the measured size for what a run adds: image previews, the text a node shows after a run.
ROOM = {"SaveImage": [300, 280], "PreviewImage": [300, 280], "RewardSteerScoreImages": [300, 330],
        "RewardSteerReferenceExactTarget": [300, 220]}
OUTPUT_NODES = {"VAEDecode", "RewardSteerScoreImages", "RewardSteerReferenceExactTarget"}


def node_group(class_type: str, info: dict) -> str:
    """Which of the example groups a node belongs in: model, reward, steering or output."""
    outputs = set(info.get("output", []))
    if class_type in OUTPUT_NODES:
        return "output"
    if "REWARD" in outputs or class_type in ("RewardSteerLoadOpenClip", "CLIPVisionLoader"):
        return "reward"
    if outputs & STEERING_OUTPUTS or "Sampler" in class_type or "BestOfN" in class_type:
        return "steering"
    return "output" if info.get("output_node") else "model"


def _estimated_size(info: dict) -> list[int]:
    """A generous size for a node type that node_sizes.json does not list (classic renderer's rule of thumb)."""
    specs = _input_specs(info)
    widgets = [(n, t, o) for n, t, o in specs if _is_widget(t, o)]
    slots = max(len(specs) - len(widgets), len(info.get("output", [])))
    multiline = sum(1 for _, t, o in widgets if t == "STRING" and o.get("multiline"))
    return [360, 40 + 24 * slots + 32 * len(widgets) + 90 * multiline]


def _node_sizes() -> dict:
    return json.loads(NODE_SIZES.read_text()) if NODE_SIZES.exists() else {}


def _topological(api: dict) -> list[str]:
    """Node keys, each after every node it reads from (stable in the graph's own order otherwise)."""
    done, order = set(), []

    def visit(key):
        if key in done:
            return
        done.add(key)
        for value in api[key]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in api:
                visit(value[0])
        order.append(key)
    for key in api:
        visit(key)
    return order


def layout(api: dict, object_info: dict, note_size: list[int] | None = None) -> tuple[dict, list[dict], list]:
    """Positions and sizes of the nodes, in groups laid out left to right (model, reward, steering, output), each
    group's nodes in columns of at most MAX_COLUMN_HEIGHT; a Note (note_size) first, left of the groups.
    Returns ({key: (pos, size)}, groups, note (pos, size) or None)."""
    sizes = _node_sizes()
    members = {g: [] for g in GROUPS}
    for key in _topological(api):
        ctype = api[key]["class_type"]
        members[node_group(ctype, object_info[ctype])].append(key)
    placed, groups = {}, []
    x = 0
    note = None
    if note_size is not None:
        note = ([x, TITLE_HEIGHT], note_size)
        x += note_size[0] + GROUP_GAP
    for name, keys in members.items():
        if not keys:
            continue
        left, top = x + GROUP_PAD, GROUP_TITLE + TITLE_HEIGHT
        col_x, y, col_w = left, top, 0
        for key in keys:
            ctype = api[key]["class_type"]
            w, h = sizes.get(ctype) or _estimated_size(object_info[ctype])
            room = ROOM.get(ctype, [0, 0])
            w, h = max(w, room[0]), max(h, room[1])
            if y > top and y + h > top + MAX_COLUMN_HEIGHT:   # a new column
                col_x, y, col_w = col_x + col_w + COLUMN_GAP, top, 0
            placed[key] = ([col_x, y], [w, h])
            y += h + TITLE_HEIGHT + NODE_GAP
            col_w = max(col_w, w)
        right = col_x + col_w + GROUP_PAD
        bottom = max(p[1] + s[1] for k, (p, s) in placed.items() if k in keys) + GROUP_PAD
        groups.append({"id": len(groups) + 1, "title": name, "bounding": [x, 0, right - x, bottom],
                       "color": GROUPS[name], "font_size": 24, "flags": {}})
        x = right + GROUP_GAP
    return placed, groups, note


def api_to_ui(api: dict, object_info: dict, note: str | None = None, description: str | None = None) -> dict:
    """Lay out an API-format prompt as a UI-format workflow (for files in workflows/): nodes in the groups
    "model", "reward", "steering" and "output", a Note node with `note` (last in the node list), and `description`
    saved in the workflow's `extra`."""
    nodes, links = [], []
    ids = {k: int(k) for k in api}
    out_links: dict[tuple[int, int], list[int]] = {}
    for key, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(links) + 1
                src = ids[value[0]]
                ltype = object_info[api[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, src, value[1], ids[key], None, ltype])
                out_links.setdefault((src, value[1]), []).append(link_id)
    note_size = [420, 40 + 19 * sum(1 + len(line) // 52 for line in note.splitlines())] if note else None
    placed, groups, note_place = layout(api, object_info, note_size)
    for index, (key, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        specs = _input_specs(info)
        inputs, values = [], []
        for name, t, o in specs:
            value = node["inputs"].get(name)
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_link:
                link = next(l for l in links if l[3] == ids[key] and l[4] is None)
                link[4] = len(inputs)
                entry = {"name": name, "type": link[5] if not _is_widget(t, o) else t if isinstance(t, str) else "COMBO",
                         "link": link[0]}
                if _is_widget(t, o):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(t, o):
                if name in info["input"].get("required", {}):
                    raise ValueError(f"node {key} ({node['class_type']}): required input {name} is not connected")
                continue
            if _is_widget(t, o):
                values.append(o.get("default") if is_link or value is None else value)
                if _has_control_value(name, t, o):
                    values.append("fixed")
        outputs = [{"name": info["output_name"][i], "type": t, "slot_index": i,
                    "links": out_links.get((ids[key], i), [])} for i, t in enumerate(info["output"])]
        pos, size = placed[key]
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": pos, "size": size, "flags": {},
                      "order": index, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": values,
                      **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {})})
    last_id = max(ids.values())
    if note:
        last_id += 1
        nodes.append({"id": last_id, "type": "Note", "title": "About this workflow", "pos": note_place[0],
                      "size": note_place[1], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                      "outputs": [], "properties": {}, "widgets_values": [note], "color": NOTE_COLOR,
                      "bgcolor": NOTE_BGCOLOR})
    # reward_steering_template: web/template_view.js opens the file at this view from the template browser too
    extra = {"ds": {"scale": 0.8, "offset": [110, 110]}, "reward_steering_template": True}
    if description:
        extra["description"] = description
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": extra, "version": 0.4}
