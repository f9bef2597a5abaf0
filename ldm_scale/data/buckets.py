"""Aspect-ratio buckets (NovelAI's bucketing, SDXL's multi-aspect training; Podell et al. 2023,
Sec. 2.3 and Appendix I): a set of image sizes of about equal pixel count, the rule that assigns an
image to one from its metadata alone, and the per-epoch schedule that gives every rank the same
bucket at the same step.

Pure functions of their arguments (no I/O, no global RNG), so every rank and every restart computes
the same sets, assignments and schedules.

- :func:`make_buckets`: widths in multiples of ``step``; for each, the largest height in multiples
  of ``step`` whose area does not exceed ``resolution**2``; the aspect range capped at
  ``max_aspect``; both orientations. With ``resolution=1024, step=64, max_aspect=4``: 1024x1024,
  1088x960, 1152x896, 1216x832, 1280x768, 1344x768, ..., 2048x512 and their transposes, the
  SDXL-style sizes of 0.96-1.0 megapixels.
- :func:`assign_bucket`: the bucket nearest in log aspect ratio (ties: the squarer one) of an
  image's original size (img2dataset's ``original_width``/``original_height``, else
  ``width``/``height``): no decode needed.
- :func:`bucket_schedule`: which bucket each global batch of an epoch holds: ``n_batches`` split over
  the buckets in proportion to their sample counts by largest remainder, in an order seeded by
  ``(seed, epoch, salt)``.
- :func:`aspect_bin` / :func:`bucket_counts`: the per-shard aspect histogram of ``aspects.json``
  (bins of 1/64 octave of width/height, bucket-set independent, so one file serves every bucket
  config) and the per-shard bucket counts the schedule is made from.

The loader assigns an image to a bucket by its *stored* size (what is resized and cropped: img2dataset
writes it as ``width``/``height``, and the image header has it); :func:`original_size` is the size
before any download-time resize, which SDXL's micro-conditioning reports.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Bucket = Tuple[int, int]  # (width, height) in pixels

# Salt of the schedule's generator: other seeded streams of the loader use other salts.
_SCHEDULE_SALT = 0xB0C7
# aspects.json bins: round(BINS_PER_OCTAVE * log2(width / height)); 1/64 octave is a 1.1% ratio step,
# finer than any bucket set's spacing (64 px steps at 1024 px are ~6%).
BINS_PER_OCTAVE = 64


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> List[Bucket]:
    """The bucket sizes for ``resolution``-squared pixels (see the module doc), sorted from the
    tallest to the widest; always contains the square ``(resolution, resolution)`` when
    ``resolution`` is a multiple of ``step``."""
    if step < 1 or resolution < step:
        raise ValueError(f"bucket step {step} must be >= 1 and <= resolution {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect={max_aspect} must be >= 1")
    area = resolution * resolution
    landscape = []
    width = step * max(1, resolution // step)
    while True:
        height = (area // width) // step * step
        if height < step or width / height > max_aspect + 1e-9:
            break
        landscape.append((width, height))
        width += step
    buckets = set(landscape) | {(h, w) for w, h in landscape}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: float, height: float, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket nearest to ``width / height`` in log aspect ratio (ties: the squarer)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    target = math.log(width / height)

    def distance(i: int) -> Tuple[float, float]:
        w, h = buckets[i]
        log_ratio = math.log(w / h)
        return round(abs(log_ratio - target), 12), abs(log_ratio)

    return min(range(len(buckets)), key=distance)


def original_size(meta: Dict) -> Optional[Tuple[float, float]]:
    """(width, height) of a sample's original image from its metadata, or None when absent."""
    for w_key, h_key in (("original_width", "original_height"), ("width", "height")):
        w, h = meta.get(w_key), meta.get(h_key)
        if w is not None and h is not None:
            try:
                w, h = float(w), float(h)
            except (TypeError, ValueError):
                continue
            if w > 0 and h > 0:
                return w, h
    return None


def aspect_bin(width: float, height: float) -> int:
    """The ``aspects.json`` bin of an image of ``width`` x ``height``."""
    return int(round(BINS_PER_OCTAVE * math.log2(width / height)))


def bucket_counts(aspects: Sequence[Dict[str, int]], buckets: Sequence[Bucket]) -> np.ndarray:
    """[shards, buckets] int64: each shard's samples per bucket from its aspect histogram (a bin's
    samples go to the bucket of the bin's centre ratio: exact except for images within 1/128 octave
    of a boundary between two buckets, and the counts only set the schedule's proportions)."""
    out = np.zeros((len(aspects), len(buckets)), dtype=np.int64)
    of_bin: Dict[int, int] = {}
    for s, histogram in enumerate(aspects):
        for key, n in histogram.items():
            b = int(key)
            if b not in of_bin:
                of_bin[b] = assign_bucket(2.0 ** (b / BINS_PER_OCTAVE), 1.0, buckets)
            out[s, of_bin[b]] += int(n)
    return out


def bucket_schedule(counts: Sequence[float], n_batches: int, seed: int, epoch: int, salt: int = 0) -> List[int]:
    """The bucket index of each of an epoch's ``n_batches`` global batches.

    Batches are shared out in proportion to ``counts`` (samples per bucket) by largest remainder
    (ties: the lower index), so a bucket holding a fraction p of the data gets floor or ceil of
    p * n_batches batches; the order is a permutation seeded by ``(seed, epoch, salt)`` (``salt``
    changes when an elastic resume re-splits an epoch). The same on every rank: it depends on
    nothing else. ``counts`` may be fractional (a weighted mixture's expected counts).
    """
    if n_batches < 0:
        raise ValueError("n_batches must be >= 0")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("bucket counts are all zero: no sample has a bucket")
    exact = [n_batches * c / total for c in counts]
    shares = [int(math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: n_batches - sum(shares)]:
        shares[i] += 1
    order = np.repeat(np.arange(len(counts)), shares)
    rng = np.random.default_rng([int(seed) % (1 << 64), int(epoch), int(salt), _SCHEDULE_SALT])
    return [int(b) for b in rng.permutation(order)]
