"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 4).

IS = exp(E_x KL(p(y|x) || p(y))), computed on ``splits`` consecutive parts of the sample and
reported as mean and standard deviation over the parts (10 splits is the published protocol).
The parts are consecutive by default, as in the original TF code and the ADM evaluator;
``shuffle=True`` permutes the samples first with ``numpy.random.RandomState(seed).permutation``,
torch-fidelity's default (``isc_features_to_metric(shuffle=True, rng_seed=2020)``), so its numbers
can be reproduced exactly. Only the std (and, for ordered samples, the mean) depends on the choice.
Following the original TF code and the ADM evaluator, p(y|x) is the softmax of the 1008-way
logits computed *without* the final bias (``pool3 @ W``); pass whichever logits your extractor gives.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch


TORCH_FIDELITY_SEED = 2020  # torch-fidelity's default rng_seed for the shuffle


def inception_score(logits: Union[np.ndarray, torch.Tensor], splits: int = 10, *, shuffle: bool = False,
                    seed: int = TORCH_FIDELITY_SEED) -> Tuple[float, float]:
    """(mean, std) of the Inception Score of ``logits`` [N, C] over ``splits`` parts (consecutive, or
    of the samples permuted by ``seed`` when ``shuffle``)."""
    x = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be [N, classes], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"cannot split {n} samples into {splits} parts (need N >= splits >= 1)")
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        # log p(y) of the part = log mean_x p(y|x), computed stably in log space.
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
