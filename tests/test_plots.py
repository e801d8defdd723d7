"""Trace plots are matplotlib charts: axes with ticks and labels, one line per batch item plus the mean, SMC's ESS
with its threshold and resampling events, Demon's candidate spread; the node's IMAGE is that chart rasterised."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import harness
from test_demon import ksampler_demon_prompt
from test_smc import smc_node_inputs

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
BATCH = 3


def plots():
    return harness.pack_submodule("nodes.plots")


def data_lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def assert_readable_axes(ax, xlabel, ylabel):
    assert ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel
    assert len(ax.get_yticks()) >= 3 and len(ax.get_xticks()) >= 3
    fig = ax.figure
    fig.canvas.draw()
    assert all(t.get_text() for t in ax.get_yticklabels() if t.get_visible() and
               ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1])


def assert_image_is_figure(image, fig):
    """The node's IMAGE output is this chart, pixel for pixel (same trace, same code)."""
    expected = plots().to_image(fig)
    assert image.shape == expected.shape and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.equal(image, expected)


def test_demon_ksampler_plot(executor):
    prompt = ksampler_demon_prompt("eps", batch=BATCH, seed=4, steps=8, k=4)
    outs = executor.run(prompt, want=("3", "5"))
    out, reward = outs["3"], outs["5"][0][0]
    summary, image = json.loads(out[1][0]), out[2][0]
    trace = summary["trace"]
    steered = [t for t in trace if "reward_mean" in t]
    assert len(steered) >= 4
    fig = plots().demon_figure(trace, f"Demon: reward per step ({reward.describe()})")
    ax = fig.axes[0]
    assert_readable_axes(ax, "step", "reward")
    items, mean = data_lines(ax, "item"), data_lines(ax, "mean")
    assert len(items) == BATCH and len(mean) == 1              # one line per batch item plus the mean
    assert len(items) + len(mean) == BATCH + 1
    rewards = np.array([t["reward_mean"] for t in steered])
    np.testing.assert_allclose(mean[0].get_ydata(), rewards.mean(1), rtol=1e-12)
    for b, line in enumerate(items):
        np.testing.assert_allclose(line.get_ydata(), rewards[:, b], rtol=1e-12)
    np.testing.assert_array_equal(mean[0].get_xdata(), [t["step"] for t in steered])
    band = [c for c in ax.collections if c.get_gid() == "spread"]
    assert len(band) == 1                                       # the candidates' spread per step: min..max
    edges = band[0].get_paths()[0].vertices[:, 1]
    lo, hi = np.array([t["reward_min"] for t in steered]).mean(1), np.array([t["reward_max"] for t in steered]).mean(1)
    assert np.all(lo <= rewards.mean(1) + 1e-12) and np.all(rewards.mean(1) <= hi + 1e-12) and np.any(hi > lo)
    np.testing.assert_allclose([edges.min(), edges.max()], [lo.min(), hi.max()], rtol=1e-9)
    top = [a for a in fig.axes if a is not ax and a.get_xlabel() == "sigma"]
    assert top and all(t.get_text() for t in top[0].get_xticklabels())   # sigma tick labels above
    assert_image_is_figure(image, fig)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(ARTIFACTS / "trace_plot_demon.png")


