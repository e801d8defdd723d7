"""Decode-and-score: latent x0 estimates -> images through a VAE -> rewards.  Shared by every steering sampler."""
from __future__ import annotations

import logging

import torch

import comfy.model_management

from ..rewards.base import ScoringContext
from .model_calls import ComputeCounter, allow_gradients_through, base_model_of


class SteeringInputError(ValueError):
    """A steering sampler was given inputs that cannot work together; the message names the input."""


def require_choice(name: str, value, options) -> None:
    if value not in options:
        raise SteeringInputError(f"{name} must be one of {tuple(options)}, got {value!r}")


def latent_layout(channels: int, dims: int, spatial, temporal) -> str:
    """e.g. '16-channel video latents (8x spatial, 4x in time)'; unknown ratios are left out."""
    ratios = ", ".join(r for r in (f"{spatial}x spatial" if spatial else "", f"{temporal}x in time" if temporal else "")
                       if r)
    kind = {3: "video", 2: "image"}.get(dims, f"{dims}-D")
    return f"{channels}-channel {kind} latents" + (f" ({ratios})" if ratios else "")


def _vae_layout(vae) -> tuple:
    """(channels, dims, spatial, temporal) the VAE decodes; None where it does not say."""
    def ratio(method):
        try:
            return getattr(vae, method)()
        except Exception:   # a ratio the VAE cannot compute is just unknown
            return None
    return _applicable(getattr(vae, "latent_channels", None), getattr(vae, "latent_dim", None),
                       ratio("spacial_compression_decode"), ratio("temporal_compression_decode"))


def latent_format_of(model):
    """The latent format of the model behind a sampler's `model`, object patches included: its patcher's, which
    holds them before sampling loads the model too."""
    patcher = getattr(model.inner_model, "model_patcher", None)
    if hasattr(patcher, "get_model_object"):
        return patcher.get_model_object("latent_format")
    return base_model_of(model).latent_format


def _model_layout(fmt, latent_shape) -> tuple:
    """(channels, dims, spatial, temporal) of the model's latents: channels and dims from the latent itself, the
    ratios from its latent format where ComfyUI declares them (newer releases)."""
    return _applicable(latent_shape[1], len(latent_shape) - 2, getattr(fmt, "spacial_downscale_ratio", None),
                       getattr(fmt, "temporal_downscale_ratio", None))


def _applicable(channels, dims, spatial, temporal) -> tuple:
    """A spatial ratio only for image and video latents, a temporal one only for video (audio latents are 1-D)."""
    return (channels, dims, spatial if dims in (2, 3) else None, temporal if dims == 3 else None)


def check_vae_matches(vae, model, latent_shape) -> None:
    """Refuse a VAE whose latent layout (channels, time axis, downscale) is not the model's (a sampler's `model`),
    naming both: a 16-channel image VAE (SD3 / Flux TAESD) has a Wan model's channels but no time axis."""
    fmt = latent_format_of(model)
    vae_l, model_l = _vae_layout(vae), _model_layout(fmt, latent_shape)
    known = [(v, m) for v, m in zip(vae_l, model_l) if v is not None and m is not None]
    if all(v == m for v, m in known):
        return
    vae_name = type(getattr(vae, "first_stage_model", vae)).__name__
    model_name = type(base_model_of(model)).__name__
    raise SteeringInputError(f"the VAE ({vae_name}) decodes {latent_layout(*vae_l)}, but the model ({model_name}, "
                             f"latent format {type(fmt).__name__}) makes "
                             f"{latent_layout(*model_l)}, here of shape {tuple(latent_shape)}: connect the VAE that "
                             "belongs to the model (or a TAESD of the same layout)")


def _item_prompts(prompts, batch: int, n: int):
    if not prompts:
        return None
    per_item = (list(prompts) * batch)[:batch] if len(prompts) == 1 else list(prompts)
    if len(per_item) != batch:
        raise SteeringInputError(f"{len(per_item)} prompts for a batch of {batch}")
    return per_item * (n // batch)


DECODERS = ("vae", "latent_rgb")


def latent_rgb_decode(base_model, x0: torch.Tensor) -> torch.Tensor:
    """The live-preview decoder: the model's linear latent -> RGB factors, at latent resolution: [n, h, w, 3], or
    [n, T, h, w, 3] for video latents [n, C, T, h, w] (every latent frame; core's preview shows the first).
    Nearly free; approximate for SD-family latents (exact for the reference model), good enough for colour-type
    rewards, not for rewards that judge detail."""
    fmt = base_model.latent_format
    if fmt.latent_rgb_factors is None:
        raise SteeringInputError("this model's latent format has no RGB preview factors: use decoder 'vae'")
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=x0.dtype, device=x0.device)
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=x0.dtype, device=x0.device)
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    if reshape is not None:  # e.g. Flux 2: 128 channels = 32 channels x 2x2 patches, unpacked before the factors
        x0 = reshape(x0)
    return ((x0.movedim(1, -1) @ factors + bias + 1.0) / 2.0).clamp(0.0, 1.0)


VIDEO_CHUNK_BYTES = 256 * 2 ** 20   # decoded frames held at once when clips are scored a few at a time


