"""SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2) for the UNet and the DiT.

Six integers per sample, (original height, original width, crop top, crop left, target height,
target width), which the bucketed loader puts in every batch (``data/loader.py``
``MICRO_CONDITIONING``): each is embedded with the timestep's sinusoidal features (256 per value,
SDXL's ``add_time_proj``), the six are concatenated and an MLP maps them to the denoiser's
conditioning vector, to which they are added (SDXL's ``add_embedding``; SDXL concatenates its
pooled text vector there too, which ldm_scale's models take through their own text paths).
The model thereby learns what a crop and a small original look like, and at sampling it is told
"uncropped, at this size": SDXL's default, ``original = target = (H, W)``, crop ``(0, 0)``
(:func:`sampling_micro`).

The output layer starts at zero, so a fresh embedding changes nothing: a square checkpoint
fine-tuned with ``micro_conditioning`` on starts from exactly its own predictions.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .attention import zero_module
from .embeddings import timestep_embedding

FEATURES_PER_VALUE = 256  # SDXL's addition_time_embed_dim
VALUES = 6
# The batch keys (each [B, 2]) in the order of the six values.
BATCH_KEYS = ("original_size", "crop_top_left", "target_size")


class MicroConditioning(nn.Module):
    """[B, 6] integers -> [B, dim], added to the timestep embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(VALUES * FEATURES_PER_VALUE, dim)
        self.act = nn.SiLU()
        self.linear_2 = zero_module(nn.Linear(dim, dim))

    def forward(self, micro: torch.Tensor) -> torch.Tensor:
        if micro.ndim != 2 or micro.shape[1] != VALUES:
            raise ValueError(f"micro-conditioning must be [B, {VALUES}] (original h, w, crop top, left, target h, w); "
                             f"got {tuple(micro.shape)}")
        features = timestep_embedding(micro.flatten(), FEATURES_PER_VALUE).reshape(micro.shape[0], -1)
        return self.linear_2(self.act(self.linear_1(features.to(self.linear_1.weight.dtype))))


def batch_micro(batch: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """[B, 6] float from a bucketed loader batch's ``original_size`` / ``crop_top_left`` / ``target_size``."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"the model is micro-conditioned but the batch has no {missing}: train it with "
                         "data.buckets.enabled=true (the bucketed loader provides them)")
    return torch.cat([batch[k] for k in BATCH_KEYS], dim=1).to(device=device, dtype=torch.float32)


def sampling_micro(n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """[n, 6] for generating ``height`` x ``width`` images: original = target = that size, no crop."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return row.expand(n, VALUES).clone()
