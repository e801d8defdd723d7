"""Trace charts drawn with matplotlib (Agg, no display), returned as ComfyUI IMAGE tensors [1, H, W, 3] in 0..1.

matplotlib is imported inside the functions so the pack still loads without it; a plot then asks for it by name.
Each `*_figure` function returns the matplotlib Figure (tests read its axes); `to_image` rasterises it.
"""

from __future__ import annotations

import numpy as np
import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("reward steering trace plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def to_image(fig) -> torch.Tensor:
    """Rasterise a figure to an IMAGE [1, H, W, 3] float in 0..1 and close it."""
    plt = _pyplot()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float32)[..., :3] / 255.0
    plt.close(fig)
    return torch.from_numpy(rgba.copy())[None]


def _steps_axis(ax, steps: list[int], sigmas: list[float] | None) -> None:
    """Step on the x-axis; sigma at the same ticks on a secondary axis above, where the trace has it."""
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if sigmas and len(sigmas) == len(steps):
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        shown = list(range(0, len(steps), max(1, len(steps) // 8)))
        top.set_xticks([steps[i] for i in shown])
        top.set_xticklabels([f"{sigmas[i]:.3g}" for i in shown], fontsize=7)
        top.set_xlabel("sigma")


def _per_item_lines(ax, steps: list[int], rows: np.ndarray, label: str) -> None:
    """One thin line per batch item and a thick mean line; rows is [steps, batch]."""
    for b in range(rows.shape[1]):
        ax.plot(steps, rows[:, b], lw=1, alpha=0.6, label=f"item {b}", gid="item")
    ax.plot(steps, rows.mean(1), lw=2.5, color="black", label=f"{label} (batch mean)", gid="mean")


def _series(trace: list[dict], key: str) -> tuple[list[int], list[float], np.ndarray]:
    rows = [t for t in trace if key in t]
    return ([int(t["step"]) for t in rows], [float(t.get("sigma", np.nan)) for t in rows],
            np.asarray([t[key] for t in rows], dtype=np.float64).reshape(len(rows), -1) if rows
            else np.zeros((0, 0)))   # no steered / scored step (K = 1, one particle): an empty chart


def demon_figure(trace: list[dict], title: str, width_px: int = 640, height_px: int = 360):
    """Demon: the K candidates' mean reward per item and its batch mean, with the candidates' spread per step
    (their min to max reward, averaged over the batch) as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width_px / 100, height_px / 100), dpi=100)
    steps, sigmas, mean = _series(trace, "reward_mean")
    if not steps:
        ax.text(0.5, 0.5, "no steered steps", ha="center", transform=ax.transAxes)
    else:
        best = _series(trace, "reward_max")[2]
        worst = _series(trace, "reward_min")[2] if all("reward_min" in t for t in trace if "reward_mean" in t) \
            else mean  # traces saved before reward_min was recorded: the band runs from the candidates' mean
        ax.fill_between(steps, worst.mean(1), best.mean(1), alpha=0.2, color="tab:blue", gid="spread",
                        label="K candidates' min-max (batch mean)")
        _per_item_lines(ax, steps, mean, "candidate mean reward")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    _steps_axis(ax, steps, sigmas)
    if ax.get_legend_handles_labels()[0]:     # nothing scored (K = 1): no legend
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no steered step", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def smc_figure(trace: list[dict], title: str, ess_threshold: float | None = None, particles: int | None = None,
               width_px: int = 640, height_px: int = 560):
    """SMC: particle mean reward per item and the batch mean; below, ESS per item with the resampling threshold
    and each resampling event marked."""
    plt = _pyplot()
    fig, (ax, ax_ess) = plt.subplots(2, 1, figsize=(width_px / 100, height_px / 100), dpi=100, sharex=True)
    steps, sigmas, mean = _series(trace, "reward_mean")
    if steps:
        _per_item_lines(ax, steps, mean, "particle mean reward")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _steps_axis(ax, steps, sigmas)
    ax.set_xlabel("")
    ax.tick_params(labelbottom=True)
    ess_steps, _, ess = _series(trace, "ess")
    if ess_steps:
        _per_item_lines(ax_ess, ess_steps, ess, "ESS")
        if ess_threshold is not None and particles:
            ax_ess.axhline(ess_threshold * particles, ls="--", color="red", label="resampling threshold", gid="threshold")
        events = [(t["step"], e) for t in trace if "resampled" in t and "ess" in t
                  for r, e in zip(t["resampled"], t["ess"]) if r]
        if events:
            ax_ess.scatter(*zip(*events), marker="v", color="red", zorder=3, label="resampled", gid="resampled")
    ax_ess.set_ylabel("effective sample size")
    ax_ess.legend(fontsize=7, loc="best")
    ax_ess.set_xlabel("step")
    ax_ess.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def draw_panel(ax, title: str, series: dict[str, list[tuple]], xlabel: str = "step", ylabel: str = "reward",
               logx: bool = False, hlines: dict[str, float] | None = None, colours: dict[str, str] | None = None) -> None:
    """One line chart on `ax`: a line with markers per series ((x, y) points, or (x, y, standard error) drawn as
    error bars), optional labelled horizontal lines (a threshold, a noise floor), axis labels, grid and legend.
    The nodes' charts and the benchmarks' plots are drawn by this one function."""
    colours = colours or {}
    for name, values in series.items():
        if not values:
            continue
        values = sorted(values)
        xs, ys = [v[0] for v in values], [v[1] for v in values]
        errors = [v[2] for v in values] if all(len(v) > 2 for v in values) else None
        ax.errorbar(xs, ys, yerr=errors, marker="o", ms=3, capsize=2 if errors else 0, label=name,
                    color=colours.get(name))
    for label, y in (hlines or {}).items():
        ax.axhline(y, ls="--", color="grey", lw=1, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "nothing to plot", ha="center", transform=ax.transAxes)


def panels_figure(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], xlabel: str = "step",
                  ylabels: list[str] | None = None, width_px: int = 640, panel_height_px: int = 260):
    """Generic stacked line charts: each panel (title, {series name: [(x, y), ...]})."""
    return chart_figure([{"title": title, "series": series, "xlabel": xlabel,
                          "ylabel": ylabels[p] if ylabels else "reward"} for p, (title, series) in enumerate(panels)],
                        width_px=width_px, panel_height_px=panel_height_px)


def chart_figure(panels: list[dict], columns: int = 1, width_px: int = 640, panel_height_px: int = 260):
    """A grid of draw_panel charts, `columns` wide; each panel a dict of draw_panel's arguments."""
    plt = _pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width_px / 100, panel_height_px * rows / 100), dpi=100,
                             squeeze=False)
    for p, panel in enumerate(panels):
        draw_panel(axes[p // columns][p % columns], **panel)
    for p in range(len(panels), rows * columns):
        axes[p // columns][p % columns].set_visible(False)
    fig.tight_layout()
    return fig


def bars_figure(title: str, rows: list[tuple[str, dict[str, float]]], xlabel: str, vline: float | None = None,
                width_px: int = 900, value_format: str = "{:.2f}"):
    """Horizontal grouped bars (the benchmarks' cost charts): one group per row label, one bar per series, each
    labelled with its value; `vline` marks a reference value (1 = no overhead)."""
    plt = _pyplot()
    names = list(dict.fromkeys(k for _, values in rows for k in values))
    height = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(width_px / 100, (120 + 22 * len(rows) * max(1, len(names))) / 100), dpi=100)
    for j, name in enumerate(names):
        ys = [i + j * height for i in range(len(rows))]
        values = [values.get(name, np.nan) for _, values in rows]
        bars = ax.barh(ys, values, height=height * 0.9, label=name)
        ax.bar_label(bars, labels=[value_format.format(v) for v in values], fontsize=7, padding=2)
    ax.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    if vline is not None:
        ax.axvline(vline, color="black", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(names))   # below the bars
    fig.tight_layout()
    return fig


def save_figure(fig, path) -> None:
    """Write a figure to a PNG file and close it (the benchmarks' plots)."""
    plt = _pyplot()
    fig.savefig(path)
    plt.close(fig)
