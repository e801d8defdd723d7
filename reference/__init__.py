"""Known-answer models: the analytic Gaussian-mixture reference model (exact denoiser, exact tilted laws)
and a tiny random-weight SD1.5 UNet.  mixture.py and pictures.py are pure torch; the ComfyUI-facing parts
(comfy_model.py, tiny_unet.py) import ComfyUI."""
from .mixture import GaussianMixture
from .pictures import PICTURE_NAMES, draw_pictures

__all__ = ["GaussianMixture", "PICTURE_NAMES", "draw_pictures"]
