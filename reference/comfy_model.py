"""The analytic reference model on ComfyUI's own classes: BaseModel + ModelPatcher + model_sampling, and a VAE.

The mixture lives in latent space: a latent is a picture at 1/8 of the image size, z = 2*image - 1 (three
channels).  The "network" returns whatever output makes ComfyUI's own `calculate_denoised` produce the exact
posterior mean, so eps, v-prediction and flow (CONST) models all go through ComfyUI's real parametrisation code.

eps and v use a zero-terminal-SNR schedule (sigma_max ≈ 4500) so that ComfyUI's start from pure noise *is*
the model's marginal at sigma_max -- with SD's sigma_max of 14.6 the pictures would still show through and
plain sampling would not reproduce the mixture.  Flow models start at sigma = 1, which is exact anyway.
At the other end every schedule reaches sigma_min = 0.001, far below the spread (the node allows >= 0.005): a
sampler's last step returns D(x, sigma_min), the posterior mean, whose spread is s / sqrt(1 + (sigma_min/s)^2).
With SD's linear_start (sigma_min = 0.029) that is 4 % below s = 0.1 at any number of steps, so the betas
start at 1e-6 (sigma_min = 0.001, as flow's), and only the solver's own step error is left.
"""
from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models_base

from .mixture import GaussianMixture
from .pictures import PICTURE_NAMES, draw_pictures

DOWNSCALE = 8  # image pixels per latent pixel, as for SD-family VAEs (EmptyLatentImage 256x256 -> 32x32)

PARAMETRIZATIONS = {
    "eps": comfy.model_base.ModelType.EPS,
    "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}
SAMPLING_SETTINGS = {
    "eps": {"beta_schedule": "linear", "linear_start": 1e-6, "linear_end": 0.012, "zsnr": True},
    "v_prediction": {"beta_schedule": "linear", "linear_start": 1e-6, "linear_end": 0.012, "zsnr": True},
    "flow": {"shift": 1.0, "multiplier": 1000},
}


@dataclass(frozen=True)
class ReferenceSpec:
    """Everything that defines a reference model; hashable so mixtures can be cached per latent size."""
    components: int = 8
    spread: float = 0.1                       # per-element std of each component, in latent units (= 2x image units)
    weights: tuple[float, ...] | None = None  # component probabilities (normalised); None = uniform
    parametrization: str = "eps"

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {list(PARAMETRIZATIONS)}, got {self.parametrization!r}")
        if not 1 <= self.components <= len(PICTURE_NAMES):
            raise ValueError(f"components must be 1..{len(PICTURE_NAMES)}, got {self.components}")
        if self.weights is not None:
            if len(self.weights) != self.components:
                raise ValueError(f"{len(self.weights)} weights given for {self.components} components")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")
        if not self.spread > 0:
            raise ValueError(f"spread must be > 0, got {self.spread}")

    def mixture(self, height: int, width: int) -> GaussianMixture:
        """The mixture in latent space at a latent size of height x width."""
        return _mixture(self, height, width)


@functools.lru_cache(maxsize=32)
def _mixture(spec: ReferenceSpec, height: int, width: int) -> GaussianMixture:
    means = (2.0 * draw_pictures(spec.components, height, width) - 1.0).float()
    w = torch.tensor(spec.weights if spec.weights is not None else [1.0] * spec.components, dtype=torch.float64)
    return GaussianMixture(means, (w / w.sum()).float(), spec.spread)


def parse_weights(text: str, components: int) -> tuple[float, ...] | None:
    """'1, 2, 1' -> normalised weights; '' -> None (uniform). Raises ValueError with a readable message."""
    text = text.strip()
    if not text:
        return None
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"weights must be comma-separated numbers, got {text!r}") from None
    if len(values) != components:
        raise ValueError(f"weights lists {len(values)} numbers but the model has {components} components")
    total = sum(values)
    if min(values) < 0 or total <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {text!r}")
    return tuple(v / total for v in values)


class ReferenceLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        # The latent is the picture itself (in [-1, 1]), so live previews are exact.
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class ReferenceModelConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = ReferenceLatentFormat
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self, spec: ReferenceSpec):
        super().__init__({"spec": spec})
        self.sampling_settings = dict(SAMPLING_SETTINGS[spec.parametrization])


