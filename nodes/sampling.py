"""Helpers shared by the steering nodes: run a SAMPLER like SamplerCustom does, show text on the executing
node, and draw reward traces."""
from __future__ import annotations

import functools
import inspect
import json

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io


def ksampler_inputs(sampler_name: bool = False) -> list:
    """KSampler's own inputs, in KSampler's order, for the all-in-one nodes (part of their saved widget order)."""
    return [
        io.Model.Input("model", tooltip="the diffusion model to sample (any checkpoint or UNet loader's MODEL); "
                                        "every candidate, particle or rollout is a call of this model"),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="seed of the starting noise, as KSampler's; the noises steering tries are drawn "
                             "from it too, so the same workflow and seed give the same image"),
        io.Int.Input("steps", default=30, min=1, max=10000,
                     tooltip="denoising steps. Each step is one model call per image; steering adds its "
                             "candidates' or particles' calls on the steps it acts on"),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="classifier-free guidance scale, as in KSampler: how strongly positive is "
                               "followed over negative (1 = no guidance); applied to every candidate alike"),
        *([io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                          tooltip="ComfyUI sampler that runs every candidate; its model calls per step "
                                  "(e.g. 2 for heun) multiply the cost")]
          if sampler_name else []),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="karras",
                       tooltip="noise schedule (the sigmas of the steps), as in KSampler; sigma-based settings "
                               "such as min_sigma are read against it"),
        io.Conditioning.Input("positive", tooltip="what to generate (CLIP Text Encode); rewards that need a "
                                                  "prompt take it from the prompt input, not from here"),
        io.Conditioning.Input("negative", tooltip="what to avoid (CLIP Text Encode), as in KSampler"),
        io.Latent.Input("latent_image", tooltip="the latent to start from: Empty Latent Image for text-to-"
                                                "image (its batch size = images steered independently), or an "
                                                "encoded image with denoise < 1"),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="share of the schedule to run, as in KSampler (1 = from pure noise; lower keeps "
                               "more of latent_image); steering windows are fractions of the steps actually run"),
    ]


def sigmas_for(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler would use (denoise < 1 keeps the last `steps` of a longer schedule)."""
    if denoise <= 0.0:
        raise ValueError("denoise must be > 0")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


DOWNSCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fix_empty_latent(model, latent: dict) -> torch.Tensor:
    """core's fix_empty_latent_channels, given the empty latent's downscale ratios where it takes them (ComfyUI
    v0.11+: an EmptyLatentImage made for 8x models is resized for a 16x one such as Flux 2)."""
    parameters = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    ratios = {key: latent.get(key) for key in DOWNSCALE_KEYS if key in parameters}
    return comfy.sample.fix_empty_latent_channels(model, latent["samples"], **ratios)


def run_sampler(model, sampler, sigmas, seed: int, cfg: float, positive, negative, latent: dict) -> dict:
    """Sample like the core SamplerCustom node: fixed empty-latent channels and size, seeded noise, noise mask,
    progress bar and live previews."""
    latent_image = fix_empty_latent(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    for key in DOWNSCALE_KEYS:  # the latent now has the model's own size, as after core KSampler
        out.pop(key, None)
    out["samples"] = samples
    return out


def run_steering_ksampler(sample_fn, options: dict, recorder, model, seed, steps, cfg, scheduler, positive,
                          negative, latent_image, denoise):
    """The all-in-one nodes: KSampler's sigmas and noise, a steering sampler function reporting to `recorder`.
    Returns (latent, summary without the per-step trace, trace)."""
    sigmas = sigmas_for(model, scheduler, steps, denoise)
    recorder.total_steps = len(sigmas) - 1
    sampler = comfy.samplers.KSAMPLER(functools.partial(sample_fn, report=recorder), extra_options=options)
    out = run_sampler(model, sampler, sigmas, seed, cfg, positive, negative, latent_image)
    summary = dict(recorder.summary or {})
    return out, summary, summary.pop("trace", [])


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


def batch_text(values: list[float]) -> str:
    """A batch's values in one short phrase: each value for up to 3 items, else the mean and the range (the
    node's text must stay readable at its width)."""
    values = [v for v in values if v is not None]   # e.g. a tree item with no finished rollout yet
    if not values:
        return "none yet"
    if len(values) <= 3:
        return ", ".join(f"{v:.4g}" for v in values)
    return f"mean {sum(values) / len(values):.3g} ({min(values):.3g} .. {max(values):.3g}, {len(values)} items)"


def format_step(stats: dict, total: int) -> str:
    head = f"step {stats['step'] + 1}/{total}  sigma {stats['sigma']:.3g}"
    if not stats.get("steered"):
        return head + "  (not steered)"
    return (f"{head}  K={stats['k']}\ncandidates' mean: {batch_text(stats['reward_mean'])}\n"
            f"best candidate: {batch_text(stats['reward_max'])}")


def cost_text(calls: float, plain_steps: int, what: str = "") -> str:
    """Model calls per image and their multiple of a plain run (one call per step)."""
    return f"{what}{calls:.0f} model calls per image\n  = {calls / max(plain_steps, 1):.1f}x a plain {plain_steps}-step run"


def format_plan(stats: dict) -> str:
    return cost_text(stats["model_calls_per_image"], stats["steps"], "planned: up to " if stats.get("at_most")
                     else "planned: ")


def format_summary(summary: dict, total: int) -> str:
    return (f"done: K={summary['k']}, {summary['steered_steps']} steered steps\n"
            f"{cost_text(summary['model_calls_per_image'], total, 'spent: ')}\n"
            f"{summary['decodes_per_image']:.0f} decodes, {summary['reward_calls_per_image']:.0f} reward calls per image")


class TraceRecorder:
    """The `report` hook of a steering sampler: shows the planned cost, then each step, then the spent cost on
    the executing node, and keeps the trace.  Subclasses word the steps and the end."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.plan: dict | None = None
        self.summary: dict | None = None
        self.text = ""

    def step_text(self, stats: dict) -> str:
        return format_step(stats, self.total_steps)

    def done_text(self, summary: dict) -> str:
        return format_summary(summary, self.total_steps)

    def __call__(self, stats: dict) -> None:
        if stats.get("plan"):
            self.plan = stats
            self.text = format_plan(stats)
        elif stats.get("done"):
            self.summary = stats
            self.text = self.done_text(stats)
            if self.plan is not None:
                self.text += "\n" + format_plan(self.plan)
        else:
            self.text = self.step_text(stats)
        show_text_on_node(self.text)

    def ui(self, **more) -> dict:
        """The node's UI output: the final text (shown on the node after the run) and `more`."""
        return {"text": [self.text], **more}

    def json(self) -> str:
        return json.dumps(self.summary or {})


def plot_panels(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], width: int = 640,
                panel_height: int = 240, xlabel: str = "step", ylabels: list[str] | None = None) -> torch.Tensor:
    """Line charts stacked vertically as an IMAGE [1, H, W, 3]; each panel: (title, {series name: [(x, y), ...]})."""
    from .plots import panels_figure, to_image
    return to_image(panels_figure(panels, xlabel, ylabels, width_px=width, panel_height_px=panel_height))


def plot_trace(trace: list[dict], title: str) -> torch.Tensor:
    """Demon's reward per step: one line per batch item, the batch mean, and the candidates' spread."""
    from .plots import demon_figure, to_image
    return to_image(demon_figure(trace, title))
