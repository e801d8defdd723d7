"""Rewards: one per file, all behind the small protocol in base.py."""
from .base import NO_CONTEXT, REWARD_TYPE, Reward, RewardInputError, ScoringContext, as_image_batch
from .composite import CompositeReward
from .image_similarity import ImageSimilarityReward
from .linear_color import LinearColorReward

__all__ = ["CompositeReward", "NO_CONTEXT", "REWARD_TYPE", "ScoringContext", "Reward", "RewardInputError", "as_image_batch", "ImageSimilarityReward",
           "LinearColorReward"]
