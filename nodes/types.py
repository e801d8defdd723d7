"""Socket types the pack adds to ComfyUI."""
from comfy_api.latest import io

from ..rewards.base import REWARD_TYPE

Reward = io.Custom(REWARD_TYPE)
