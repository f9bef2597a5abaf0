"""Gaussian noise drawn from an explicit ``torch.Generator`` (reproducible on any device).

A generator lives on one device; drawing there and moving the result gives the same numbers for
CPU and CUDA runs with a CPU generator (the convention diffusers' ``randn_tensor`` also follows,
which lets the reference tests compare stochastic trajectories draw for draw).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def randn(
    shape: Sequence[int],
    *,
    generator: Optional[torch.Generator],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``device``, drawn on the generator's device."""
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def with_offset_noise(noise: torch.Tensor, offset: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): add ``offset`` x N(0, 1) per (sample, channel), constant over space.

    Lets the model change the mean brightness of an image, which plain i.i.d. noise almost never
    perturbs at the lowest frequency.
    """
    if offset == 0.0:
        return noise
    per_channel = randn((noise.shape[0], noise.shape[1]) + (1,) * (noise.ndim - 2),
                        generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset * per_channel
