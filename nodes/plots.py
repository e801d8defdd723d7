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
    ax.legend(fontsize=7, loc="best")
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


def panels_figure(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], xlabel: str = "step",
                  ylabels: list[str] | None = None, width_px: int = 640, panel_height_px: int = 260):
    """Generic stacked line charts: each panel (title, {series name: [(x, y), ...]})."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_px / 100, panel_height_px * len(panels) / 100), dpi=100,
                             squeeze=False)
    for p, (title, series) in enumerate(panels):
        ax = axes[p][0]
        for name, values in series.items():
            if values:
                ax.plot(*zip(*values), marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabels[p] if ylabels else "reward")
        ax.grid(True, alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "nothing to plot", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig
