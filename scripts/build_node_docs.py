"""Writes the node help pages the ComfyUI frontend shows in its node-help panel: web/docs/<node id>.md, served at
/extensions/<pack folder>/docs/<node id>.md (the frontend first asks for docs/<node id>/<locale>.md, then this).
Each page: the hand-written summary and example (scripts/node_guides.py), the node's description, every input and
output with its tooltip (from the node's schema, as /object_info gives it) and, for reward loaders, the files they
need (rewards/model_files.py).  Run with a host's python; --check only reports pages that are out of date;
--model-table prints the README's table of reward files from the same source.

    .host/v0.28.2/venv/bin/python scripts/build_node_docs.py [--check | --model-table]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"
sys.path.insert(0, str(REPO / "scripts"))

from node_guides import FILES, GUIDES  # noqa: E402


def node_infos() -> dict:
    """{node id: the node's V1 info (what /object_info serves)}, from the pack as ComfyUI loads it."""
    sys.path.insert(0, str(REPO / "tests"))
    import harness
    from comfy_client import host_paths
    harness.bootstrap_comfy(host_paths()[1])
    pack = harness.import_pack()
    infos = {}
    for node in pack.nodes.load_node_classes():
        info = node.GET_SCHEMA().get_v1_info(node)
        infos[info.name] = info
    return infos


def type_name(io_type) -> str:
    return "COMBO" if isinstance(io_type, (list, tuple)) else str(io_type).replace(",", " or ")


def input_line(name: str, spec, optional: bool) -> str:
    io_type, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    label = options.get("display_name") or name
    facts = ([f"`{name}`"] if label != name else []) + [type_name(io_type)]
    if "default" in options and options["default"] not in ("", None):
        facts.append(f"default {options['default']!r}" if isinstance(options["default"], str)
                     else f"default {options['default']}")
    if optional:
        facts.append("optional")
    return f"- **{label}** ({', '.join(facts)}): {options.get('tooltip', '').strip()}"


def render(info, guide: dict, reward_folders: dict) -> str:
    lines = [f"# {info.display_name}", "", guide["summary"], "", info.description, "", "## Example", "",
             guide["example"], "", "## Inputs", ""]
    for section in ("required", "optional"):
        for name, spec in (info.input.get(section) or {}).items():
            lines.append(input_line(name, spec, section == "optional"))
    lines += ["", "## Outputs", ""]
    for name, io_type, tooltip in zip(info.output_name, info.output, info.output_tooltips or []):
        lines.append(f"- **{name}** ({type_name(io_type)}): {(tooltip or '').strip()}")
    for folder in FILES.get(info.name, []):
        entry = reward_folders[folder]
        lines += ["", f"## Files: models/{folder}", ""]
        lines += [f"- `{f.name}`: {f.what}, {f.size}; from {f.source}." for f in entry.files]
        lines += ["", f"{entry.layout} Differentiable: {entry.differentiable}. Weights' licence: {entry.licence}."]
    lines += ["", "---", "", f"Node id `{info.name}`, category `{info.category}`. This page is generated from the "
              "node's schema by scripts/build_node_docs.py.", ""]
    return "\n".join(lines)


def pages(infos: dict) -> dict[str, str]:
    """{file name: markdown} for every node."""
    import harness
    reward_folders = harness.pack_submodule("rewards.model_files").REWARD_FOLDERS
    missing = sorted(set(infos) - set(GUIDES))
    if missing:
        raise SystemExit(f"no hand-written guide in scripts/node_guides.py for {', '.join(missing)}")
    return {f"{name}.md": render(info, GUIDES[name], reward_folders) for name, info in sorted(infos.items())}


def model_files_table(reward_folders: dict) -> str:
    """The README's table: one row per reward folder (file, what it is, where to get it, folder, size,
    differentiable, licence)."""
    rows = ["| reward | file | what it is | where to get it | folder | size | differentiable | weights' licence |",
            "|---|---|---|---|---|---|---|---|"]
    for entry in reward_folders.values():
        for f in entry.files:
            rows.append(f"| {entry.reward} | `{f.name}` | {f.what} | {f.source} | `models/{entry.folder}` | {f.size} "
                        f"| {entry.differentiable} | {entry.licence} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report pages that differ; exit 1 if any")
    parser.add_argument("--model-table", action="store_true", help="print the README's table of reward files")
    args = parser.parse_args()
    if args.model_table:
        node_infos()   # imports the pack
        import harness
        print(model_files_table(harness.pack_submodule("rewards.model_files").REWARD_FOLDERS))
        return 0
    wanted = pages(node_infos())
    stale = [name for name, text in wanted.items()
             if not (DOCS / name).exists() or (DOCS / name).read_text(encoding="utf-8") != text]
    extra = sorted(p.name for p in DOCS.glob("*.md") if p.name not in wanted) if DOCS.exists() else []
    if args.check:
        for name in stale + extra:
            print(f"out of date: web/docs/{name}")
        return 1 if stale or extra else 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (DOCS / name).write_text(wanted[name], encoding="utf-8")
    for name in extra:
        (DOCS / name).unlink()
    print(f"{len(wanted)} pages in web/docs ({len(stale)} written, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
