"""Shard lists and their order: expand URL patterns, know shard sizes, order by (seed, epoch), split
by rank then by worker, and the per-worker shard sequences of both modes.

Everything here is a pure function of its arguments (no hidden RNG state): the same (seed, epoch,
rank, worker) always gives the same shards, which is what makes the loader's exact resume possible.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ldm_scale import storage


@dataclass(frozen=True)
class ShardSet:
    """All shards of a data config. Shard ``i`` is ``urls[i]`` from dataset ``dataset_of[i]``."""

    urls: List[str]
    dataset_of: List[int]
    sizes: Optional[List[int]]  # samples per shard, when sizes.json / _stats.json exist

    @property
    def num_datasets(self) -> int:
        return max(self.dataset_of) + 1

    def of_dataset(self, d: int) -> List[int]:
        return [i for i, ds in enumerate(self.dataset_of) if ds == d]

    def total(self, shards: Sequence[int]) -> Optional[int]:
        return None if self.sizes is None else int(sum(self.sizes[i] for i in shards))


def _stats_url(shard_url: str) -> str:
    base = shard_url
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base + "_stats.json"


def _directory_entries(urls: Sequence[str], file_name: str, cfg: Optional[storage.StorageConfig]) -> List[Any]:
    """Each shard's entry in the ``file_name`` table ({tar file name: value}) of its directory, read
    once per directory; None where the table or the entry is absent."""
    tables: Dict[str, Optional[dict]] = {}
    out = []
    for url in urls:
        d = storage.parent(url)
        if d not in tables:
            table_url = storage.join(d, file_name)
            tables[d] = json.loads(storage.read_text(table_url, cfg)) if storage.exists(table_url, cfg) else None
        table = tables[d]
        out.append(None if table is None else table.get(url.rsplit("/", 1)[-1]))
    return out


def load_sizes(urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> Optional[List[int]]:
    """Samples per shard from ``sizes.json`` in each shard directory (written by make_synthetic,
    precompute_latents and inspect), else each shard's img2dataset ``_stats.json`` ("successes").
    None when neither exists for some shard."""
    out: List[Optional[int]] = []
    missing = []
    for i, entry in enumerate(_directory_entries(urls, "sizes.json", cfg)):
        out.append(None if entry is None else int(entry))
        if entry is None:
            missing.append(i)
    if missing:
        def stats(i: int) -> Optional[int]:
            su = _stats_url(urls[i])
            if not storage.exists(su, cfg):
                return None
            s = json.loads(storage.read_text(su, cfg))
            return int(s.get("successes", s.get("count", 0)))

        with ThreadPoolExecutor(16) as pool:
            for i, n in zip(missing, pool.map(stats, missing)):
                if n is None:
                    return None
                out[i] = n
    return [int(n) for n in out]  # type: ignore[arg-type]


def load_aspects(urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> List[Dict[str, int]]:
    """Each shard's aspect histogram ({bin: samples}, ``data/buckets.aspect_bin``) from the
    ``aspects.json`` of its directory; FileNotFoundError naming the file and the fix when a shard
    has none."""
    out: List[Dict[str, int]] = []
    for url, entry in zip(urls, _directory_entries(urls, "aspects.json", cfg)):
        if entry is None:
            raise FileNotFoundError(
                f"no aspect histogram for shard {storage.redact(url)} in "
                f"{storage.redact(storage.join(storage.parent(url), 'aspects.json'))}, "
                "which data.buckets needs to plan its epochs: run `python data_tools/inspect_shards.py data=<urls>` "
                "(writes aspects.json from the image headers) or set data.buckets.enabled=false")
        out.append({str(k): int(v) for k, v in entry.items()})
    return out


def resolve_shards(url_patterns: Sequence[str], cfg: Optional[storage.StorageConfig] = None,
                   need_sizes: bool = True) -> ShardSet:
    """Expand every dataset's pattern; check the first shard of each exists (a clear error naming the
    URL when a bucket is unreachable or a pattern matches nothing)."""
    urls: List[str] = []
    dataset_of: List[int] = []
    for d, pattern in enumerate(url_patterns):
        expanded = storage.expand_urls(pattern, cfg)
        if not storage.exists(expanded[0], cfg):
            raise FileNotFoundError(f"shard {storage.redact(expanded[0])} (first of data.urls[{d}] = "
                                    f"{storage.redact(pattern)!r}) does not exist")
        urls.extend(expanded)
        dataset_of.extend([d] * len(expanded))
    sizes = load_sizes(urls, cfg) if need_sizes else None
    return ShardSet(urls, dataset_of, sizes)


def epoch_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    """All shard indices in the order of ``epoch`` (a permutation seeded by (seed, epoch))."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)]


