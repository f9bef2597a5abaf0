"""The streaming shard loader with exact resume: ``build_loader(cfg, dist_info, batch_size=, seed=)``.

How a batch is made (each step a pure function of (seed, epoch, position)):

1. Shards are ordered by (seed, epoch) (epoch mode) or drawn with replacement by dataset weight
   (resampled mode), split round-robin by rank and then by DataLoader worker (``shards.py``).
2. A worker reads its shard sequence in *blocks* of ``shards_per_block`` shards, interleaving their
   samples; samples that fail metadata checks are dropped and counted before buffering.
3. Surviving raw samples (still undecoded bytes) pass through a shuffle buffer seeded by
   (seed, epoch, rank, worker, block). The buffer drains at each block's end, so a position is just
   (block, samples popped in that block).
4. Popped samples are decoded and cropped/flipped (seeded per sample; a failure is counted and
   skipped) and batched inside the worker, still uint8. Each batch travels with its worker's
   position and skip counters.
5. The main process hands batches out in DataLoader's strict round-robin worker order and records a
   worker's position only when its batch is handed out: prefetched batches never count. It makes
   the images float in [-1, 1] as it hands them out (4x fewer bytes cross the process boundary),
   or leaves them uint8 for the device to normalise (``uint8_images``, see ``data/device.py``).
6. Captions are tokenised in the workers when the trainer hands the loader its text encoder's
   tokenizer (``tokenize=``): the batch then also carries ``tokens`` [B, L] (int64), so the main
   process never runs the tokenizer's Python loop between two steps. With ``data.text_embeddings``
   the shards hold the frozen encoder's outputs instead (``data/text_embeddings.py``): batches carry
   ``text_context`` [B, L, D] (and ``text_pooled`` [B, P]) in their stored dtype, and no tokens.

With aspect-ratio buckets (``data.buckets``, :func:`_bucketed_stream`) step 4 changes: a popped
sample waits, undecoded, in its bucket's FIFO queue, and each batch takes the bucket that the epoch's
schedule (``buckets.bucket_schedule``, the same on every rank) gives its global index; a position
then also holds each queue's oldest sample, and a restart replays from there.

Workers persist across epochs (``data.persistent_workers``, default on): a worker's stream goes on
into the next epoch by itself (the next epoch's plan is a pure function of the current one), so
the DataLoader is started once per run, not once per epoch, and it prefetches the next epoch's
first batches while the last ones of this epoch train. Which logical worker a physical worker plays
shifts at each epoch boundary by the number of batches the epoch handed out (see
:meth:`_EpochDataset.__iter__`), so batch ``g`` of every epoch still comes from logical worker
``g % num_workers`` and the batches are exactly those of a per-epoch restart.

Exact resume (same world size and workers): a worker restarts at its recorded block, replays the
block's raw bytes through the same buffer without decoding the samples already consumed, and goes
on; the DataLoader's worker rotation is offset so the next batch comes from the right worker.
Different world size or worker count: the shards every old rank had fully finished this epoch
(gathered from all ranks by :meth:`ShardLoader.state_dict`) are removed and the rest of the epoch
is re-split over the new topology: no whole shard is repeated or skipped (partly read shards are read
again from the start).

Every rank yields exactly :attr:`ShardLoader.batches_per_epoch` batches: a worker that runs out of
shards early (heavy filtering, uneven shards) continues with further passes over its own shards,
so no rank waits for another at the end of an epoch.

Why one module of ~600 lines: its state is one position shared by the worker-side stream
(:func:`_worker_stream`, :class:`_EpochDataset`) and the main-process hand-out
(:class:`ShardLoader`), and every invariant above (what a position means, when it is recorded, the
worker rotation across epochs and resumes, the re-split on a new topology) holds between those two
halves; split, neither would be readable without the other open. The parts with a job of their own
already live apart: shard order and splitting (``shards.py``), tar reading (``tar_stream.py``),
sample checks (``filters.py``), decode and crop (``transforms.py``), the device hand-off
(``device.py``), the one-pass reader (``one_pass.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ldm_scale import dist, storage
from ldm_scale.data import buckets as bucket_lib
from ldm_scale.data import shards as shard_lib
from ldm_scale.data import text_embeddings
from ldm_scale.data.config import DataConfig, worker_start_method
from ldm_scale.data.filters import LATENT_EXT, check_sample, image_member
from ldm_scale.data.tar_stream import iter_tar_samples
from ldm_scale.data.transforms import (
    batch_to_unit_range,
    crop_to_bucket,
    decode_image,
    decode_latent,
    image_header_size,
    latent_header_size,
    resize_crop_flip,
    sample_rng,
    stack_uint8,
)
from ldm_scale.models.micro_conditioning import BATCH_KEYS as MICRO_CONDITIONING

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class _Plan:
    """Everything a worker needs for one epoch (picklable; no open handles)."""

    cfg: DataConfig
    storage: storage.StorageConfig  # resolved in the parent: workers never read the process-wide default
    urls: List[str]
    shard_set: shard_lib.ShardSet
    epoch_shards: List[int]  # epoch mode: the shards of this epoch (all, or the remainder after an elastic resume)
    seed: int
    epoch: int
    salt: int  # changes when an elastic resume re-splits an epoch, so refill/resampled draws are fresh
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    batches_done: int  # handed out so far in this epoch; batch g of the epoch comes from worker g % num_workers
    batches_total: int
    start: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    persistent: bool = False  # go on into the following epochs (data.persistent_workers)
    tokenize: Optional[Callable[[List[str]], torch.Tensor]] = None  # captions -> tokens, in the worker
    # data.buckets: the bucket set, each shard's samples per bucket, and the bucket of each of the
    # epoch's global batches (empty lists: square batches).
    buckets: List[bucket_lib.Bucket] = field(default_factory=list)
    bucket_counts: Optional[np.ndarray] = None
    schedule: List[int] = field(default_factory=list)

    def next_epoch(self) -> "_Plan":
        """The plan of the following epoch, as the main process would make it after rolling over: a
        full epoch in a fresh shard order, no resume positions (the salt stays: it changes only
        when an elastic resume re-splits an epoch)."""
        epoch = self.epoch + 1
        epoch_shards = shard_lib.epoch_order(len(self.urls), self.seed, epoch) if self.cfg.mode == "epoch" else []
        total = epoch_batches(self.cfg, self.shard_set, self.world_size, self.batch_size, epoch_shards,
                              resumed_epoch_shards=False, remaining_samples=None)
        schedule = epoch_schedule(self.cfg, self.shard_set, self.bucket_counts, epoch_shards, total, self.seed, epoch,
                                  self.salt)
        return dataclasses.replace(self, epoch_shards=epoch_shards, epoch=epoch, batches_done=0,
                                   batches_total=total, start={}, schedule=schedule)

    def assigned(self, worker: int) -> List[int]:
        return shard_lib.split(self.epoch_shards, self.rank, self.world_size, worker, self.num_workers)

    def batches_for(self, worker: int) -> int:
        """How many batches ``worker`` still makes this epoch (workers stop there: no wasted tail)."""
        return sum(1 for g in range(self.batches_done, self.batches_total) if g % self.num_workers == worker)

    def blocks(self, worker: int) -> Iterator[List[int]]:
        spb = self.cfg.shards_per_block
        if self.cfg.mode == "epoch":
            return shard_lib.epoch_blocks(self.assigned(worker), self.epoch_shards, self.seed, self.epoch,
                                          self.salt, self.rank, worker, spb)
        return shard_lib.resampled_blocks(self.shard_set, self.cfg.weights, self.seed, self.epoch, self.salt,
                                          self.rank, worker, spb)


def epoch_batches(cfg: DataConfig, shard_set: shard_lib.ShardSet, world_size: int, batch_size: int,
                  epoch_shards: List[int], *, resumed_epoch_shards: bool, remaining_samples: Optional[int]) -> int:
    """Batches every rank yields in one epoch (all ranks agree). ``epoch_shards``: the epoch's shards
    (epoch mode); ``resumed_epoch_shards``: they are the remainder an elastic resume left;
    ``remaining_samples``: the samples a resampled epoch still had at an elastic resume."""
    per_step = world_size * batch_size
    if remaining_samples is not None:
        samples = remaining_samples
    elif cfg.samples_per_epoch is not None:
        samples = cfg.samples_per_epoch
        if cfg.mode == "epoch" and resumed_epoch_shards:
            samples = samples * len(epoch_shards) // len(shard_set.urls)
    elif cfg.mode == "epoch":
        samples = shard_set.total(epoch_shards)
    else:
        samples = shard_set.total(range(len(shard_set.urls)))
    n = int(samples) // per_step
    if n < 1 and not resumed_epoch_shards:
        raise ValueError(f"an epoch of {samples} samples is less than one global batch of {per_step} "
                         f"({world_size} ranks x batch {batch_size})")
    return max(n, 1)


def epoch_schedule(cfg: DataConfig, shard_set: shard_lib.ShardSet, counts: Optional[np.ndarray],
                   epoch_shards: List[int], n_batches: int, seed: int, epoch: int, salt: int) -> List[int]:
    """The bucket of each of the epoch's ``n_batches`` global batches (``buckets.bucket_schedule``
    over the bucket counts of the shards this epoch reads: the epoch's shards, or in resampled mode
    each dataset's share by its weight); [] without buckets. A pure function of global facts, so
    every rank computes the same list."""
    if counts is None:
        return []
    if cfg.mode == "epoch":
        expected = counts[epoch_shards].sum(axis=0).astype(np.float64)
    else:
        weights = np.asarray(cfg.weights or [1.0] * shard_set.num_datasets, dtype=np.float64)
        expected = np.zeros(counts.shape[1])
        for d, w in enumerate(weights / weights.sum()):
            of_d = counts[shard_set.of_dataset(d)].sum(axis=0)
            expected += w * of_d / max(1, of_d.sum())
    return bucket_lib.bucket_schedule(expected.tolist(), n_batches, seed, epoch, salt)


def _interleave(iterators: List[Iterator[Dict]]) -> Iterator[Dict]:
    active = list(iterators)
    while active:
        for it in list(active):
            try:
                yield next(it)
            except StopIteration:
                active.remove(it)


def _shuffle(samples: Iterator[Dict], size: int, rng: np.random.Generator) -> Iterator[Dict]:
    """Classic reservoir-style shuffle buffer, drained completely when the input ends."""
    if size <= 1:
        yield from samples
        return
    buf: List[Dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        out, buf[i] = buf[i], s
        yield out
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


class _Counters:
    """Counter proxy: counts go to the live counter, or to a scratch one while a resumed worker
    replays the part of a block it had already counted before the restart."""

    def __init__(self, live: Counter):
        self.live = live
        self.current = live

    def __getitem__(self, key: str) -> int:
        return self.current[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.current[key] = value


# SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2) in bucketed batches: MICRO_CONDITIONING
# names the [B, 2] (height, width) / (top, left) tensors: the size before any resize, the crop
# offset, the bucket (the model side reads them by the same names).


def _collate(samples: List[Dict], cfg: DataConfig,
             tokenize: Optional[Callable[[List[str]], torch.Tensor]] = None) -> Dict[str, Any]:
    batch: Dict[str, Any] = {"key": [s["__key__"] for s in samples]}
    if cfg.input == "image":
        batch["image"] = stack_uint8([s["image"] for s in samples])  # made float by _finish
    else:
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])
        batch["latent_logvar"] = torch.stack([s["latent_logvar"] for s in samples])
    if cfg.buckets.enabled:
        for name in MICRO_CONDITIONING:
            batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
    if cfg.conditioning == "text":
        batch["caption"] = [s["caption"] for s in samples]
        if cfg.text_embeddings:
            text_embeddings.collate_into(batch, samples)
        elif tokenize is not None:
            batch["tokens"] = tokenize(batch["caption"]).to(torch.long)
    elif cfg.conditioning == "class":
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


def _process(raw: Dict, plan: _Plan, block: int, counters: "_Counters",
             bucket: Optional[bucket_lib.Bucket] = None) -> Optional[Dict]:
    """Decode one popped raw sample (to a ``bucket`` (width, height) when given, else the square);
    None (counted) if its bytes do not decode."""
    cfg = plan.cfg
    try:
        if cfg.input == "image":
            rng = sample_rng(plan.seed, plan.epoch, raw["__shard__"], raw["__index__"], block) \
                if (cfg.crop == "random" or cfg.flip) else None
            if bucket is None:
                img = decode_image(raw[image_member(raw)], cfg.resolution, cfg.decoder)
                raw["image"] = resize_crop_flip(img, cfg.resolution, cfg.crop, cfg.flip, rng)
            else:
                raw["image"], micro = crop_to_bucket(raw[image_member(raw)], bucket, stored=raw["__size__"],
                                                     meta=raw["meta"], crop=cfg.crop, flip=cfg.flip, rng=rng,
                                                     decoder=cfg.decoder)
                raw.update(micro)
        else:
            raw["latent_mean"], raw["latent_logvar"] = decode_latent(raw["latent.npy"])
            if bucket is not None:  # encoded at its bucket's size by precompute_latents, which recorded the crop
                micro = json.loads(raw["micro.json"])
                for name in MICRO_CONDITIONING:
                    raw[name] = tuple(int(v) for v in micro[name])
        if cfg.text_embeddings:
            text_embeddings.decode_into(raw)
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is a skipped sample, by design
        counters["skip/decode_error"] += 1
        log.debug("undecodable sample %s in %s: %s", raw.get("__key__"), storage.redact(raw.get("__url__")), exc)
        return None
    return raw


def _block_samples(plan: _Plan, worker: int, block: int, shard_ids: List[int], counters: "_Counters") -> Iterator[Dict]:
    """The raw samples of one block that pass the checks, interleaved over its shards, through the
    shuffle buffer seeded by (seed, epoch, salt, rank, worker, block); reads and drops are counted."""
    cfg = plan.cfg

    def checked(shard_id: int) -> Iterator[Dict]:
        for raw in iter_tar_samples(plan.urls[shard_id], shard_id, counters, plan.storage):
            counters["samples_read"] += 1
            reason = check_sample(raw, cfg)
            if reason is not None:
                counters["skip/" + reason if not reason.startswith("filter/") else reason] += 1
                continue
            yield raw

    rng = np.random.default_rng([plan.seed, plan.epoch, plan.salt, plan.rank, worker, block, 0x5B0F])
    return _shuffle(_interleave([checked(s) for s in shard_ids]), cfg.shuffle_buffer, rng)


def _no_usable_samples(plan: _Plan, worker: int, blocks: int, counters: "_Counters", why: str = "") -> RuntimeError:
    return RuntimeError(
        f"rank {plan.rank} worker {worker} read {blocks} blocks of shards without one usable sample{why} "
        f"(counts: {dict(counters.live)}); check data.urls, data.input / data.conditioning and data.filters")


def _worker_stream(plan: _Plan, worker: int) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Batches of one logical worker, each with the worker's position after it. The underlying
    sample stream is endless (see ``shards.epoch_blocks``); the worker stops after its share of the
    epoch's batches."""
    cfg = plan.cfg
    remaining = plan.batches_for(worker)
    if remaining == 0:
        return
    start = plan.start.get(worker)
    counters = _Counters(Counter(start["counters"]) if start else Counter())
    block = start["block"] if start else 0
    skip = start["emitted"] if start else 0
    blocks = plan.blocks(worker)
    for _ in range(block):
        next(blocks)
    pending: List[Dict] = []
    fruitless_blocks = 0
    guard = 2 * len(plan.urls) + 2
    while True:
        shard_ids = next(blocks)
        if skip:
            counters.current = Counter()  # replaying already-counted reads
        produced = 0
        stream = _block_samples(plan, worker, block, shard_ids, counters)
        emitted = 0
        for raw in stream:
            emitted += 1
            if emitted <= skip:
                if emitted == skip:
                    counters.current = counters.live  # caught up with the recorded position
                continue
            sample = _process(raw, plan, block, counters)
            if sample is None:
                continue
            produced += 1
            counters["samples_yielded"] += 1
            pending.append(sample)
            if len(pending) == plan.batch_size:
                batch = _collate(pending, cfg, plan.tokenize)
                pending = []
                yield batch, {"block": block, "emitted": emitted, "counters": dict(counters.live)}
                remaining -= 1
                if remaining == 0:
                    return
        if skip and emitted < skip:
            raise RuntimeError(f"cannot resume worker {worker}: block {block} now has {emitted} samples, "
                               f"the saved position says {skip}; were the shards changed?")
        counters.current = counters.live
        skip = 0
        block += 1
        fruitless_blocks = 0 if produced else fruitless_blocks + 1
        if fruitless_blocks >= guard:
            raise _no_usable_samples(plan, worker, fruitless_blocks, counters)


