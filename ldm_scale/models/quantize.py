"""Vector quantiser of the VQ-regularised first stage (van den Oord et al. 2017; LDM Sec. 3.1).

Parameter name ``embedding.weight`` matches taming/CompVis ``VectorQuantizer2`` (``quantize.*``).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def codebook_statistics(indices: torch.Tensor, n_embed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a batch of code indices.

    perplexity = exp(H(p)) with p the empirical code frequencies (1 = one code used, n_embed = all
    codes used uniformly); usage = fraction of codebook entries hit at least once in the batch.
    """
    flat = indices.reshape(-1)
    # scatter_add rather than bincount: also runs on the meta device.
    counts = torch.zeros(n_embed, device=flat.device).scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))
    probs = counts / counts.sum()
    perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
    usage = (counts > 0).float().mean()
    return perplexity, usage


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation with a straight-through gradient estimator.

    Loss (VQ-VAE Eq. 3): ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (codebook term + commitment term).
    ``legacy_beta=True`` reproduces taming/CompVis ``VectorQuantizer2(legacy=True)``, which puts
    beta on the *codebook* term instead: beta * ||sg[z] - e||^2 + ||z - sg[e]||^2. Published CompVis
    VQ checkpoints were trained that way; the corrected placement (``legacy_beta=False``) follows
    the VQ-VAE paper.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = True):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy_beta = legacy_beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for every spatial position of z [B, C, h, w] -> [B, h, w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codebook = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, computed without a [N, K, C] intermediate.
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2.0 * flat @ codebook.t()
        return dist.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices [B, h, w] -> [B, C, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """z [B, C, h, w] -> (z_q with straight-through gradient, VQ loss, info dict)."""
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"quantiser expects {self.embed_dim} channels, got {z.shape[1]}")
        indices = self.lookup(z.float())
        z_q = self.embed(indices).to(z.dtype)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        if self.legacy_beta:
            loss = self.beta * codebook_loss + commitment_loss
        else:
            loss = codebook_loss + self.beta * commitment_loss
        # Straight-through estimator: forward uses z_q, backward passes d/dz_q to z unchanged.
        z_q = z + (z_q - z).detach()
        perplexity, usage = codebook_statistics(indices, self.n_embed)
        return z_q, loss, {"indices": indices, "perplexity": perplexity, "usage": usage}