def split(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int) -> List[int]:
    """This (rank, worker)'s slice: round-robin over ranks first, then over the rank's workers."""
    return list(order[rank::world_size][worker::num_workers])


def _chunks(items: Sequence[int], size: int) -> Iterator[List[int]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def epoch_blocks(assigned: Sequence[int], fallback: Sequence[int], seed: int, epoch: int, salt: int,
                 rank: int, worker: int, shards_per_block: int) -> Iterator[List[int]]:
    """A worker's shards in epoch mode, in blocks of up to ``shards_per_block``: its assigned shards
    once, then (only if the epoch needs more batches than the worker's shards hold, e.g. after heavy
    filtering) further passes over them in fresh orders, so every rank produces the same number of
    batches and none waits at the epoch end. A block never mixes two passes, so the first pass is
    read completely before any shard repeats."""
    first = list(assigned)
    yield from _chunks(first, shards_per_block)
    pool = first or list(fallback)
    p = 1
    while True:
        rng = np.random.default_rng([seed, epoch, salt, rank, worker, p, 0x9A55])
        yield from _chunks([pool[int(i)] for i in rng.permutation(len(pool))], shards_per_block)
        p += 1


def resampled_blocks(shards: ShardSet, weights: Sequence[float], seed: int, epoch: int, salt: int,
                     rank: int, worker: int, shards_per_block: int) -> Iterator[List[int]]:
    """A worker's shards in resampled mode: dataset ``d`` drawn with probability ``weights[d]``, then
    a shard of it uniformly, with replacement, forever (a weighted mixture), in blocks."""
    per_dataset = [shards.of_dataset(d) for d in range(shards.num_datasets)]
    w = np.asarray(weights if weights else [1.0] * len(per_dataset), dtype=np.float64)
    w = w / w.sum()
    rng = np.random.default_rng([seed, epoch, salt, rank, worker, 0x4E5A])
    while True:
        block = []
        for _ in range(shards_per_block):
            d = int(rng.choice(len(per_dataset), p=w))
            block.append(per_dataset[d][int(rng.integers(len(per_dataset[d])))])
        yield block


def shard_set_dirs(urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> List[str]:
    """The directories of the shards of ``urls`` (data.urls entries), each once, in order."""
    dirs: Dict[str, None] = {}
    for entry in urls:  # brace expansion only for local/brace patterns; globs list the bucket
        for url in storage.expand_urls(entry, cfg):
            dirs.setdefault(storage.parent(url))
    return list(dirs)


def read_dataset_card(shard_dir: str, cfg: Optional[storage.StorageConfig] = None) -> Optional[Dict]:
    """The ``dataset.json`` our tools write beside a shard set (what made it: the synthetic
    generator, the latent encoder, the text encoder), or None when there is none."""
    url = storage.join(shard_dir, "dataset.json")
    try:
        card = json.loads(storage.read_text(url, cfg))
    except (OSError, ValueError):  # absent, unreadable, or not JSON: no card our tools wrote
        return None
    return card if isinstance(card, dict) else None

