"""Reward-steered samplers as plain functions over ComfyUI's denoiser (Demon, SMC/FK steering).

Shared pieces (SDE step, x0 estimators, chunked model calls, decode-and-score, resampling) are written once
in this package and used by every algorithm.
"""
