"""CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1, with the w = 100 scaling used by torchmetrics
and most text-to-image papers): mean over pairs of 100 * max(cos(E_img, E_txt), 0)."""
from __future__ import annotations

import torch


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean CLIP score of paired embeddings [N, D] (row i of each side belongs to sample i)."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"paired embeddings must match, got {tuple(image_embeddings.shape)} and "
                         f"{tuple(text_embeddings.shape)}")
    img = torch.nn.functional.normalize(image_embeddings.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeddings.double(), dim=-1)
    return float((100.0 * (img * txt).sum(dim=-1)).clamp_min(0.0).mean())
