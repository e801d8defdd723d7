"""The benchmarks' plots, drawn by the same chart code as the nodes' trace plots (nodes/plots.py: matplotlib, axes
with ticks and labels, standard errors as error bars).  Each function takes a benchmark's JSON report and writes a
PNG, so a plot can be redrawn from its JSON without re-running the benchmark:

    .host/v0.3.75/venv/bin/python bench/plotting.py      # every bench/results/*.json that has a plot
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# nodes/plots.py needs only numpy, torch and matplotlib: loaded from its file, so redrawing needs no ComfyUI
_spec = importlib.util.spec_from_file_location("reward_steering_plots", REPO / "nodes" / "plots.py")
charts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(charts)

CALLS = "model calls per image"


def family_colours(report: dict) -> dict[str, str]:
    """One colour per method, the same in every panel of a plot."""
    names = [r["family"] for rows in report["reward_vs_calls"].values() for r in rows]
    names += [r["method"] for r in report.get("law_error", {}).get("rows", []) if "method" in r]
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


def reward_vs_calls_panels(reward_vs_calls: dict, colours: dict[str, str] | None = None) -> list[dict]:
    """One panel per reward: mean final reward (± SE) against model calls per image, a line per method family."""
    panels = []
    for reward_name, rows in reward_vs_calls.items():
        series: dict[str, list[tuple]] = {}
        for r in rows:
            series.setdefault(r["family"], []).append(
                (r["model_calls_per_image"], r["mean_reward"], r.get("standard_error", 0.0)))
        panels.append({"title": f"{reward_name}: mean final reward vs calls", "series": series, "xlabel": CALLS,
                       "ylabel": "mean final reward (± SE)", "logx": True, "colours": colours})
    return panels


def demon_plot(report: dict, path: Path) -> None:
    panels = reward_vs_calls_panels(report["reward_vs_calls"])
    charts.save_figure(charts.chart_figure(panels, columns=2, width_px=1400, panel_height_px=480), path)


def smc_plot(report: dict, path: Path) -> None:
    law = report["law_error"]
    panels = reward_vs_calls_panels(report["reward_vs_calls"]) + [{
        "title": f"error of the sampled law (λ {law['lambda']:g}, {law['populations']} populations)",
        "series": {"FK weighted draw": [(r["particles"], r["fk_tv"]) for r in law["rows"]],
                   "best-of-N + importance resampling": [(r["particles"], r["importance_resampling_tv"])
                                                         for r in law["rows"]]},
        "hlines": {"noise floor (exact draws)": law["noise_floor_tv"]},
        "xlabel": "particles (N)", "ylabel": "total variation to the exact tilted law", "logx": True}]
    charts.save_figure(charts.chart_figure(panels, columns=2, width_px=1400, panel_height_px=450), path)


def frontier_plot(report: dict, path: Path) -> None:
    law = report["law_error"]
    series: dict[str, list[tuple]] = {}
    for r in law["rows"]:
        series.setdefault(r["method"], []).append((r["model_calls_per_image"], r["tv"]))
    colours = family_colours(report)
    panels = reward_vs_calls_panels(report["reward_vs_calls"], colours) + [{
        "title": f"error of the sampled law (λ {law['lambda']:g}, {law['populations']} populations)",
        "series": series, "colours": colours, "hlines": {"noise floor (exact draws)": law["noise_floor_tv"]}, "xlabel": CALLS,
        "ylabel": "total variation to the exact tilted law", "logx": True}]
    charts.save_figure(charts.chart_figure(panels, columns=2, width_px=1400, panel_height_px=480), path)


def rewards_plot(report: dict, path: Path) -> None:
    n = report.get("images", 16)
    rows = [(name, {f"one batch of {n}": r["batched_seconds"] / n * 1000,
                    "one at a time": r["one_at_a_time_seconds"] / n * 1000})
            for name, r in report["results"].items()]
    charts.save_figure(charts.bars_figure(f"reward cost per image, {n} images ({report.get('device', 'cpu')})", rows,
                                          "ms per image", value_format="{:.0f}"), path)


def gpu_plot(report: dict, path: Path) -> None:
    rows = [(f"{name.split(':', 1)[1]}: {r['sampler']} n={r['n']} {r['decoder']}",
             {"overhead (1 = none)": r["overhead_ratio"],
              "share of peak items/s in candidate calls (goal ≥ 0.9)": r["throughput_share_candidate_calls"]})
            for name, sec in report["sections"].items() if name.startswith("steering:") and isinstance(sec, dict)
            for r in sec.get("rows", [])]
    if rows:
        charts.save_figure(charts.bars_figure("steering cost against plain sampling", rows, "ratio", vline=1.0,
                                              width_px=1100), path)


PLOTS = {"demon": demon_plot, "smc": smc_plot, "frontier": frontier_plot, "rewards": rewards_plot,
         "gpu_bench": gpu_plot, "cpu_fullsize_sd15": gpu_plot, "cpu_fullsize_sd15_rerun": gpu_plot}


def main() -> int:
    results = REPO / "bench" / "results"
    for stem, plot in PLOTS.items():
        source = results / f"{stem}.json"
        if source.exists():
            plot(json.loads(source.read_text()), source.with_suffix(".png"))
            print(f"drew {source.with_suffix('.png').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