def _bucketed_stream(plan: _Plan, worker: int) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """:func:`_worker_stream` with buckets: the same positioned sample stream, each sample queued
    (still undecoded) by the bucket of its stored size; the worker's next batch, of the bucket the
    epoch's schedule gives its global index, takes the oldest samples of that bucket's queue.

    A worker whose shards hold few samples of the scheduled bucket would read ahead without end
    (and hold every other bucket's samples meanwhile): once its queues hold
    ``data.buckets.queue_limit`` samples, the scheduled bucket's batch takes the oldest samples of the nearest bucket
    (in log aspect ratio) that has some, cropped to the scheduled size (counted as
    ``bucket_borrowed``). Every rank still yields the scheduled shape, memory stays bounded.

    Exact resume without storing samples: the queues are FIFO in stream order, so a queue holds
    exactly the samples of its bucket from its oldest queued position up to the stream position.
    The state records, besides the position, each non-empty queue's oldest position; a restart
    replays the stream from the earliest of them (``origin``: a block, since a block's shuffle is
    seeded by the block alone), re-queueing without decoding, and goes on. Shards before
    ``origin`` are the finished ones an elastic resume may drop.
    """
    cfg = plan.cfg
    width = plan.num_workers
    due = [g for g in range(plan.batches_done, plan.batches_total) if g % width == worker]
    if not due:
        return
    start = plan.start.get(worker)
    counters = _Counters(Counter(start["counters"]) if start else Counter())
    position = (start["block"], start["emitted"]) if start else (0, 0)  # last sample taken from the stream
    oldest = {int(b): tuple(p) for b, p in start["queued"].items()} if start else {}
    origin = min([p[0] for p in oldest.values()] + [position[0]])
    queues: Dict[int, deque] = {b: deque() for b in range(len(plan.buckets))}
    guard = 2 * len(plan.urls) + 2
    cap = max(cfg.buckets.queue_limit, plan.batch_size)
    ratio = [math.log(w / h) for w, h in plan.buckets]
    # Where a short bucket borrows from, nearest first (ties: the squarer).
    nearest = {b: sorted((o for o in queues if o != b), key=lambda o: (abs(ratio[o] - ratio[b]), abs(ratio[o])))
               for b in queues}

    def positioned() -> Iterator[Tuple[Tuple[int, int], Dict]]:
        blocks = plan.blocks(worker)
        for _ in range(origin):
            next(blocks)
        block, empty_blocks = origin, 0
        while True:
            emitted = 0
            for raw in _block_samples(plan, worker, block, next(blocks), counters):
                emitted += 1
                yield (block, emitted), raw
            if block == position[0] and emitted < position[1]:
                raise RuntimeError(f"cannot resume worker {worker}: block {block} now has {emitted} samples, "
                                   f"the saved position says {position[1]}; were the shards changed?")
            empty_blocks = 0 if emitted else empty_blocks + 1
            if empty_blocks >= guard:
                raise _no_usable_samples(plan, worker, empty_blocks, counters)
            block += 1

    def enqueue(pos: Tuple[int, int], raw: Dict) -> Optional[int]:
        """Queue ``raw`` in its bucket; None (counted as a decode error) when its header is unreadable."""
        try:
            if cfg.input == "image":
                width, height = raw["__size__"] = image_header_size(raw[image_member(raw)])
            else:
                width, height = latent_header_size(raw[LATENT_EXT])
        except Exception:  # noqa: BLE001 - an unreadable image / array header is a skipped sample
            counters["skip/decode_error"] += 1
            return None
        b = bucket_lib.assign_bucket(width, height, plan.buckets)
        if cfg.input == "latent":  # a latent has its bucket's aspect ratio exactly
            if width * plan.buckets[b][1] != height * plan.buckets[b][0]:
                raise RuntimeError(
                    f"latent {raw['__key__']} in {storage.redact(raw.get('__url__'))} is {width}x{height}, the shape "
                    f"of no bucket of data.resolution={cfg.resolution} data.buckets.step={cfg.buckets.step} "
                    f"max_aspect={cfg.buckets.max_aspect}: train with the resolution and buckets.* the shards were "
                    "precomputed with (their dataset.json)")
        queues[b].append((pos, raw))
        return b

    stream = positioned()
    if start is not None:  # replay what the saved queues held, without decoding; counted already
        counters.current = Counter()
        for pos, raw in stream:
            b = enqueue(pos, raw)
            if b is not None and (b not in oldest or pos < oldest[b]):
                queues[b].pop()
            if pos == position:
                break
        counters.current = counters.live
    last_decoded_block = position[0]
    for g in due:
        bucket = plan.schedule[g]
        samples: List[Dict] = []
        while len(samples) < plan.batch_size:
            source = bucket
            if not queues[bucket] and sum(len(q) for q in queues.values()) >= cap:
                source = next(o for o in nearest[bucket] if queues[o])
                counters["bucket_borrowed"] += 1
            if not queues[source]:
                position, raw = next(stream)
                enqueue(position, raw)
                if position[0] - last_decoded_block >= guard:
                    w, h = plan.buckets[bucket]
                    raise _no_usable_samples(plan, worker, position[0] - last_decoded_block, counters,
                                             f" of bucket {w}x{h}")
                continue
            pos, raw = queues[source].popleft()
            sample = _process(raw, plan, pos[0], counters, plan.buckets[bucket])
            if sample is not None:
                counters["samples_yielded"] += 1
                samples.append(sample)
                last_decoded_block = position[0]
        queued = {str(b): list(q[0][0]) for b, q in queues.items() if q}
        yield _collate(samples, cfg, plan.tokenize), {
            "block": position[0], "emitted": position[1], "counters": dict(counters.live), "queued": queued,
            "origin": min([p[0] for p in queued.values()] + [position[0]])}


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        """Yields ``(batch, logical worker, position, epoch, batch index in the epoch)``.

        DataLoader hands out fetch ``k`` (counted from this iterator's start) from physical worker
        ``k % W``. Batch ``g`` of an epoch must come from logical worker ``g % W``, and an epoch's
        batches ``[batches_done, batches_total)`` occupy fetches ``[K, K + batches_total -
        batches_done)``, so physical worker ``i`` plays logical ``(i - K + batches_done) % W`` in it
        (``K = 0`` for the first epoch: the old fixed offset ``batches_done % W``)."""
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        plan, width, first_fetch = self.plan, self.plan.num_workers, 0
        while True:
            worker = (physical - first_fetch + plan.batches_done) % width
            index = plan.batches_done + (worker - plan.batches_done) % width
            for batch, state in (_bucketed_stream if plan.buckets else _worker_stream)(plan, worker):
                yield batch, worker, state, plan.epoch, index
                index += width
            if not plan.persistent:
                return
            first_fetch += plan.batches_total - plan.batches_done
            plan = plan.next_epoch()


