"""Batched, memory-chunked model calls over many candidates, with compute accounting.

Candidates of a batch of B items are laid out candidate-major: x_all = [cand_1 of items 1..B, cand_2 of items
1..B, ...], i.e. x.repeat(K, ...) order.  ComfyUI tiles a conditioning of batch c over whatever batch it is
given (position j gets cond[j % c]); with the conds first tiled to B (`align_conds_with_items`), every chunk that
is a multiple of B gives each candidate the conditioning core KSampler gives its item, whatever c is.  ComfyUI
never splits one cond's batch, so the chunking by free memory happens here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import comfy.model_management


@dataclass
class ComputeCounter:
    """Work done, in items (one item = one latent through the model / the VAE / the reward)."""
    batch: int = 1
    model_items: int = 0
    decode_items: int = 0
    reward_items: int = 0
    model_batches: int = 0
    notes: list[str] = field(default_factory=list)

    def per_image(self) -> dict:
        b = max(1, self.batch)
        return {"model_calls_per_image": self.model_items / b, "decodes_per_image": self.decode_items / b,
                "reward_calls_per_image": self.reward_items / b, "batched_model_calls": self.model_batches}


def base_model_of(model):
    """The BaseModel behind what ComfyUI passes to a sampler function (KSamplerX0Inpaint -> CFGGuider -> model)."""
    return model.inner_model.inner_model


def free_memory_for(model, device) -> int:
    """Free memory for this model's calls, as ComfyUI's own cond batching counts it: the loaded patcher's
    get_free_memory where it has one (it adds what dynamic VRAM can still give back, which the device's free
    memory alone does not show), else the device's free memory."""
    patcher = getattr(base_model_of(model), "current_patcher", None) or model.inner_model.model_patcher
    if hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return comfy.model_management.get_free_memory(device)


def items_per_call(model, x_item_shape, batch: int, max_items: int = 0) -> int:
    """How many items fit one model call: a multiple of `batch`, from free device memory (or `max_items`)."""
    if max_items > 0:
        return max(batch, (max_items // batch) * batch)
    base = base_model_of(model)
    device = model.inner_model.model_patcher.load_device
    per_item = base.memory_required([1] + list(x_item_shape)) * 2  # cond and uncond run together under CFG
    fit = int(free_memory_for(model, device) * 0.8 // max(per_item, 1))
    return max(batch, (fit // batch) * batch)


def _batch_sizes(cond) -> list[int]:
    values = getattr(cond, "cond", None)
    values = values if isinstance(values, (list, tuple)) else [values]
    return [v.shape[0] for v in values if torch.is_tensor(v) and v.ndim > 0]


def align_conds_with_items(guider, batch: int) -> None:
    """Tile the guider's conds (a sampler function's model.inner_model.conds) to the latent batch B, as core does
    for one batch-B call: item i gets cond[i % c].  Chunks of n*B candidates then give candidate j the cond of item
    j % B even when c does not divide B (c = 2, B = 3), where tiling over n*B would not.  Idempotent; conds whose
    batch already divides B are left as they are."""
    conds = getattr(guider, "conds", None)
    if not isinstance(conds, dict):
        return
    for cond_list in conds.values():
        for index, cond in enumerate(cond_list or []):
            model_conds = cond.get("model_conds") if isinstance(cond, dict) else None
            if not model_conds:
                continue
            tiled = {name: value.process_cond(batch_size=batch, area=None)
                     if any(batch % size for size in _batch_sizes(value)) else value
                     for name, value in model_conds.items()}
            if any(tiled[name] is not model_conds[name] for name in tiled):
                cond_list[index] = {**cond, "model_conds": tiled}


@contextmanager
def tiled_inpaint_state(model, extra_args: dict, repeats: int):
    """ComfyUI's inpainting wrapper blends with its own batch-B latent, noise and mask; tile them to repeats*B."""
    if repeats == 1:
        yield extra_args
        return
    saved = {name: getattr(model, name, None) for name in ("latent_image", "noise")}
    args = dict(extra_args)
    try:
        for name, value in saved.items():
            if torch.is_tensor(value) and value.shape[0] > 1:
                setattr(model, name, value.repeat(repeats, *([1] * (value.ndim - 1))))
        mask = args.get("denoise_mask")
        if torch.is_tensor(mask) and mask.shape[0] > 1:
            args["denoise_mask"] = mask.repeat(repeats, *([1] * (mask.ndim - 1)))
        yield args
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(model, name, value)


def denoise(model, x, sigma, extra_args: dict, batch: int, chunk_items: int, counter: ComputeCounter):
    """D(x, sigma) for x holding n*batch items (candidate-major), in chunks of chunk_items (a multiple of batch).
    sigma: a float or a tensor with one value per item."""
    n = x.shape[0]
    align_conds_with_items(model.inner_model, batch)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(n)
    out = torch.empty_like(x)
    for start in range(0, n, chunk_items):
        comfy.model_management.throw_exception_if_processing_interrupted()
        stop = min(n, start + chunk_items)
        with tiled_inpaint_state(model, extra_args, (stop - start) // batch) as args:
            out[start:stop] = model(x[start:stop], sigma[start:stop], **args)
        counter.model_items += stop - start
        counter.model_batches += 1
    return out


def allow_gradients_through(module) -> None:
    """ComfyUI loads models inside torch.inference_mode(), so their weights are inference tensors, which autograd
    cannot use (no version counter).  Swap each such parameter / buffer for an ordinary copy, once and by name
    (the memory stays the same), so gradient-guided proposals can backpropagate through the model, the VAE and the
    reward.  The weights themselves never need gradients."""
    if module is None:
        return
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and (param.is_inference() or param.requires_grad):
                    sub._parameters[name] = torch.nn.Parameter(param.detach().clone() if param.is_inference()
                                                               else param.detach(), requires_grad=False)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
