"""Every sample of a shard set once, in batches with a partial last one: the reader for statistics
over a dataset (reference statistics, reconstruction metrics).

The training loader (``loader.py``) gives every rank the same number of whole batches
(``samples // (world x batch)``) and refills a worker that runs short from repeats of its shards;
both are right for training and wrong for a statistic whose N must be the dataset's: they drop the
tail (1,797 images -> 1,792 at batch 32) and can count an image twice. This reader:

- plans the pass from the shard sizes (``sizes.json`` / ``_stats.json``): shards in the order seeded
  by ``seed`` (``shards.epoch_order``, epoch 0), each taking its samples in file order until
  ``n_samples`` are planned (all of them by default). Sample ``j`` of the shard at position ``p`` has
  the *planned index* ``offset[p] + j``: the same for any world size or worker count, and what
  callers use to keep "the first K images" and to put them in order;
- splits the planned shards round-robin over ranks, then workers (``shards.split``); each worker
  reads its shards once, and its last batch is partial; ranks may get different numbers of batches
  (callers reduce their statistics once at the end, never per batch);
- decodes and centre-crops as the training pipeline does (``check_sample``, ``decode_image``,
  ``resize_crop_flip``); a sample that fails a check or does not decode is counted by reason, never
  replaced, so ``N = planned - dropped`` and callers can say exactly what was used;
- records each worker's position (shard, samples read) when a batch is handed out, so
  ``state_dict`` / ``load_state_dict`` resume the pass after a crash (same world size and workers).
  Unlike the training loader's, the state is local: no collective.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ldm_scale import dist, storage
from ldm_scale.data import shards as shard_lib
from ldm_scale.data import text_embeddings
from ldm_scale.data.config import DataConfig, worker_start_method
from ldm_scale.data.filters import LATENT_EXT, check_sample, image_member
from ldm_scale.data.tar_stream import iter_tar_samples
from ldm_scale.data.transforms import batch_to_unit_range, decode_image, decode_latent, resize_crop_flip, stack_uint8

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class ShardTake:
    """Read the first ``take`` samples of shard ``shard``; its sample ``j`` has planned index ``offset + j``."""

    shard: int
    take: int
    offset: int


def plan_pass(sizes: List[int], n_samples: Optional[int], seed: int) -> List[ShardTake]:
    """The shards (and how much of each) a pass over at most ``n_samples`` samples reads."""
    remaining = sum(sizes) if n_samples is None else int(n_samples)
    plan: List[ShardTake] = []
    offset = 0
    for shard in shard_lib.epoch_order(len(sizes), seed, 0):
        if remaining <= 0:
            break
        take = min(int(sizes[shard]), remaining)
        if take > 0:
            plan.append(ShardTake(shard, take, offset))
            offset += take
            remaining -= take
    return plan


@dataclass
class _PassPlan:
    """What a worker needs (picklable)."""

    cfg: DataConfig
    storage: storage.StorageConfig  # resolved in the parent: workers never read the process-wide default
    urls: List[str]
    takes: List[ShardTake]
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    start: Dict[int, Dict[str, Any]]

    def assigned(self, worker: int) -> List[ShardTake]:
        return shard_lib.split(self.takes, self.rank, self.world_size, worker, self.num_workers)


def _collate(samples: List[Dict], cfg: DataConfig) -> Dict[str, Any]:
    batch: Dict[str, Any] = {"key": [s["__key__"] for s in samples],
                             "index": torch.tensor([s["__planned__"] for s in samples], dtype=torch.long)}
    if cfg.input == "image":
        batch["image"] = stack_uint8([s["image"] for s in samples])
    else:
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])
        batch["latent_logvar"] = torch.stack([s["latent_logvar"] for s in samples])
    if cfg.conditioning == "text":
        batch["caption"] = [s["caption"] for s in samples]
        if cfg.text_embeddings:
            text_embeddings.collate_into(batch, samples)
    elif cfg.conditioning == "class":
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


def _decode(raw: Dict, cfg: DataConfig) -> Optional[Any]:
    try:
        if cfg.text_embeddings:
            text_embeddings.decode_into(raw)
        if cfg.input == "latent":  # (mean, logvar) of a pre-encoded shard
            return decode_latent(raw[LATENT_EXT])
        img = decode_image(raw[image_member(raw)], cfg.resolution, cfg.decoder)
        return resize_crop_flip(img, cfg.resolution, "center", False, None)
    except Exception as exc:  # noqa: BLE001 - an undecodable image is a counted, dropped sample
        log.debug("undecodable sample %s in %s: %s", raw.get("__key__"), storage.redact(raw.get("__url__")), exc)
        return None


def _checked(raw: Dict, cfg: DataConfig, counts: Counter, planned: int) -> List[Dict]:
    """``[raw]`` ready to batch (decoded, centre-cropped), or ``[]`` with the reason counted."""
    counts["samples_read"] += 1
    reason = check_sample(raw, cfg)
    decoded = _decode(raw, cfg) if reason is None else None
    if reason is None and decoded is None:
        reason = "decode_error"
    if reason is not None:
        counts[reason if reason.startswith("filter/") else "skip/" + reason] += 1
        return []
    if cfg.input == "latent":
        raw["latent_mean"], raw["latent_logvar"] = decoded
    else:
        raw["image"] = decoded
    raw["__planned__"] = planned
    return [raw]


def _worker_stream(plan: _PassPlan, worker: int) -> Iterator[Tuple[Optional[Dict[str, Any]], Dict[str, Any]]]:
    """(batch, position after it) for one worker; a final (None, position) carries the counts of
    samples dropped after its last batch."""
    cfg = plan.cfg
    mine = plan.assigned(worker)
    start = plan.start.get(worker) or {"shard": 0, "read": 0, "counts": {}}
    counts = Counter(start["counts"])  # per-sample outcomes, and damage of finished shards
    pending: List[Dict] = []
    for position in range(int(start["shard"]), len(mine)):
        t = mine[position]
        skip = int(start["read"]) if position == int(start["shard"]) else 0
        damage: Counter = Counter()  # counted once the shard is done (a resumed shard is read again)
        read = 0
        for raw in iter_tar_samples(plan.urls[t.shard], t.shard, damage, plan.storage):
            read += 1
            if read > skip:  # (samples up to `skip` were consumed before a restart)
                pending.extend(_checked(raw, cfg, counts, t.offset + read - 1))
                if len(pending) == plan.batch_size:
                    batch, pending = _collate(pending, cfg), []
                    yield batch, {"shard": position, "read": read, "counts": dict(counts)}
            if read >= t.take:
                break
        if read < t.take:
            counts["skip/missing_from_shard"] += t.take - read  # fewer samples than sizes.json says
        counts.update({k: v for k, v in damage.items() if k != "members"})
    # Samples pending across a shard boundary are batched together, so only the worker's very last
    # batch is partial.
    if pending:
        yield _collate(pending, cfg), {"shard": len(mine), "read": 0, "counts": dict(counts)}
    yield None, {"shard": len(mine), "read": 0, "counts": dict(counts)}


class _PassDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _PassPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for batch, state in _worker_stream(self.plan, worker):
            yield batch, worker, state


class OnePassLoader:
    """This rank's part of one pass over the shards (see the module docstring).

    Batches: ``image`` float32 ``[B, 3, R, R]`` in [-1, 1] (centre crop) or, for latent shards
    (``data.input=latent``), ``latent_mean`` / ``latent_logvar``; ``key``, ``index`` (planned indices,
    LongTensor), ``caption`` / ``label`` per ``cfg.conditioning``; ``B <= batch_size``.
    """

    def __init__(self, cfg: DataConfig, dist_info: Optional[dist.DistInfo] = None, *, batch_size: int,
                 n_samples: Optional[int] = None, seed: int = 0,
                 storage_defaults: Optional[storage.StorageConfig] = None):
        cfg.validate()
        if batch_size <= 0 or (n_samples is not None and n_samples <= 0):
            raise ValueError("batch_size and n_samples must be positive")
        self.cfg = cfg
        self.dist_info = dist_info or dist.get_dist_info()
        self.batch_size = batch_size
        self.num_workers = max(1, cfg.num_workers)
        self.n_requested = n_samples
        self.seed = seed
        # data.storage over storage.* (as the training loader resolves it), once, in this process.
        self.storage_cfg = storage.resolve(cfg.storage, storage_defaults, key="data.storage")
        self.shard_set = shard_lib.resolve_shards(cfg.urls, self.storage_cfg, need_sizes=True)
        if self.shard_set.sizes is None:
            raise ValueError(
                f"no sizes.json or _stats.json next to the shards of {storage.redact(cfg.urls)}: run "
                "`python data_tools/inspect_shards.py data=<urls>` (writes sizes.json) so the pass can be planned")
        self.takes = plan_pass(self.shard_set.sizes, n_samples, seed)
        self._workers: Dict[int, Dict[str, Any]] = {}
        self._done = False

    @property
    def planned(self) -> int:
        """Samples the pass reads over all ranks: ``min(n_samples, dataset size)``."""
        return sum(t.take for t in self.takes)

    @property
    def dataset_size(self) -> int:
        return int(sum(self.shard_set.sizes))

    def _plan(self) -> _PassPlan:
        return _PassPlan(cfg=self.cfg, storage=self.storage_cfg, urls=self.shard_set.urls, takes=self.takes,
                         rank=self.dist_info.rank, world_size=self.dist_info.world_size,
                         num_workers=self.num_workers, batch_size=self.batch_size,
                         start={k: dict(v) for k, v in self._workers.items()})

    def _source(self, plan: _PassPlan):
        if self.cfg.num_workers == 0:
            return iter(_PassDataset(plan))
        # The explicit generator keeps DataLoader from drawing worker seeds from the global torch RNG
        # (nothing here is random; callers' RNG streams stay untouched).
        return iter(torch.utils.data.DataLoader(
            _PassDataset(plan), batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context=worker_start_method(self.cfg.multiprocessing_context),
            persistent_workers=False, generator=torch.Generator().manual_seed(self.seed)))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self._done:
            return
        source = self._source(self._plan())
        try:
            for batch, worker, state in source:
                # Recorded before the batch is handed out: from now on it counts as consumed.
                self._workers[worker] = state
                if batch is not None:
                    if "image" in batch:
                        batch["image"] = batch_to_unit_range(batch["image"])
                    yield batch
        finally:
            del source  # shuts DataLoader workers down
        self._done = True

    def counts(self) -> Dict[str, int]:
        """This rank's outcomes so far: ``samples_read`` and the dropped samples by reason
        (``skip/<reason>``, ``filter/<name>``, ``skip/missing_from_shard``, shard damage)."""
        total: Counter = Counter()
        for state in self._workers.values():
            total.update(state["counts"])
        return dict(sorted(total.items()))

    def state_dict(self) -> Dict[str, Any]:
        """This rank's position (local: no collective)."""
        return {"version": STATE_VERSION, "world_size": self.dist_info.world_size, "rank": self.dist_info.rank,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "planned": self.planned,
                "seed": self.seed, "workers": {str(k): v for k, v in self._workers.items()}, "done": self._done}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        mine = {"version": STATE_VERSION, "world_size": self.dist_info.world_size, "rank": self.dist_info.rank,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "planned": self.planned,
                "seed": self.seed}
        different = {k: (sd.get(k), v) for k, v in mine.items() if sd.get(k) != v}
        if different:
            raise ValueError(f"the saved pass position does not fit this pass ({different}, saved vs now): resume "
                             "with the same ranks, data.num_workers, batch size, n_samples and seed")
        self._workers = {int(k): dict(v) for k, v in sd["workers"].items()}
        self._done = bool(sd["done"])
