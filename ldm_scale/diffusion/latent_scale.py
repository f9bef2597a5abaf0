"""Latent scale factor: make the diffusion model's inputs unit variance (Rombach et al. 2022, Sec. 3 / G).

CompVis' ``scale_by_std`` sets ``scale_factor = 1 / z.flatten().std()`` from the first batch on
rank 0 only, so with data parallelism each rank's batch could give a different number. Here the
factor is a function of moments that sum across ranks: each rank calls ``latent_moments`` on its
first batch, the trainer all-reduces (sums) the three numbers, and ``scale_factor_from_moments``
gives the same factor everywhere; the trainer stores it in the checkpoint.
"""
from __future__ import annotations

import torch


def latent_moments(z: torch.Tensor) -> torch.Tensor:
    """float64 tensor ``[count, sum, sum of squares]`` of all elements of ``z`` (summable over ranks)."""
    z64 = z.detach().to(torch.float64)
    return torch.stack([z64.new_tensor(float(z64.numel())), z64.sum(), (z64 * z64).sum()])


def scale_factor_from_moments(moments: torch.Tensor) -> float:
    """1 / std of all elements behind ``moments`` (unbiased variance, as ``torch.std``)."""
    count, total, total_sq = (float(v) for v in moments.to(torch.float64).cpu())
    if count < 2:
        raise ValueError(f"need at least 2 latent elements to estimate the scale factor, got {count:g}")
    var = (total_sq - total * total / count) / (count - 1)
    if not var > 0:
        raise ValueError(f"latent variance is {var:g}: the first-stage encoder output is constant, "
                         "check the autoencoder weights or set a fixed scale_factor")
    return float(var ** -0.5)