class MixtureDenoiserNet(torch.nn.Module):
    """Stands where a UNet would.  Returns the network output that ComfyUI's model_sampling turns into D exactly."""

    def __init__(self, spec: ReferenceSpec, device=None, operations=None, dtype=None, **unused):
        super().__init__()
        self.spec = spec
        self.dtype = torch.float32
        self.owner = None  # weakref to the BaseModel, for its (possibly patched) model_sampling

    def _sigma(self, xc: torch.Tensor, timestep: torch.Tensor, transformer_options: dict, model_sampling):
        sigmas = transformer_options.get("sigmas") if transformer_options else None
        if sigmas is not None and xc.shape[0] % sigmas.shape[0] == 0:
            # ComfyUI passes the exact sigmas of one cond chunk; the batch holds cond/uncond chunks back to back.
            return sigmas.to(xc.device, torch.float32).repeat(xc.shape[0] // sigmas.shape[0])
        # Direct calls without ComfyUI's sampling wrapper: the timestep is all we have (quantised for discrete models).
        return model_sampling.sigma(timestep).to(xc.device, torch.float32).reshape(-1).expand(xc.shape[0])

    def forward(self, xc, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        model_sampling = self.owner().model_sampling
        sigma = self._sigma(xc, timesteps, transformer_options, model_sampling)
        # ComfyUI's parametrisations are per-item affine maps: xc = c_in * x and D = c_skip * x + c_out * out.
        # Read the coefficients on [B, 1, ...] columns (cheap at any latent size), then invert for out.
        one = torch.ones((xc.shape[0],) + (1,) * (xc.ndim - 1), device=xc.device, dtype=torch.float32)
        c_in = model_sampling.calculate_input(sigma, one)
        c_skip = model_sampling.calculate_denoised(sigma, torch.zeros_like(one), one)
        c_out = model_sampling.calculate_denoised(sigma, one, torch.zeros_like(one))
        x = xc.float() / c_in
        mixture = self.spec.mixture(x.shape[-2], x.shape[-1])
        flow = isinstance(model_sampling, comfy.model_sampling.CONST)
        d = mixture.denoise(x, sigma, flow=flow)
        return (d - c_skip * x) / c_out


def build_reference_model(spec: ReferenceSpec) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL whose denoiser is the exact posterior mean of the reference mixture."""
    config = ReferenceModelConfig(spec)
    base = comfy.model_base.BaseModel(config, model_type=PARAMETRIZATIONS[spec.parametrization],
                                      unet_model=MixtureDenoiserNet)
    base.diffusion_model.owner = weakref.ref(base)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def reference_spec_of(model) -> ReferenceSpec | None:
    """The ReferenceSpec behind a MODEL (ModelPatcher) if it is a reference model, else None."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    return net.spec if isinstance(net, MixtureDenoiserNet) else None


def neutral_conditioning():
    """CONDITIONING for KSampler's positive/negative inputs; the reference model ignores its content,
    so CFG leaves the exact denoiser unchanged at any scale."""
    return [[torch.zeros(1, 1, 8), {}]]


class NearestUpsampleCodec(torch.nn.Module):
    """Exact decoder: each latent pixel becomes an 8x8 block of image pixels.  Affine, local and tile-safe."""

    def __init__(self, ratio: int = DOWNSCALE):
        super().__init__()
        self.ratio = ratio

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z, scale_factor=self.ratio, mode="nearest")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, self.ratio)


class ReferenceVAE(comfy.sd.VAE):
    """ComfyUI's VAE class around the exact codec: VAEDecode / VAEEncode / tiled variants run it unchanged.

    image = (z + 1) / 2, without the usual clamp, so a linear reward of the image is exactly linear in z."""

    def __init__(self):
        # VAE.__init__ sets every default attribute, then stops at "no VAE weights" for an empty state dict.
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            super().__init__(sd={})
        finally:
            logger.setLevel(level)
        self.latent_channels = 3
        # In place *and* returned: ComfyUI up to v0.17 uses the return value, v0.18+ only the in-place effect.
        self.process_output = lambda image: image.add_(1.0).div_(2.0)
        self.working_dtypes = [torch.float32]
        self.memory_used_decode = lambda shape, dtype: 4 * 3 * shape[2] * shape[3] * DOWNSCALE ** 2 * 4
        self.memory_used_encode = lambda shape, dtype: 4 * 3 * shape[2] * shape[3] * 4
        self.first_stage_model = NearestUpsampleCodec().eval()
        self.device = comfy.model_management.vae_device()
        self.vae_dtype = torch.float32
        self.output_device = comfy.model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=comfy.model_management.vae_offload_device())


_CODEC = NearestUpsampleCodec()


def latent_to_image(z: torch.Tensor) -> torch.Tensor:
    """What ReferenceVAE.decode computes, as a plain differentiable function: [B,3,h,w] -> [B,8h,8w,3]."""
    return ((_CODEC.decode(z) + 1.0) / 2.0).movedim(1, -1)
