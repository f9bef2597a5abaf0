"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", sec. 2).

Each set's manifold is the union of balls around its points with radius equal to the distance to
the k-th nearest neighbour (k = 3) within the same set. Precision is the fraction of generated
points inside the real manifold; recall the fraction of real points inside the generated one.

Distances are computed block by block (``batch_size`` x ``batch_size``) keeping only the running
k+1 smallest per row, so 50k x 50k never materialises the full matrix (a 10k block pair in float32
is 400 MB). Under ``torch.distributed`` the row blocks are shared between ranks and the per-row
results summed, so every rank returns the same numbers.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from ldm_scale import dist

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(x: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().reshape(len(t), -1).to(device=device, dtype=dtype)


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    # |a|^2 - 2ab + |b|^2 as one fused matmul and two in-place passes (a block is 400 MB at 10k x 10k:
    # temporaries cost more than the arithmetic); clamp the small negatives cancellation produces.
    a_sq = (a * a).sum(dim=1, keepdim=True)
    return torch.addmm(a_sq, a, b.T, alpha=-2.0).add_(b_sq[None, :]).clamp_min_(0.0)


def _my_blocks(n: int, batch_size: int, distributed: bool):
    info = dist.get_dist_info() if distributed and dist.is_initialized() else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    for block_index, start in enumerate(range(0, n, batch_size)):
        if block_index % world == rank:
            yield start, min(start + batch_size, n)


def _sum_over_ranks(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed and dist.is_initialized():
        t = t.cpu()
        dist.all_reduce_sum(t)
    return t


def knn_radii(features: ArrayLike, k: int = 3, *, batch_size: int = 10000,
              device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
              distributed: bool = False) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    device = torch.device(device or "cpu")
    x = _as_tensor(features, device, dtype)
    n = len(x)
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, have {n}")
    x_sq = (x * x).sum(dim=1)
    radii = torch.zeros(n, dtype=torch.float64)
    for r0, r1 in _my_blocks(n, batch_size, distributed):
        best = torch.full((r1 - r0, k + 1), float("inf"), device=device, dtype=dtype)
        for c0 in range(0, n, batch_size):
            c1 = min(c0 + batch_size, n)
            d = _squared_distances(x[r0:r1], x[c0:c1], x_sq[c0:c1])
            best = torch.topk(torch.cat([best, d], dim=1), k + 1, dim=1, largest=False).values
        # Column k of the k+1 smallest is the k-th neighbour: column 0 is the point itself.
        radii[r0:r1] = best[:, k].to("cpu", torch.float64)
    return _sum_over_ranks(radii, distributed)


def _fake_and_real(fake: ArrayLike, real: ArrayLike, device: torch.device,
                   dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sets as [N, D] tensors on ``device`` (same D, or ValueError) and the real points' |r|^2."""
    f, r = _as_tensor(fake, device, dtype), _as_tensor(real, device, dtype)
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {f.shape[1]} vs {r.shape[1]}")
    return f, r, (r * r).sum(dim=1)


def cross_membership(fake: ArrayLike, real: ArrayLike, fake_radii: torch.Tensor, real_radii: torch.Tensor, *,
                     batch_size: int = 10000, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32, distributed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fake point inside some real ball [len(fake)], real point inside some fake ball [len(real)]).

    Both directions read the same fake-to-real distance block, so it is computed once: three
    N x N distance passes in all (two for the radii, one here) instead of four.
    """
    device = torch.device(device or "cpu")
    f, r, r_sq = _fake_and_real(fake, real, device, dtype)
    fake_radii = fake_radii.to(device=device, dtype=dtype)
    real_radii = real_radii.to(device=device, dtype=dtype)
    fake_hit = torch.zeros(len(f), dtype=torch.float64)
    real_hit = torch.zeros(len(r), dtype=torch.bool, device=device)
    for r0, r1 in _my_blocks(len(f), batch_size, distributed):
        hit = torch.zeros(r1 - r0, dtype=torch.bool, device=device)
        for c0 in range(0, len(r), batch_size):
            c1 = min(c0 + batch_size, len(r))
            d = _squared_distances(f[r0:r1], r[c0:c1], r_sq[c0:c1])
            hit |= (d <= real_radii[None, c0:c1]).any(dim=1)
            real_hit[c0:c1] |= (d <= fake_radii[r0:r1, None]).any(dim=0)
        fake_hit[r0:r1] = hit.to("cpu", torch.float64)
    fake_hit = _sum_over_ranks(fake_hit, distributed) > 0.5
    real_hit = _sum_over_ranks(real_hit.to("cpu", torch.float64), distributed) > 0.5
    return fake_hit, real_hit


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, *, batch_size: int = 10000,
                     device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                     distributed: bool = False) -> Dict[str, float]:
    """``{"precision", "recall"}`` of generated features ``fake`` against reference ``real``."""
    kw = dict(batch_size=batch_size, device=device, dtype=dtype, distributed=distributed)
    real_radii = knn_radii(real, k, **kw)
    fake_radii = knn_radii(fake, k, **kw)
    fake_in_real, real_in_fake = cross_membership(fake, real, fake_radii, real_radii, **kw)
    return {"precision": fake_in_real.double().mean().item(), "recall": real_in_fake.double().mean().item()}


def density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5, *, batch_size: int = 10000,
                     device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                     distributed: bool = False) -> Dict[str, float]:
    """``{"density", "coverage"}`` (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
    Generative Models", Eq. 3-4), from the k-NN balls of the *real* points only (k = 5 there):

        density  = 1 / (k M) sum_j sum_i 1[fake_j in B(real_i, NND_k(real_i))]
        coverage = 1 / N sum_i 1[exists j: fake_j in B(real_i, NND_k(real_i))]

    Membership is strict (distance < radius), as in the authors' ``prdc`` package; one pass of
    fake-to-real distance blocks serves both, split over ranks like precision/recall.
    """
    kw = dict(batch_size=batch_size, device=device, dtype=dtype, distributed=distributed)
    real_radii = knn_radii(real, k, **kw)
    device = torch.device(device or "cpu")
    f, r, r_sq = _fake_and_real(fake, real, device, dtype)
    radii = real_radii.to(device=device, dtype=dtype)
    inside = torch.zeros(len(f), dtype=torch.float64)  # real balls holding each fake point
    covered = torch.zeros(len(r), dtype=torch.bool, device=device)
    for r0, r1 in _my_blocks(len(f), batch_size, distributed):
        count = torch.zeros(r1 - r0, dtype=torch.float64, device=device)
        for c0 in range(0, len(r), batch_size):
            c1 = min(c0 + batch_size, len(r))
            hits = _squared_distances(f[r0:r1], r[c0:c1], r_sq[c0:c1]) < radii[None, c0:c1]
            count += hits.sum(dim=1, dtype=torch.float64)
            covered[c0:c1] |= hits.any(dim=0)
        inside[r0:r1] = count.cpu()
    inside = _sum_over_ranks(inside, distributed)
    covered = _sum_over_ranks(covered.to("cpu", torch.float64), distributed) > 0.5
    return {"density": float(inside.sum()) / (k * len(f)), "coverage": covered.double().mean().item()}