class LatentScorer:
    """score(model, x0, batch, counter, step=None) -> float32 rewards [n] for n = k*batch candidate-major x0: detached
    on the CPU, or (differentiable=True) on x0's device with the graph back to x0, for gradient-guided proposals.
    step = (i, steps) is passed on to the reward in its ScoringContext, with the batch item of each candidate.
    decoder: 'vae' (the VAE given) or 'latent_rgb' (the live-preview projection, nearly free).

    Video latents [n, C, T, h, w] get one score per clip.  Clips are decoded and scored a few at a time (about
    `chunk_bytes` of decoded frames), so K*B long clips are never all in memory; a reward that compares candidates
    gets all K clips of one batch item per call instead.  ComfyUI's VAE.decode bounds the VAE's own working memory
    (it batches items by free memory, and the Wan VAE decodes a clip latent frame by latent frame)."""

    def __init__(self, vae, reward, prompts: list[str] | None = None, differentiable: bool = False,
                 decoder: str = "vae", chunk_bytes: int = VIDEO_CHUNK_BYTES):
        if decoder not in DECODERS:
            raise SteeringInputError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if differentiable and not getattr(reward, "differentiable", False):
            raise SteeringInputError(f"gradient guidance needs a differentiable reward, and {reward.describe()} is "
                                     "not; turn gradient guidance off (gradient-free SMC works with any reward)")
        self.vae, self.reward, self.prompts = vae, reward, prompts
        self.differentiable, self.decoder, self.chunk_bytes = differentiable, decoder, chunk_bytes

    def check(self, model, x: torch.Tensor) -> None:
        """Refuse, before sampling, latents this scorer cannot score (x: the sampler's latent)."""
        if self.decoder == "latent_rgb":
            if latent_format_of(model).latent_rgb_factors is None:
                raise SteeringInputError("this model's latent format has no RGB preview factors: use decoder 'vae'")
        else:
            check_vae_matches(self.vae, model, x.shape)
        if x.ndim == 5 and getattr(self.reward, "video", "frame_mean") not in ("frame_mean", "clip"):
            raise SteeringInputError(f"{self.reward.describe()} cannot score video: the latent {tuple(x.shape)} holds "
                                     f"clips of {x.shape[2]} latent frames. Use a reward that scores images (a clip "
                                     "then scores the mean of its frames) or whole clips")

    def decode(self, base_model, x0: torch.Tensor) -> torch.Tensor:
        """Images [n, H, W, 3], or clips [n, F, H, W, 3] for video latents."""
        if self.decoder == "latent_rgb":
            return latent_rgb_decode(base_model, x0)
        if self.differentiable:
            allow_gradients_through(getattr(self.vae, "first_stage_model", None))
        return self.vae.decode(base_model.process_latent_out(x0))

    def __call__(self, model, x0: torch.Tensor, batch: int, counter: ComputeCounter,
                 step: tuple[int, int] | None = None) -> torch.Tensor:
        base = base_model_of(model)
        self.check(model, x0)
        n = x0.shape[0]
        prompts = _item_prompts(self.prompts, batch, n)
        where = {"step": step[0] if step else None, "steps": step[1] if step else None}
        if x0.ndim == 5:
            scores = self._score_clips(base, x0, batch, prompts, where)
        else:
            context = ScoringContext(groups=tuple(j % batch for j in range(n)), **where)
            scores = self.reward(self.decode(base, x0), prompts, context)
        counter.decode_items += n
        counter.reward_items += n
        return scores.float() if self.differentiable else scores.detach().float().cpu()

    def _score_clips(self, base, x0, batch: int, prompts, where: dict) -> torch.Tensor:
        n = x0.shape[0]
        if getattr(self.reward, "compares_candidates", False):   # all K candidates of an item in one call
            parts = {tuple(unit): self._score_unit(base, x0, unit, batch, prompts, where)[0]
                     for unit in (list(range(item, n, batch)) for item in range(batch))}
        else:   # one clip first, then as many as fit chunk_bytes of decoded frames
            parts, start, size = {}, 0, 1
            while start < n:
                unit = list(range(start, min(n, start + size)))
                parts[tuple(unit)], clip_bytes = self._score_unit(base, x0, unit, batch, prompts, where)
                start, size = unit[-1] + 1, max(1, self.chunk_bytes // max(clip_bytes, 1))
        order = torch.tensor([j for unit in parts for j in unit])
        scores = torch.cat([part.to(x0.device) for part in parts.values()])
        return scores[torch.argsort(order).to(x0.device)]

    def _score_unit(self, base, x0, unit: list[int], batch: int, prompts, where: dict):
        """Scores of the clips x0[unit], and the bytes of one decoded clip."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        clips = self.decode(base, x0[unit])                                   # [c, F, H, W, 3]
        frames = clips.shape[1]
        context = ScoringContext(groups=tuple(j % batch for j in unit for _ in range(frames)), clip_frames=frames,
                                 **where)
        scores = self.reward(clips.reshape(-1, *clips.shape[-3:]), [prompts[j] for j in unit] if prompts else None,
                             context)
        return scores, clips[0].numel() * clips.element_size()


def make_latent_scorer(vae, reward, prompts: list[str] | None = None, differentiable: bool = False,
                       decoder: str = "vae", chunk_bytes: int = VIDEO_CHUNK_BYTES) -> LatentScorer:
    return LatentScorer(vae, reward, prompts, differentiable, decoder, chunk_bytes)


def check_scorer(score_fn, model, x: torch.Tensor) -> None:
    """Before sampling: refuse what a scorer cannot score (a LatentScorer's check; other callables have none)."""
    check = getattr(score_fn, "check", None)
    if check is not None:
        check(model, x)


def finite_or_flat(scores: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with non-finite entries zeroed, per-column flag 'all finite') for scores [K, B].  Columns with a
    NaN / inf get a warning; the caller gives them equal weights instead of crashing."""
    ok = torch.isfinite(scores).all(dim=0)
    if not bool(ok.all()):
        logging.warning("[reward-steering] %s returned NaN/inf rewards for batch item(s) %s; using equal weights "
                        "for them at this step", what, torch.nonzero(~ok).flatten().tolist())
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores)), ok
