"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation", Sec. 4): the squared maximum mean discrepancy between CLIP image embeddings of the
reference and the generated images, with a Gaussian RBF kernel

    k(x, y) = exp(-||x - y||^2 / (2 sigma^2)),   sigma = 10,
    CMMD = 1000 * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)),

every mean over all pairs, the diagonal included (the estimator of the paper's public code), on
L2-normalised embeddings of CLIP ViT-L/14 at 336 px (``extractor.name=clip:ViT-L-14-336@openai``).
Unlike FID it assumes no Gaussian form of the embedding distribution.

Kernel sums are accumulated block by block in float64 (a 30k x 30k kernel matrix would be 7 GB).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

SIGMA = 10.0  # the paper's bandwidth
SCALE = 1000.0  # the paper's reporting scale


def _normalised(x: ArrayLike) -> torch.Tensor:
    t = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).detach().double().cpu()
    t = t.reshape(len(t), -1)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, gamma: float, block: int) -> float:
    total = 0.0
    b_sq = (b * b).sum(dim=1)
    for start in range(0, len(a), block):
        x = a[start:start + block]
        d = torch.addmm((x * x).sum(dim=1, keepdim=True), x, b.T, alpha=-2.0).add_(b_sq[None, :]).clamp_min_(0.0)
        total += float(torch.exp(-gamma * d).sum())
    return total / (len(a) * len(b))


def cmmd(real: ArrayLike, fake: ArrayLike, *, sigma: float = SIGMA, scale: float = SCALE, block: int = 4096) -> float:
    """CMMD between reference embeddings ``real`` [N, D] and generated ``fake`` [M, D]."""
    x, y = _normalised(real), _normalised(fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding dimensions differ: {x.shape[1]} vs {y.shape[1]} (same CLIP model for both?)")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"CMMD needs at least 2 embeddings per set, got {len(x)} and {len(y)}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    return scale * (_mean_kernel(x, x, gamma, block) + _mean_kernel(y, y, gamma, block)
                    - 2.0 * _mean_kernel(x, y, gamma, block))
