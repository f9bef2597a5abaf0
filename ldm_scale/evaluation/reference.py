"""Reference statistics of a real image set, stored as one ``.npz`` next to the data.

The file is a superset of the ADM evaluator's reference batches (``VIRTUAL_imagenet256_labeled.npz``
from Dhariwal & Nichol 2021): ADM's tooling reads ``arr_0`` (uint8 images [K, H, W, 3]) and the
float64 Gaussian statistics ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial
features, sFID). We add:

- ``features``: pool features of the ``arr_0`` images (precision / recall without recomputing);
- ``labels`` (int64 [K]) or ``captions`` (str [K]) of those images, to condition generation;
- ``meta``: a JSON string: format version, extractor description (name, resize rule), N (images in
  ``mu``/``sigma``), the N planned and requested, the dropped samples by reason, resolution, data URLs.

An ADM file (no ``meta``) is read as statistics of the pinned FID Inception with TF resizing; its
``arr_0`` lets any other extractor recompute what it needs. ``mu``/``sigma`` are over all N images;
``arr_0`` may hold a subset (``keep_images``), as ADM's files do.

``compute_reference_stats`` runs one pass over a shard set (``ldm_scale.data.one_pass``: every image
exactly once, the partial last batch included), every rank reading its own shards; each rank
checkpoints its running moments, kept images and loader position, so a crashed job resumes.
"""
from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ldm_scale import dist, storage
from ldm_scale.evaluation.features import FeatureExtractor
from ldm_scale.evaluation.fid import GaussianStats, StreamingMoments
from ldm_scale.evaluation.preprocess import nhwc_uint8
from ldm_scale.formats import REFERENCE_FORMAT

log = logging.getLogger(__name__)

FORMAT = REFERENCE_FORMAT  # ldm_scale/formats.py
ADM_ASSUMED_EXTRACTOR = {"name": "inception-v3-fid", "resize": "tf_bilinear", "source": "ADM reference batch"}