class ShardLoader:
    """Iterating yields the rest of the current epoch (``batches_per_epoch`` batches in all), then
    moves to the next epoch; :meth:`infinite` chains epochs. See the module docstring."""

    def __init__(self, cfg: DataConfig, dist_info: dist.DistInfo, *, batch_size: int, seed: int,
                 storage_defaults: Optional[storage.StorageConfig] = None, uint8_images: bool = False,
                 tokenize: Optional[Callable[[List[str]], torch.Tensor]] = None):
        cfg.validate()
        # True: hand images over as uint8 (normalised on the device by data/device.py: a quarter of
        # the bytes to pin and copy, and no per-pixel pass in the main process).
        self.uint8_images = uint8_images
        self._tokenize = tokenize
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.cfg = cfg
        self.dist_info = dist_info
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = max(1, cfg.num_workers)
        # data.storage over storage.* (the launcher's storage.configure), resolved once here so
        # that workers, whatever their start method, read shards with exactly these settings.
        self.storage_cfg = storage.resolve(cfg.storage, storage_defaults, key="data.storage")
        need_sizes = cfg.samples_per_epoch is None or cfg.mode == "epoch"
        self.shard_set = shard_lib.resolve_shards(cfg.urls, self.storage_cfg, need_sizes=need_sizes)
        if cfg.samples_per_epoch is None and self.shard_set.sizes is None:
            raise ValueError(
                f"no sizes.json or _stats.json next to the shards of {storage.redact(cfg.urls)}: run "
                "`python data_tools/inspect_shards.py data=<urls>` (writes sizes.json) or set data.samples_per_epoch")
        needed = dist_info.world_size * self.num_workers
        if cfg.mode == "epoch" and len(self.shard_set.urls) < needed:
            raise ValueError(
                f"{len(self.shard_set.urls)} shards cannot feed {dist_info.world_size} ranks x {self.num_workers} "
                f"workers = {needed} readers in epoch mode: use more (smaller) shards, fewer data.num_workers, "
                "or data.mode=resampled")
        self.buckets: List[bucket_lib.Bucket] = []
        self.bucket_counts: Optional[np.ndarray] = None
        if cfg.buckets.enabled:
            self.buckets = bucket_lib.make_buckets(cfg.resolution, cfg.buckets.step, cfg.buckets.max_aspect)
            self.bucket_counts = bucket_lib.bucket_counts(
                shard_lib.load_aspects(self.shard_set.urls, self.storage_cfg), self.buckets)
            held = self.bucket_counts.sum(axis=0)
            log.info("%d aspect buckets of ~%d^2 px (step %d, aspect <= %g); samples per bucket: %s", len(self.buckets),
                     cfg.resolution, cfg.buckets.step, cfg.buckets.max_aspect,
                     ", ".join(f"{w}x{h}: {int(n)}" for (w, h), n in zip(self.buckets, held) if n))
        # The training stage this loader feeds (config/stages.py): a state saved in another stage
        # is not this pipeline's position, and the stage's data starts fresh.
        self.stage = 0
        self.epoch = 0
        self.batches_done = 0  # handed out in the current epoch
        self._salt = 0
        self._epoch_shards: Optional[List[int]] = None  # remainder of an epoch after an elastic resume
        self._remaining_samples: Optional[int] = None
        self._worker_states: Dict[int, Dict[str, Any]] = {}
        self._metrics_base: Counter = Counter()
        # Persistent workers: the live batch source and the (epoch, batch) its next item is.
        self._live: Optional[Iterator] = None
        self._live_next: Optional[Tuple[int, int]] = None

    @property
    def tokenize(self) -> Optional[Callable[[List[str]], torch.Tensor]]:
        """Picklable captions -> LongTensor[B, L] the workers run (the text encoder's tokenizer);
        None: batches carry captions only."""
        return self._tokenize if self.cfg.conditioning == "text" else None

    @tokenize.setter
    def tokenize(self, fn: Optional[Callable[[List[str]], torch.Tensor]]) -> None:
        self.close()  # live workers hold the old plan
        self._tokenize = fn

    # ------------------------------------------------------------------ epoch bookkeeping
    def _current_epoch_shards(self) -> List[int]:
        if self._epoch_shards is not None:
            return self._epoch_shards
        return shard_lib.epoch_order(len(self.shard_set.urls), self.seed, self.epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (all ranks agree)."""
        return epoch_batches(self.cfg, self.shard_set, self.dist_info.world_size, self.batch_size,
                             self._current_epoch_shards(), resumed_epoch_shards=self._epoch_shards is not None,
                             remaining_samples=self._remaining_samples)

    def _roll_epoch_if_done(self) -> None:
        if self.batches_done >= self.batches_per_epoch:
            for state in self._worker_states.values():
                self._metrics_base.update(state["counters"])
            self.epoch += 1
            self.batches_done = 0
            self._worker_states = {}
            self._epoch_shards = None
            self._remaining_samples = None

    def _plan(self) -> _Plan:
        return _Plan(
            cfg=self.cfg, storage=self.storage_cfg, urls=self.shard_set.urls, shard_set=self.shard_set,
            epoch_shards=self._current_epoch_shards() if self.cfg.mode == "epoch" else [],
            seed=self.seed, epoch=self.epoch, salt=self._salt, rank=self.dist_info.rank,
            world_size=self.dist_info.world_size, num_workers=self.num_workers, batch_size=self.batch_size,
            batches_done=self.batches_done, batches_total=self.batches_per_epoch,
            start=copy.deepcopy(self._worker_states), persistent=self.cfg.persistent_workers,
            tokenize=self.tokenize, buckets=self.buckets, bucket_counts=self.bucket_counts,
            schedule=self.bucket_schedule(),
        )

    def bucket_schedule(self) -> List[int]:
        """The bucket index (into :attr:`buckets`) of each global batch of the current epoch ([]
        without buckets): the same on every rank."""
        return epoch_schedule(self.cfg, self.shard_set, self.bucket_counts,
                              self._current_epoch_shards() if self.cfg.mode == "epoch" else [],
                              self.batches_per_epoch, self.seed, self.epoch, self._salt)

    # ------------------------------------------------------------------ iteration
    def _source(self, plan: _Plan) -> Iterator[Tuple[Dict[str, Any], int, Dict[str, Any], int, int]]:
        if self.cfg.num_workers == 0:
            return iter(_EpochDataset(plan))
        # An explicit generator: without one, DataLoader draws its worker base seed from the global
        # torch RNG, which the trainer also uses (noise, timesteps) and restores on resume, so data
        # workers would shift every later draw of the run. Sample randomness itself never uses the
        # worker seed: it is seeded from (seed, epoch, position).
        worker_seed = np.random.SeedSequence(
            [self.seed % (1 << 64), plan.epoch, plan.salt, plan.rank, plan.batches_done]).generate_state(1)[0]
        loader = torch.utils.data.DataLoader(
            _EpochDataset(plan), batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            # persistent_workers=False: our workers persist by never ending (see _EpochDataset), and
            # DataLoader's own persistence would restart the same (stale) plan at every epoch.
            multiprocessing_context=worker_start_method(self.cfg.multiprocessing_context), persistent_workers=False,
            generator=torch.Generator().manual_seed(int(worker_seed)))
        return iter(loader)

    def _finish(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The contract's tensors: float images in [-1, 1] (or uint8 with ``uint8_images``: then
        ``data.device.unit_range`` gives the same values); page-locked when ``data.pin_memory`` is
        set and CUDA is there (pinned here rather than by DataLoader, which would pin the uint8)."""
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        if pin:
            for key in ("tokens", "text_context", "text_pooled", *MICRO_CONDITIONING):
                if key in batch:
                    batch[key] = batch[key].pin_memory()
        if "image" in batch and self.uint8_images:
            if pin:
                batch["image"] = batch["image"].pin_memory()
        elif "image" in batch:
            batch["image"] = batch_to_unit_range(batch["image"], pin_memory=pin)
        elif pin:
            batch["latent_mean"] = batch["latent_mean"].pin_memory()
            batch["latent_logvar"] = batch["latent_logvar"].pin_memory()
        return batch

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._roll_epoch_if_done()
        total = self.batches_per_epoch
        epoch = self.epoch
        if self._live is None or self._live_next != (self.epoch, self.batches_done):
            self.close()
            self._live = self._source(self._plan())
        source = self._live
        finished = False
        try:
            # metrics() / state_dict() between two batches roll the epoch once its last batch is out:
            # then this epoch is over, whatever batches_done (reset to 0) says.
            while self.epoch == epoch and self.batches_done < total:
                try:
                    batch, worker, state, batch_epoch, index = next(source)
                except StopIteration:
                    raise RuntimeError(f"data workers stopped after {self.batches_done} of {total} batches "
                                       f"in epoch {self.epoch}") from None
                if (batch_epoch, index) != (self.epoch, self.batches_done):
                    raise RuntimeError(f"data worker {worker} sent batch {index} of epoch {batch_epoch} where batch "
                                       f"{self.batches_done} of epoch {self.epoch} was due (a loader bug: please "
                                       "report it with the run's config)")
                batch = self._finish(batch)
                # Record the position before handing the batch out: from now on it counts as consumed.
                self._worker_states[worker] = state
                self.batches_done += 1
                last = self.batches_done >= total
                self._live_next = (self.epoch + 1, 0) if last else (self.epoch, self.batches_done)
                yield batch
            finished = True
        finally:
            if not (finished and self.cfg.persistent_workers):
                self.close()  # an epoch left early (or per-epoch workers): shut the workers down
        self._roll_epoch_if_done()

    def close(self) -> None:
        """Stop the data workers (they restart on the next iteration, at the recorded position)."""
        live, self._live, self._live_next = self._live, None, None
        if live is None:
            return
        if hasattr(live, "_shutdown_workers"):  # DataLoader's iterator: join its worker processes now
            live._shutdown_workers()
        elif hasattr(live, "close"):  # num_workers=0: the in-process generator
            live.close()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def infinite(self) -> Iterator[Dict[str, Any]]:
        """Batches across epochs without end (the training loop's usual view)."""
        while True:
            yield from self

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> Dict[str, float]:
        """Cumulative counts for this rank: ``samples_read``, ``samples_yielded``, ``skip/<reason>``
        (corrupt_tar, truncated_member, missing_shard, decode_error, missing_*, bad_metadata), ``filter/<name>``,
        ``bucket_borrowed`` (samples a short aspect bucket took from its neighbour), plus ``epoch`` and
        ``batches_in_epoch``. Counts cover batches handed out so far."""
        self._roll_epoch_if_done()
        total = Counter(self._metrics_base)
        for state in self._worker_states.values():
            total.update(state["counters"])
        out = {k: float(v) for k, v in sorted(total.items())}
        out["epoch"] = float(self.epoch)
        out["batches_in_epoch"] = float(self.batches_done)
        return out

    # ------------------------------------------------------------------ state
    def _done_shards(self) -> List[int]:
        """Shards of the current epoch this rank has finished completely (epoch mode)."""
        if self.cfg.mode != "epoch":
            return []
        plan = self._plan()
        done: List[int] = []
        for worker, state in self._worker_states.items():
            assigned = plan.assigned(worker)
            # "origin": with buckets, the block of the oldest sample still queued (read, not trained)
            finished = state.get("origin", state["block"])
            done.extend(assigned[: min(len(assigned), finished * self.cfg.shards_per_block)])
        return done

    def state_dict(self) -> Dict[str, Any]:
        """This rank's exact position, plus what all ranks finished (for an elastic resume).

        Collective when torch.distributed is initialised: every rank must call it (as every rank
        does when saving a checkpoint)."""
        self._roll_epoch_if_done()
        epoch_shards = self._current_epoch_shards() if self.cfg.mode == "epoch" else []
        removed = sorted(set(shard_lib.epoch_order(len(self.shard_set.urls), self.seed, self.epoch))
                         - set(epoch_shards)) if self._epoch_shards is not None else []
        local = {"done": self._done_shards(), "batches": self.batches_done}
        gathered = dist.all_gather_object(local)
        done_global = sorted(set(removed).union(*[set(g["done"]) for g in gathered]))
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "mode": self.cfg.mode,
            "num_shards": len(self.shard_set.urls),
            "rank": self.dist_info.rank,
            "world_size": self.dist_info.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "shards_per_block": self.cfg.shards_per_block,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_done,
            "salt": self._salt,
            "epoch_shards": self._epoch_shards,
            "remaining_samples": self._remaining_samples,
            "workers": {str(k): v for k, v in self._worker_states.items()},
            "metrics_base": dict(self._metrics_base),
            "done_shards_global": done_global,
            "samples_consumed_global": int(self.batches_done) * self.dist_info.world_size * self.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "buckets": [list(b) for b in self.buckets],
            "stage": self.stage,
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (of any rank when the topology changed)."""
        self.close()  # the live workers are positioned for the old state
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')} is not {STATE_VERSION}")
        if int(sd.get("stage", 0)) != self.stage:
            log.info("data of training stage %d starts at its epoch 0 (the checkpoint's loader state is stage %s's)",
                     self.stage, sd.get("stage", 0))
            return
        for key, mine in (("seed", self.seed), ("mode", self.cfg.mode), ("num_shards", len(self.shard_set.urls))):
            if sd[key] != mine:
                raise ValueError(f"loader state was saved with {key}={sd[key]!r} but this loader has {mine!r}; "
                                 "resume with the same data.urls / data.mode / seed (or start a fresh run)")
        saved_buckets = [tuple(b) for b in sd.get("buckets", [])]
        if saved_buckets != list(self.buckets):
            raise ValueError(f"loader state was saved with {len(saved_buckets)} aspect buckets {saved_buckets[:4]}... but "
                             f"this loader has {len(self.buckets)} {self.buckets[:4]}...: resume with the same "
                             "data.resolution / data.buckets.* (or start a fresh run)")
        self.epoch = int(sd["epoch"])
        self._metrics_base = Counter(sd["metrics_base"])
        same = all(sd[k] == v for k, v in (
            ("world_size", self.dist_info.world_size), ("rank", self.dist_info.rank),
            ("num_workers", self.num_workers), ("batch_size", self.batch_size),
            ("shards_per_block", self.cfg.shards_per_block), ("shuffle_buffer", self.cfg.shuffle_buffer)))
        if same:
            self.batches_done = int(sd["batches_in_epoch"])
            self._salt = int(sd["salt"])
            self._epoch_shards = sd["epoch_shards"]
            self._remaining_samples = sd["remaining_samples"]
            self._worker_states = {int(k): v for k, v in sd["workers"].items()}
            return
        # Elastic resume: re-split what is left of this epoch over the new topology.
        log.warning("data loader resumed on a different topology (world %s -> %s, workers %s -> %s): "
                    "continuing epoch %d at shard granularity", sd["world_size"], self.dist_info.world_size,
                    sd["num_workers"], self.num_workers, self.epoch)
        self.batches_done = 0
        self._worker_states = {}
        self._salt = int(sd["salt"]) + 1
        if self.cfg.mode == "epoch":
            done = set(sd["done_shards_global"])
            order = shard_lib.epoch_order(len(self.shard_set.urls), self.seed, self.epoch)
            self._epoch_shards = [s for s in order if s not in done]
            self._remaining_samples = None
            if not self._epoch_shards:
                self._epoch_shards = None
                self.epoch += 1
        else:
            spent = int(sd["samples_consumed_global"])
            total = int(sd["batches_per_epoch"]) * int(sd["world_size"]) * int(sd["batch_size"])
            left = total - spent
            self._epoch_shards = None
            self._remaining_samples = left if left > 0 else None
            if left <= 0:
                self.epoch += 1


def build_loader(cfg: DataConfig, dist_info: Optional[dist.DistInfo] = None, *, batch_size: int,
                 seed: int, storage_defaults: Optional[storage.StorageConfig] = None,
                 uint8_images: bool = False,
                 tokenize: Optional[Callable[[List[str]], torch.Tensor]] = None) -> ShardLoader:
    """The training data loader for this rank (see :class:`ShardLoader`). Shards are read with
    ``cfg.storage`` over ``storage_defaults`` (None: the process-wide ``storage.configure`` block,
    which the launcher sets from ``storage.*``)."""
    return ShardLoader(cfg, dist_info or dist.get_dist_info(), batch_size=batch_size, seed=seed,
                       storage_defaults=storage_defaults, uint8_images=uint8_images, tokenize=tokenize)
