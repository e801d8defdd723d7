"""Helpers shared by the steering nodes: run a SAMPLER like SamplerCustom does, show text on the executing
node, and draw reward traces."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageDraw

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview


def sigmas_for(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler would use (denoise < 1 keeps the last `steps` of a longer schedule)."""
    if denoise <= 0.0:
        raise ValueError("denoise must be > 0")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def run_sampler(model, sampler, sigmas, seed: int, cfg: float, positive, negative, latent: dict) -> dict:
    """Sample like the core SamplerCustom node: fixed empty-latent channels, seeded noise, noise mask,
    progress bar and live previews."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


def show_text_on_node(text: str) -> None:
    """Text under the node that is executing now (the SAMPLER's user: SamplerCustom, or our all-in-one node)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        context = get_executing_context()
        if context is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, context.node_id)
    except Exception:  # the text is a courtesy; never let it break a run
        pass


def format_step(stats: dict, total: int) -> str:
    if not stats.get("steered"):
        return f"step {stats['step'] + 1}/{total}  sigma {stats['sigma']:.3g}  (not steered)"
    means = ", ".join(f"{m:.4f}" for m in stats["reward_mean"])
    best = ", ".join(f"{m:.4f}" for m in stats["reward_max"])
    return (f"step {stats['step'] + 1}/{total}  sigma {stats['sigma']:.3g}  K={stats['k']}\n"
            f"candidate reward mean [{means}]  max [{best}]")


def format_summary(summary: dict) -> str:
    return (f"done: K={summary['k']}, {summary['steered_steps']} steered steps\n"
            f"per image: {summary['model_calls_per_image']:.0f} model calls, {summary['decodes_per_image']:.0f} "
            f"decodes, {summary['reward_calls_per_image']:.0f} reward calls")


class TraceRecorder:
    """The `report` hook of a steering sampler: shows each step on the node and keeps the trace."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.summary: dict | None = None

    def __call__(self, stats: dict) -> None:
        if stats.get("done"):
            self.summary = stats
            show_text_on_node(format_summary(stats))
        else:
            show_text_on_node(format_step(stats, self.total_steps))

    def json(self) -> str:
        return json.dumps(self.summary or {})


def plot_trace(trace: list[dict], title: str, width: int = 640, height: int = 320) -> torch.Tensor:
    """A reward-per-step plot as an IMAGE [1, H, W, 3]: candidate mean (blue) and max (orange), batch-averaged."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    steered = [t for t in trace if t.get("steered")]
    if not steered:
        draw.text((left + 10, top + 10), "no steered steps", fill="black")
    else:
        steps = [t["step"] for t in steered]
        series = {"mean": [float(np.mean(t["reward_mean"])) for t in steered],
                  "max": [float(np.mean(t["reward_max"])) for t in steered]}
        lo = min(min(v) for v in series.values())
        hi = max(max(v) for v in series.values())
        hi = hi if hi > lo else lo + 1e-6
        n = max(1, len(trace) - 1)

        def xy(step, value):
            return (left + (right - left) * step / n, bottom - (bottom - top) * (value - lo) / (hi - lo))

        for name, colour in (("mean", (31, 119, 180)), ("max", (255, 127, 14))):
            points = [xy(s, v) for s, v in zip(steps, series[name])]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for p in points:
                draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        draw.text((4, top - 4), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 8), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 8), "step ->   blue: candidate mean reward, orange: best candidate", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