@dataclass
class ReferenceStats:
    pool: GaussianStats
    spatial: Optional[GaussianStats] = None
    images: Optional[np.ndarray] = None  # uint8 [K, H, W, 3]
    features: Optional[np.ndarray] = None  # float32 [K, D], features of `images`
    labels: Optional[np.ndarray] = None
    captions: Optional[List[str]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def extractor_name(self) -> str:
        return str(self.meta.get("extractor", {}).get("name", ""))

    @property
    def resize(self) -> str:
        return str(self.meta.get("extractor", {}).get("resize", ""))

    @property
    def weights_sha256(self) -> Optional[str]:
        """Digest of the extractor's weights file (None: random weights, or a file made before it was recorded)."""
        return self.meta.get("extractor", {}).get("weights_sha256")


def save_reference(ref: ReferenceStats, url: str) -> None:
    arrays: Dict[str, np.ndarray] = {"mu": ref.pool.mu, "sigma": ref.pool.sigma}
    if ref.spatial is not None:
        arrays.update(mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma)
    if ref.images is not None:
        arrays["arr_0"] = ref.images
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    if ref.labels is not None:
        arrays["labels"] = np.asarray(ref.labels, dtype=np.int64)
    if ref.captions is not None:
        arrays["captions"] = np.asarray(ref.captions, dtype=str)
    meta = dict(ref.meta, format=FORMAT, n=ref.pool.n, n_spatial=ref.spatial.n if ref.spatial else None)
    arrays["meta"] = np.asarray(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(url, buf.getvalue())


def load_reference(url: str) -> ReferenceStats:
    """Read our reference file or an ADM reference batch (``arr_0`` + ``mu``/``sigma``[/``_s``])."""
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as f:
        keys = set(f.files)
        if "meta" in keys:
            meta = json.loads(str(f["meta"]))
        else:
            meta = {"extractor": dict(ADM_ASSUMED_EXTRACTOR), "format": "adm"}
        images = f["arr_0"] if "arr_0" in keys else None
        if "mu" in keys and "sigma" in keys:
            n = int(meta.get("n") or (len(images) if images is not None else 0))
            pool = GaussianStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n)
        elif images is not None:
            pool = None  # statistics must be computed from arr_0 by the caller
        else:
            raise ValueError(f"{storage.redact(url)} has neither mu/sigma nor arr_0 images: not a reference file")
        spatial = None
        if "mu_s" in keys and "sigma_s" in keys:
            spatial = GaussianStats(f["mu_s"].astype(np.float64), f["sigma_s"].astype(np.float64),
                                    int(meta.get("n_spatial") or meta.get("n") or 0))
        return ReferenceStats(
            pool=pool, spatial=spatial, images=images,
            features=f["features"] if "features" in keys else None,
            labels=f["labels"] if "labels" in keys else None,
            captions=[str(c) for c in f["captions"]] if "captions" in keys else None,
            meta=meta,
        )


def reference_filename(extractor: FeatureExtractor, resolution: int, n: int, conditioning: str = "none") -> str:
    """``<extractor>-<resize>_<res>px_n<N>[_<text|class>].npz``: files are keyed by what changes them
    (the suffix says which conditions are stored with the kept images)."""
    slug = extractor.name.split(" ")[0].replace(":", "_").replace("/", "_")
    suffix = "" if conditioning == "none" else f"_{conditioning}"
    return f"{slug}-{extractor.resize}_{resolution}px_n{n}{suffix}.npz"


def default_reference_url(data_url: str, extractor: FeatureExtractor, resolution: int, n: int,
                          conditioning: str = "none") -> str:
    """Next to the data: ``<shard dir>/reference_stats/<reference_filename>``."""
    first = data_url.split("::")[0]
    base = storage.parent(first) if first.endswith(".tar") or "{" in first or "*" in first else first
    return storage.join(base, "reference_stats", reference_filename(extractor, resolution, n, conditioning))


class _RankAccumulator:
    """One rank's running statistics, kept images and their conditions; serialisable for resume.

    An image is kept for ``arr_0`` when its planned index (``one_pass``) is below ``keep``, so the
    kept set does not depend on the world size; ``index`` puts the ranks' parts back in order."""

    def __init__(self, extractor: FeatureExtractor, keep: int):
        self.pool = StreamingMoments(extractor.feature_dims["pool"])
        self.spatial = StreamingMoments(extractor.feature_dims["spatial"]) if "spatial" in extractor.feature_dims else None
        self.keep = keep
        self.images: List[np.ndarray] = []
        self.features: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.captions: List[str] = []
        self.index: List[np.ndarray] = []

    def add(self, batch: Dict[str, Any], feats: Dict[str, torch.Tensor]) -> None:
        self.pool.update(feats["pool"])
        if self.spatial is not None:
            self.spatial.update(feats["spatial"])
        kept = (batch["index"] < self.keep).numpy()
        if kept.any():
            rows = np.flatnonzero(kept)
            self.images.append(nhwc_uint8(batch["image"][rows]))
            self.features.append(feats["pool"][rows].numpy().astype(np.float32))
            self.index.append(batch["index"][rows].numpy().astype(np.int64))
            if "label" in batch:
                self.labels.append(batch["label"][rows].cpu().numpy().astype(np.int64))
            if "caption" in batch:
                self.captions.extend(batch["caption"][i] for i in rows)

    def state_dict(self) -> Dict[str, Any]:
        return {"pool": self.pool.state_dict(),
                "spatial": self.spatial.state_dict() if self.spatial is not None else None,
                "images": [torch.from_numpy(a) for a in self.images],
                "features": [torch.from_numpy(a) for a in self.features],
                "labels": [torch.from_numpy(a) for a in self.labels],
                "index": [torch.from_numpy(a) for a in self.index],
                "captions": self.captions}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.pool = StreamingMoments.from_state_dict(sd["pool"])
        if sd["spatial"] is not None:
            self.spatial = StreamingMoments.from_state_dict(sd["spatial"])
        self.images = [t.numpy() for t in sd["images"]]
        self.features = [t.numpy() for t in sd["features"]]
        self.labels = [t.numpy() for t in sd["labels"]]
        self.index = [t.numpy() for t in sd["index"]]
        self.captions = sd["captions"]


def _save_torch(obj: Any, url: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(url, buf.getvalue())


def _load_torch(url: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=False)


def compute_reference_stats(loader, extractor: FeatureExtractor, *, keep_images: int, work_url: str,
                            checkpoint_every: int = 20,
                            meta: Optional[Dict[str, Any]] = None) -> Optional[ReferenceStats]:
    """Statistics of every image ``loader`` (a ``one_pass.OnePassLoader``: this rank's part of one
    pass, partial last batch included) yields, resumable from ``work_url``. Collective: every rank
    calls it; rank 0 gets the result, the other ranks None.

    ``N`` (``pool.n``, ``meta["n"]``) is the number of images that went in: the pass's planned
    ``min(n_samples, dataset size)`` less the samples that failed a check or did not decode, which
    are counted by reason in ``meta["dropped"]``. The images with planned index < ``keep_images``
    are kept for ``arr_0``, in planned order. Every ``checkpoint_every`` batches each rank saves its
    state and loader position to ``work_url/rank<R>.pt`` (the position is local: no collective).
    """
    info = dist.get_dist_info()
    rank, world = info.rank, info.world_size
    acc = _RankAccumulator(extractor, keep_images)
    ckpt_url = storage.join(work_url, f"rank{rank}.pt")
    batches = 0
    if storage.exists(ckpt_url):
        state = _load_torch(ckpt_url)
        try:
            if "batches" not in state:
                raise ValueError("it was written by an older version (a training-loader position)")
            loader.load_state_dict(state["loader"])
        except ValueError as exc:
            raise RuntimeError(f"{storage.redact(ckpt_url)}: {exc}; or delete {storage.redact(work_url)}") from None
        acc.load_state_dict(state["accumulator"])
        batches = state["batches"]
    for batch in loader:
        acc.add(batch, extractor(batch["image"]))
        batches += 1
        if batches % checkpoint_every == 0:
            _save_torch({"accumulator": acc.state_dict(), "loader": loader.state_dict(), "batches": batches},
                        ckpt_url)

    # Rank parts go through storage rather than a collective: arr_0 can be gigabytes.
    part_url = storage.join(work_url, f"part_rank{rank}.pt")
    part = acc.state_dict()
    _save_torch({k: part[k] for k in ("images", "features", "labels", "captions", "index")}, part_url)
    acc.pool.all_reduce()
    if acc.spatial is not None:
        acc.spatial.all_reduce()
    dropped: Counter = Counter()
    for counts in dist.all_gather_object(loader.counts()):
        dropped.update({k: v for k, v in counts.items() if k != "samples_read"})
    dist.barrier()
    result = None
    if rank == 0:
        parts = [_load_torch(storage.join(work_url, f"part_rank{r}.pt")) for r in range(world)]
        index = np.concatenate([a.numpy() for p in parts for a in p["index"]] or [np.zeros(0, np.int64)])
        order = np.argsort(index, kind="stable")

        def ordered(key: str) -> Optional[np.ndarray]:
            arrays = [a.numpy() for p in parts for a in p[key]]
            return np.concatenate(arrays)[order] if arrays else None

        captions = [c for p in parts for c in p["captions"]]
        result = ReferenceStats(
            pool=acc.pool.stats(), spatial=acc.spatial.stats() if acc.spatial is not None else None,
            images=ordered("images"), features=ordered("features"), labels=ordered("labels"),
            captions=[captions[i] for i in order] if captions else None,
            meta=dict(meta or {}, extractor=extractor.describe(), world_size=world, n_planned=loader.planned,
                      n_requested=loader.n_requested, dataset_size=loader.dataset_size,
                      dropped=dict(sorted(dropped.items())), batch_size=loader.batch_size, partial_batches="included",
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )
    dist.barrier()
    return result


def finish_reference(result: Optional[ReferenceStats], out_url: str, work_url: str) -> None:
    """Rank 0 writes the reference file, then the resume state is removed (after all ranks agree)."""
    if result is not None:
        save_reference(result, out_url)
        storage.rm(work_url, recursive=True)
    dist.barrier()


def reference_from_shards(urls: List[str], extractor: FeatureExtractor, *, n_samples: Optional[int],
                          keep_images: int, resolution: int, conditioning: str, out_url: Optional[str] = None,
                          batch_size: int = 50, num_workers: int = 2, seed: int = 0, checkpoint_every: int = 20,
                          storage_cfg: Optional[storage.StorageConfig] = None) -> str:
    """Compute (or reuse) the reference file of a shard set; returns its URL. Collective.

    Images go through the training pipeline's decode / centre-crop / resize to ``resolution``, one
    pass over ``min(n_samples, dataset size)`` samples (``n_samples=None``: all) in a fixed order
    (``one_pass``), every image exactly once, partial last batch included, each rank reading its own
    shards. The default file name carries the N that went in: the planned N, or, when samples were
    dropped (a failed check, an undecodable image; counted in ``meta["dropped"]``), the smaller
    actual N, with a warning. An existing file at the output URL is reused as is.
    """
    from ldm_scale.data import DataConfig
    from ldm_scale.data.one_pass import OnePassLoader

    info = dist.get_dist_info()
    data_cfg = DataConfig(urls=list(urls), mode="epoch", conditioning=conditioning, resolution=resolution,
                          crop="center", flip=False, shuffle_buffer=0, num_workers=num_workers)
    loader = OnePassLoader(data_cfg, info, batch_size=batch_size, n_samples=n_samples, seed=seed,
                           storage_defaults=storage_cfg)
    planned_url = out_url or default_reference_url(urls[0], extractor, resolution, loader.planned, conditioning)
    if storage.exists(planned_url):
        return planned_url
    work_url = planned_url + ".partial"
    result = compute_reference_stats(loader, extractor, keep_images=keep_images, work_url=work_url,
                                     checkpoint_every=checkpoint_every,
                                     meta={"data": [storage.redact(u) for u in urls], "resolution": resolution,
                                           "conditioning": conditioning, "seed": seed})
    n = dist.broadcast_object(result.pool.n if result is not None else None)  # rank 0 holds the result
    final_url = out_url or default_reference_url(urls[0], extractor, resolution, n, conditioning)
    if n != loader.planned and info.is_main:
        log.warning("reference statistics over %d images, not the %d planned: %s were dropped (%s); written to %s",
                    n, loader.planned, loader.planned - n, result.meta["dropped"], storage.redact(final_url))
    finish_reference(result, final_url, work_url)
    return final_url
