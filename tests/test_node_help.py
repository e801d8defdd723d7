"""Every node has a help page (web/docs/<node id>.md) that matches its schema: regenerated here from the nodes as
ComfyUI loads them (scripts/build_node_docs.py), it must equal the file, so an input added, renamed or
re-documented without regenerating fails.  The server serves each page where the frontend's node-help panel asks
for it (/extensions/<pack folder>/docs/<node id>.md, not as HTML)."""
from __future__ import annotations

import urllib.request

import harness
from comfy_client import REPO

import build_node_docs


def test_help_pages_match_the_node_schemas():
    infos = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().get_v1_info(node)
             for node in harness.pack_submodule("nodes").load_node_classes()}
    wanted = build_node_docs.pages(infos)
    assert len(wanted) == len(infos) >= 20
    stale = [name for name, text in wanted.items()
             if not (build_node_docs.DOCS / name).exists() or (build_node_docs.DOCS / name).read_text() != text]
    assert not stale, (f"out of date: {stale}; run `python scripts/build_node_docs.py` with a host's python")
    for name, info in infos.items():
        page = wanted[f"{name}.md"]
        for section in ("required", "optional"):
            for input_name, spec in (info.input.get(section) or {}).items():
                assert f"**{spec[1].get('display_name') or input_name}**" in page, (name, input_name)
                assert spec[1]["tooltip"].strip() in page, (name, input_name)
        for output_name in info.output_name:
            assert f"- **{output_name}**" in page, (name, output_name)
        assert "## Example" in page and info.description in page
    assert sorted(p.name for p in build_node_docs.DOCS.glob("*.md")) == sorted(wanted)


def test_server_serves_each_page_where_the_help_panel_asks(server):
    pack_nodes = [name for name, info in server.object_info.items()
                  if info.get("python_module") == f"custom_nodes.{harness.PACK_LINK_NAME}"]
    assert len(pack_nodes) >= 20
    for name in pack_nodes:
        # the frontend: /extensions/<second part of python_module>/docs/<node id>.md
        with urllib.request.urlopen(f"{server.url}/extensions/{harness.PACK_LINK_NAME}/docs/{name}.md") as reply:
            assert "text/html" not in reply.headers.get("Content-Type", ""), reply.headers
            assert reply.read().decode() == (REPO / "web" / "docs" / f"{name}.md").read_text()
