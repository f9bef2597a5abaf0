"""Distributed, resumable generation of an evaluation sample set.

The N samples are cut into fixed chunks of ``chunk_size`` consecutive indices; chunk ``c`` is made by
rank ``c mod world`` and written as one ``.npz`` (``images`` uint8 [B, H, W, 3], ``indices``, and the
``labels`` / ``captions`` used), so a crashed run redoes at most one chunk per rank. Determinism does
not depend on the number of ranks or the chunk size: sample ``i`` is seeded by the rule of
``diffusion/noise.py`` (its initial noise from (seed, i), its sampler noise from its own generator),
as in training grids and ``launch/sample.py``. The condition of sample ``i`` is
``conditions[i mod len(conditions)]``.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ldm_scale import dist, storage
from ldm_scale.diffusion.noise import PerSampleGenerators, initial_noise
from ldm_scale.evaluation.preprocess import nhwc_uint8

# sample_batch(x_T [B, C, h, w], raw_condition, generator) -> images [B, 3, H, W] in [-1, 1]
SampleBatchFn = Callable[[torch.Tensor, Any, PerSampleGenerators], torch.Tensor]


def chunk_ranges(n_samples: int, chunk_size: int) -> List[Tuple[int, int]]:
    if n_samples <= 0 or chunk_size <= 0:
        raise ValueError(f"n_samples and chunk_size must be positive, got {n_samples}, {chunk_size}")
    return [(s, min(s + chunk_size, n_samples)) for s in range(0, n_samples, chunk_size)]


def chunk_url(samples_url: str, start: int, end: int) -> str:
    return storage.join(samples_url, f"{start:08d}-{end:08d}.npz")


def conditions_for(indices: Sequence[int], conditions: Optional[Sequence]) -> Any:
    """Raw conditions for ``indices``: LongTensor for class labels, list[str] for captions, or None."""
    if conditions is None or len(conditions) == 0:
        return None
    picked = [conditions[i % len(conditions)] for i in indices]
    if isinstance(picked[0], str):
        return [str(p) for p in picked]
    return torch.tensor([int(p) for p in picked], dtype=torch.long)


def _write_npz(url: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(url, buf.getvalue())


def read_npz(url: str) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _chunk_complete(url: str, start: int, end: int, key: str) -> bool:
    """A chunk counts as done only if it reads back with the right indices (object writes are
    atomic, but a chunk from a run with another N or chunk size must not be reused)."""
    if not storage.exists(url):
        return False
    try:
        data = read_npz(url)
    except Exception:  # a torn or foreign file: regenerate it
        return False
    return key in data and np.array_equal(data.get("indices"), np.arange(start, end))


@dataclass
class GenerationStats:
    chunks_made: int
    chunks_skipped: int
    images_made: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_made / self.seconds if self.seconds > 0 else 0.0


def generate_samples(sample_batch: SampleBatchFn, *, samples_url: str, n_samples: int, chunk_size: int,
                     seed: int, latent_shape: Sequence[int], conditions: Optional[Sequence] = None,
                     device: torch.device | str = "cpu",
                     on_chunk: Optional[Callable[[int, int], None]] = None) -> GenerationStats:
    """Make this rank's missing chunks under ``samples_url`` (collective: ends with a barrier)."""
    info = dist.get_dist_info()
    made = skipped = images = 0
    seconds = 0.0
    for c, (start, end) in enumerate(chunk_ranges(n_samples, chunk_size)):
        if c % info.world_size != info.rank:
            continue
        url = chunk_url(samples_url, start, end)
        if _chunk_complete(url, start, end, "images"):
            skipped += 1
            continue
        t0 = time.perf_counter()
        indices = list(range(start, end))
        raw = conditions_for(indices, conditions)
        generator = PerSampleGenerators(seed, indices)
        with torch.no_grad():
            out = sample_batch(initial_noise(latent_shape, indices, seed, device), raw, generator)
        arrays = {"images": nhwc_uint8(out.clamp(-1, 1)), "indices": np.arange(start, end)}
        if isinstance(raw, torch.Tensor):
            arrays["labels"] = raw.numpy()
        elif isinstance(raw, list):
            arrays["captions"] = np.asarray(raw, dtype=str)
        _write_npz(url, **arrays)
        seconds += time.perf_counter() - t0
        made += 1
        images += end - start
        if on_chunk is not None:
            on_chunk(c, end - start)
    dist.barrier()
    return GenerationStats(made, skipped, images, seconds)


def load_samples(samples_url: str, n_samples: int, chunk_size: int) -> Dict[str, Any]:
    """All chunks concatenated in index order: ``images`` uint8 [N, H, W, 3] (+ ``labels``/``captions``)."""
    parts = [read_npz(chunk_url(samples_url, s, e)) for s, e in chunk_ranges(n_samples, chunk_size)]
    out: Dict[str, Any] = {"images": np.concatenate([p["images"] for p in parts])}
    if "labels" in parts[0]:
        out["labels"] = np.concatenate([p["labels"] for p in parts])
    if "captions" in parts[0]:
        out["captions"] = [str(c) for p in parts for c in p["captions"]]
    return out


def extract_chunk_features(extractor, *, samples_url: str, features_url: str, n_samples: int,
                           chunk_size: int, batch_size: int = 50) -> None:
    """Features of every chunk, one ``.npz`` per chunk under ``features_url`` (resumable, collective)."""
    from ldm_scale.evaluation.features import extract_features
    from ldm_scale.evaluation.preprocess import nchw_uint8

    info = dist.get_dist_info()
    for c, (start, end) in enumerate(chunk_ranges(n_samples, chunk_size)):
        if c % info.world_size != info.rank:
            continue
        url = chunk_url(features_url, start, end)
        if _chunk_complete(url, start, end, "pool"):
            continue
        images = nchw_uint8(read_npz(chunk_url(samples_url, start, end))["images"])
        feats = extract_features(extractor, images, batch_size)
        _write_npz(url, indices=np.arange(start, end), **{k: v.numpy() for k, v in feats.items()})
    dist.barrier()


def load_features(features_url: str, n_samples: int, chunk_size: int) -> Dict[str, np.ndarray]:
    parts = [read_npz(chunk_url(features_url, s, e)) for s, e in chunk_ranges(n_samples, chunk_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "indices"}


def write_adm_npz(samples_url: str, out_url: str, n_samples: int, chunk_size: int) -> None:
    """One ``arr_0`` file in the ADM evaluator's sample-batch format (``label_arr`` if class-conditional)."""
    data = load_samples(samples_url, n_samples, chunk_size)
    arrays = {"arr_0": data["images"]}
    if "labels" in data:
        arrays["label_arr"] = data["labels"]
    _write_npz(out_url, **arrays)
