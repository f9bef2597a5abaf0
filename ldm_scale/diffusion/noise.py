"""Gaussian noise drawn from an explicit ``torch.Generator`` (reproducible on any device), and the
one seeding rule of generation.

A generator lives on one device; drawing there and moving the result gives the same numbers for
CPU and CUDA runs with a CPU generator (the convention diffusers' ``randn_tensor`` also follows,
which lets the reference tests compare stochastic trajectories draw for draw).

**Seeding rule** (training grids, ``launch/sample.py``, ``eval/fid.py`` alike): sample ``i`` of a
generation seeded ``seed`` starts from noise drawn by a generator seeded ``sample_seed(seed, NOISE,
i)``, and every later draw the sampler makes for it (DDIM with eta > 0, DDPM) comes from its own
generator seeded ``sample_seed(seed, SAMPLER, i)`` (:class:`PerSampleGenerators`). So an image
depends on (model, condition, sampler, seed, i) only: not on the batch it was made in, the world
size, or the entry point.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

NOISE, SAMPLER, VALIDATION = 0, 1, 2  # the streams of sample_seed (VALIDATION: evaluation/val_loss.py)


def sample_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 63-bit seed for item ``index`` of ``stream`` (numpy's SeedSequence hashing:
    neighbouring seeds and indices give unrelated streams, unlike ``seed + index``)."""
    words = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def initial_noise(shape: Sequence[int], indices: Sequence[int], seed: int,
                  device: Union[torch.device, str] = "cpu") -> torch.Tensor:
    """x_T for the given sample indices, [len(indices), *shape]; row i depends only on (seed, i)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, NOISE, i)))
            for i in indices]
    return torch.stack(rows).to(device)


class PerSampleGenerators:
    """One CPU generator per sample of a batch, seeded by the rule above; :func:`randn` draws row
    ``b`` of a batch from generator ``b``. Pass it wherever a sampler takes a ``generator``."""

    device = torch.device("cpu")

    def __init__(self, seed: int, indices: Sequence[int], stream: int = SAMPLER):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, stream, i)) for i in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device: Union[torch.device, str], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"a draw of shape {shape} for {len(self.generators)} per-sample generators: the "
                             "first dimension must be the batch")
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators]
        # non_blocking: a sampler draws once per step; a blocking copy to a GPU would wait for the
        # step's kernels each time (from pageable memory the bytes are staged at once: safe to free).
        return torch.stack(rows).to(device, non_blocking=True)

    def torch_generator(self) -> torch.Generator:
        """One plain generator seeded from the first sample's (for a draw that is not per sample)."""
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generators[0])))


Generator = Union[torch.Generator, PerSampleGenerators, None]


def randn(
    shape: Sequence[int],
    *,
    generator: Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``device``, drawn on the generator's device (row by
    row from :class:`PerSampleGenerators`)."""
    if isinstance(generator, PerSampleGenerators):
        return generator.randn(shape, device, dtype)
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def with_offset_noise(noise: torch.Tensor, offset: float, generator: Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): add ``offset`` x N(0, 1) per (sample, channel), constant over space.

    Lets the model change the mean brightness of an image, which plain i.i.d. noise almost never
    perturbs at the lowest frequency.
    """
    if offset == 0.0:
        return noise
    per_channel = randn((noise.shape[0], noise.shape[1]) + (1,) * (noise.ndim - 2),
                        generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset * per_channel
