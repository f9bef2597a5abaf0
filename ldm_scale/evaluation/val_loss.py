"""Fixed-timestep validation loss: the diffusion loss of the current weights on a held-out shard
set, at a fixed list of timesteps, with fixed noise (the kind of target MLPerf Training's
text-to-image benchmarks use instead of a noisy training loss).

    val/loss            mean over the held-out samples and the timesteps
    val/loss_t<t>       mean over the samples at timestep t

The number depends on the weights only, never on the world size, batch layout or a resume:

- the held-out set is read **once per rank, whole** (it is small: ``eval.val_samples``), in the
  planned order of :class:`~ldm_scale.data.one_pass.OnePassLoader` (the same for any world size),
  and kept in host memory as decoded images or stored latents and raw conditions;
- latents are the posterior **mean** (images encoded by the frozen first stage, or the stored
  ``latent_mean``); the noise of sample ``i`` at timestep slot ``k`` is draw ``k`` of a generator
  seeded ``sample_seed(seed, VALIDATION, i)`` (``diffusion/noise.py``'s rule);
- batches are fixed slices of that order (``eval.val_batch_size``), batch ``b`` evaluated by rank
  ``b % world``: a sample is always computed in the same batch, so its loss is bitwise the same on
  any world size. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
  in each), repeating its last batch when it has fewer; the repeats are not counted;
- per-sample losses go into a zero-filled ``[N, K]`` matrix, one rank's rows each, summed over
  ranks (``x + 0`` is exact), and every rank averages it in float64 in index order.

Costs one forward pass per sample and timestep (the first-stage encoding once, at the first
validation), plus one all-reduce of ``N x K`` floats.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ldm_scale import dist
from ldm_scale.data.config import DataConfig
from ldm_scale.diffusion.noise import VALIDATION, sample_seed

log = logging.getLogger(__name__)

DEFAULT_TIMESTEP_COUNT = 8


def default_timesteps(num_timesteps: int, count: int = DEFAULT_TIMESTEP_COUNT) -> List[int]:
    """``count`` timesteps at the centres of equal bins of [0, T): 62, 187, ..., 937 for T = 1000."""
    return [int((2 * k + 1) * num_timesteps // (2 * count)) for k in range(count)]


def fixed_noise(index: int, shape: Sequence[int], count: int, seed: int) -> torch.Tensor:
    """``[count, *shape]``: the noise of held-out sample ``index`` at each timestep slot."""
    g = torch.Generator().manual_seed(sample_seed(seed, VALIDATION, int(index)))
    return torch.randn((count, *shape), generator=g)


def batch_slices(n: int, batch_size: int, rank: int, world_size: int) -> Tuple[List[slice], int]:
    """This rank's batches (slices of the planned order) and the number of forward passes every
    rank makes (the largest share; ranks with fewer repeat their last batch)."""
    starts = list(range(0, n, batch_size))
    mine = [slice(s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world_size == rank]
    passes = -(-len(starts) // world_size)
    return mine, passes


def _concat(batches: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
    return out


def _take(held: Dict[str, Any], s: slice) -> Dict[str, Any]:
    return {k: v[s] for k, v in held.items()}


class FixedTimestepValidation:
    """Reads the held-out set on first use; :meth:`run` returns ``{"val/loss": ..., "val/loss_t<t>": ...}``
    (the same dict on every rank). ``task`` provides ``validation_latents(batch)`` (unscaled
    posterior means) and ``validation_loss(latents, batch, t, noise)`` (per-sample losses)."""

    def __init__(self, data: DataConfig, urls: List[str], *, n_samples: int, batch_size: int,
                 timesteps: Sequence[int], seed: int, storage_defaults=None):
        # Square centre crops even when training is bucketed: one batch shape, and the same held-out
        # inputs for every run (a micro-conditioned model is told "uncropped at this size").
        self.data = dataclasses.replace(data, urls=list(urls), num_workers=0,
                                        buckets=dataclasses.replace(data.buckets, enabled=False))
        self.n_samples, self.batch_size = n_samples, batch_size
        self.timesteps, self.seed = [int(t) for t in timesteps], seed
        self.storage_defaults = storage_defaults
        self._held: Optional[Dict[str, Any]] = None
        # batch start -> (latents [B, *latent] on the host, noise [B, K, *latent]): this rank's
        # batches only, encoded and drawn at the first validation, reused by every later one.
        self._inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_run(cls, cfg) -> "FixedTimestepValidation":
        """From a training run's config (``eval.val_*`` over ``data.*``; validated by ``validate()``)."""
        e = cfg.eval
        return cls(cfg.data, list(e.val_data), n_samples=e.val_samples, batch_size=e.val_batch_size,
                   timesteps=list(e.val_timesteps) or default_timesteps(cfg.diffusion.num_timesteps), seed=e.seed)

    def _read(self) -> Dict[str, Any]:
        from ldm_scale.data.one_pass import OnePassLoader

        # Every rank reads the whole (small) set as a world of one: the order and the batches must
        # not depend on the world size.
        whole = dist.DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
        loader = OnePassLoader(self.data, whole, batch_size=self.batch_size, n_samples=self.n_samples,
                               seed=self.seed, storage_defaults=self.storage_defaults)
        batches = list(loader)
        if not batches:
            raise ValueError(f"eval.val_data {self.data.urls}: no readable sample ({loader.counts()})")
        held = _concat(batches)
        order = torch.argsort(held["index"])  # planned order (one worker reads in it already)
        held = {k: (v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order.tolist()])
                for k, v in held.items()}
        if dist.get_dist_info().is_main:
            log.info("validation: %d held-out samples from %s at timesteps %s", len(held["index"]),
                     self.data.urls, self.timesteps)
        return held

    @torch.no_grad()
    def run(self, task) -> Dict[str, float]:
        if self._held is None:
            self._held = self._read()
        held = self._held
        n, k = len(held["index"]), len(self.timesteps)
        info = dist.get_dist_info()
        mine, passes = batch_slices(n, self.batch_size, info.rank, info.world_size)
        losses = torch.zeros(n, k, dtype=torch.float32, device=task.device)  # stays there: no sync per batch
        work = mine + [mine[-1] if mine else slice(0, min(self.batch_size, n))] * (passes - len(mine))
        for i, s in enumerate(work):
            batch = _take(held, s)
            if s.start not in self._inputs:
                # The frozen first stage encodes each held-out image once (.cpu(): one sync per batch,
                # once per run); the noise is fixed for the run.
                z0 = task.validation_latents(batch).cpu()
                noise = torch.stack([fixed_noise(int(j), z0.shape[1:], k, self.seed) for j in held["index"][s]])
                self._inputs[s.start] = (z0, noise)
            z0, noise = self._inputs[s.start]
            rows = []
            for slot, t in enumerate(self.timesteps):
                tt = torch.full((len(z0),), t, dtype=torch.long)
                rows.append(task.validation_loss(z0, batch, tt, noise[:, slot]).float())
            if i < len(mine):  # a repeat keeps ZeRO-3's gathers in step and is not counted
                losses[s] = torch.stack(rows, dim=1)
        # On the task's device (NCCL reduces device tensors only). The .cpu() is this validation's
        # one host sync, after all its forward passes.
        table = dist.all_reduce_sum(losses).cpu().double().numpy()
        out = {"val/loss": float(np.mean(table))}
        for slot, t in enumerate(self.timesteps):
            out[f"val/loss_t{t}"] = float(np.mean(table[:, slot]))
        return out
