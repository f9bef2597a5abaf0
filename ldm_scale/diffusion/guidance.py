"""Denoiser wrappers: bind a condition, classifier-free guidance.

A *conditional* denoiser is ``model_fn_with_cond(x, t, cond) -> prediction`` where ``cond`` is the
dict of UNet keyword arguments a conditioner produced (``{"context": [B, L, D]}``, ``{"y": [B]}``
or ``{}``; a ``"concat"`` entry, the channel-concatenated input of inpainting models, is batched
like the others, so both guidance branches see it). The wrappers return plain denoisers ``model_fn(x, t)`` for the samplers.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

CondModelFn = Callable[[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bind_condition(model_fn_with_cond: CondModelFn, cond: Dict[str, torch.Tensor]) -> ModelFn:
    """The plain denoiser for one fixed condition (no guidance)."""
    return lambda x, t: model_fn_with_cond(x, t, cond)


def classifier_free(
    model_fn_with_cond: CondModelFn,
    cond: Dict[str, torch.Tensor],
    uncond: Dict[str, torch.Tensor],
    scale: float,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): p_u + scale * (p_c - p_u).

    The unconditional and conditional passes run as ONE forward of batch 2B ([uncond; cond], the
    CompVis order), which keeps the UNet's matmuls large. The combination is applied to the native
    prediction: eps, v and x0 are each affine in the network output at fixed x_t with weights
    (1 - scale) + scale = 1, so guiding v (or x0) is exactly guiding eps. ``scale == 1`` makes a
    single conditional pass.
    """
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if not cond or scale == 1.0:
        return bind_condition(model_fn_with_cond, cond)
    for key in cond:
        if cond[key].shape != uncond[key].shape:
            raise ValueError(f"cond[{key!r}] has shape {tuple(cond[key].shape)} but uncond[{key!r}] has "
                             f"{tuple(uncond[key].shape)}: build the null condition for the same batch size")
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred_uncond, pred_cond = model_fn_with_cond(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    return guided