def test_smc_ksampler_plot(executor):
    prompt = {
        "1": harness.reference_model_node("eps"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "3": harness.red_reward_node(),
        "4": {"class_type": "RewardSteerKSamplerSMC",
              "inputs": {"model": ["1", 0], "seed": 2, "steps": 10, "cfg": 1.0, "scheduler": "simple",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1],
                         **smc_node_inputs(particles=8, lam=60.0, ess_threshold=0.5)}},
    }
    outs = executor.run(prompt, want=("4", "3"))
    out, reward = outs["4"], outs["3"][0][0]
    trace, image = json.loads(out[1][0])["trace"], out[2][0]
    fig = plots().smc_figure(trace, f"SMC: reward per step ({reward.describe()})", 0.5, 8)
    ax, ax_ess = fig.axes[0], fig.axes[1]
    assert ax.get_ylabel() == "reward" and ax_ess.get_ylabel() == "effective sample size"
    top = [a for a in fig.axes if a.get_xlabel() == "sigma"]
    assert top and all(t.get_text() for t in top[0].get_xticklabels())
    assert_readable_axes(ax_ess, "step", "effective sample size")
    assert len(data_lines(ax, "item")) == BATCH and len(data_lines(ax, "mean")) == 1
    assert len(data_lines(ax_ess, "item")) == BATCH and len(data_lines(ax_ess, "mean")) == 1
    threshold = data_lines(ax_ess, "threshold")
    assert len(threshold) == 1 and set(threshold[0].get_ydata()) == {4.0}     # 0.5 * 8 particles
    events = [(t["step"], e) for t in trace if "ess" in t for r, e in zip(t["resampled"], t["ess"]) if r]
    assert events, "this run should resample (lambda 60)"
    markers = [c for c in ax_ess.collections if c.get_gid() == "resampled"]
    assert len(markers) == 1
    np.testing.assert_allclose(markers[0].get_offsets(), np.array(events, dtype=float))
    assert_image_is_figure(image, fig)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(ARTIFACTS / "trace_plot.png")


def test_missing_matplotlib_names_the_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    try:
        plots().demon_figure([], "x")
    except RuntimeError as e:
        assert "pip install matplotlib" in str(e)
    else:
        raise AssertionError("expected a RuntimeError naming pip install matplotlib")


def test_bench_plots_are_the_same_charts(tmp_path):
    """bench/plotting.py draws the benchmarks' figures with the nodes' chart code: each panel of the frontier plot
    has labelled axes, calls on a log axis, a line per method with its standard errors as error bars (the JSON's
    numbers), the same colour for a method in every panel, and the law panel its noise floor."""
    import importlib.util
    import matplotlib.pyplot as plt
    spec = importlib.util.spec_from_file_location("bench_plotting", REPO / "bench" / "plotting.py")
    plotting = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plotting)
    report = json.loads((REPO / "bench" / "results" / "frontier.json").read_text())
    colours = plotting.family_colours(report)
    panels = plotting.reward_vs_calls_panels(report["reward_vs_calls"], colours)
    fig = plots().chart_figure(panels, columns=2, width_px=1200, panel_height_px=400)
    for ax, (reward_name, rows) in zip(fig.axes, report["reward_vs_calls"].items()):
        assert_readable_axes(ax, plotting.CALLS, "mean final reward (± SE)")
        assert ax.get_xscale() == "log"
        containers = {c.get_label(): c for c in ax.containers}
        assert set(containers) == {r["family"] for r in rows}
        for family, container in containers.items():
            mine = sorted((r["model_calls_per_image"], r["mean_reward"], r["standard_error"]) for r in rows
                          if r["family"] == family)
            line, _, (bars,) = container
            np.testing.assert_allclose(line.get_xydata(), [(c, m) for c, m, _ in mine])
            segments = np.array([s[:, 1] for s in bars.get_segments()])      # each error bar: mean ± SE
            np.testing.assert_allclose(segments, [(m - se, m + se) for _, m, se in mine], rtol=1e-6, atol=1e-9)
            assert plt.matplotlib.colors.same_color(line.get_color(), colours[family]), family
    plt.close(fig)
    for stem in ("frontier", "smc", "demon", "rewards", "cpu_fullsize_sd15_rerun"):
        out = tmp_path / f"{stem}.png"
        plotting.PLOTS[stem](json.loads((REPO / "bench" / "results" / f"{stem}.json").read_text()), out)
        with Image.open(out) as image:
            assert image.width >= 900 and image.height >= 300, (stem, image.size)
