"""Reference statistics of a real image set, stored as one ``.npz`` next to the data.

The file is a superset of the ADM evaluator's reference batches (``VIRTUAL_imagenet256_labeled.npz``
from Dhariwal & Nichol 2021): ADM's tooling reads ``arr_0`` (uint8 images [K, H, W, 3]) and the
float64 Gaussian statistics ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial
features, sFID). We add:

- ``features``: pool features of the ``arr_0`` images (precision / recall without recomputing);
- ``labels`` (int64 [K]) or ``captions`` (str [K]) of those images, to condition generation;
- ``meta``: a JSON string: format version, extractor description (name, resize rule), N (images in
  ``mu``/``sigma``), resolution, data URLs.

An ADM file (no ``meta``) is read as statistics of the pinned FID Inception with TF resizing; its
``arr_0`` lets any other extractor recompute what it needs. ``mu``/``sigma`` are over all N images;
``arr_0`` may hold a subset (``keep_images``), as ADM's files do.

``compute_reference_stats`` runs over a shard set with every rank reading its own shards; each rank
checkpoints its running moments, kept images and loader position, so a crashed job resumes.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ldm_scale import dist, storage
from ldm_scale.evaluation.features import FeatureExtractor
from ldm_scale.evaluation.fid import GaussianStats, StreamingMoments
from ldm_scale.evaluation.preprocess import nhwc_uint8

FORMAT = "ldm_scale/reference-v1"
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
    """One rank's running statistics, kept images and their conditions; serialisable for resume."""

    def __init__(self, extractor: FeatureExtractor, keep: int):
        self.pool = StreamingMoments(extractor.feature_dims["pool"])
        self.spatial = StreamingMoments(extractor.feature_dims["spatial"]) if "spatial" in extractor.feature_dims else None
        self.keep = keep
        self.images: List[np.ndarray] = []
        self.features: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.captions: List[str] = []
        self.kept = 0

    def add(self, batch: Dict[str, Any], feats: Dict[str, torch.Tensor], take: int) -> None:
        self.pool.update(feats["pool"][:take])
        if self.spatial is not None:
            self.spatial.update(feats["spatial"][:take])
        room = min(self.keep - self.kept, take)
        if room > 0:
            self.images.append(nhwc_uint8(batch["image"][:room]))
            self.features.append(feats["pool"][:room].numpy().astype(np.float32))
            if "label" in batch:
                self.labels.append(batch["label"][:room].cpu().numpy().astype(np.int64))
            if "caption" in batch:
                self.captions.extend(list(batch["caption"][:room]))
            self.kept += room

    def state_dict(self) -> Dict[str, Any]:
        return {"pool": self.pool.state_dict(),
                "spatial": self.spatial.state_dict() if self.spatial is not None else None,
                "images": [torch.from_numpy(a) for a in self.images],
                "features": [torch.from_numpy(a) for a in self.features],
                "labels": [torch.from_numpy(a) for a in self.labels],
                "captions": self.captions, "kept": self.kept}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.pool = StreamingMoments.from_state_dict(sd["pool"])
        if sd["spatial"] is not None:
            self.spatial = StreamingMoments.from_state_dict(sd["spatial"])
        self.images = [t.numpy() for t in sd["images"]]
        self.features = [t.numpy() for t in sd["features"]]
        self.labels = [t.numpy() for t in sd["labels"]]
        self.captions, self.kept = sd["captions"], sd["kept"]


def _save_torch(obj: Any, url: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(url, buf.getvalue())


def _load_torch(url: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=False)


def compute_reference_stats(loader, extractor: FeatureExtractor, *, n_samples: int, keep_images: int,
                            work_url: str, checkpoint_every: int = 20,
                            meta: Optional[Dict[str, Any]] = None) -> Optional[ReferenceStats]:
    """Statistics of up to ``n_samples`` images from ``loader`` (a ``ShardLoader`` over this rank's
    shards), resumable from ``work_url``. Collective: every rank calls it; rank 0 gets the result,
    the other ranks None.

    Each rank takes ``n_samples // world`` samples (the first ``n_samples % world`` ranks one more),
    or one epoch if that is less, and keeps its first ``keep_images // world`` (+1) images for
    ``arr_0``. Every ``checkpoint_every`` batches each rank saves its state and loader position to
    ``work_url/rank<R>.pt``; the loader's ``state_dict`` is collective, so checkpoints happen at
    batch counts every rank reaches.
    """
    info = dist.get_dist_info()
    rank, world = info.rank, info.world_size
    quota = min(n_samples // world + (rank < n_samples % world), loader.batches_per_epoch * loader.batch_size)
    keep = keep_images // world + (rank < keep_images % world)
    # Batches all ranks surely run; state_dict() must only be called at these.
    common_batches = min(n_samples // world, loader.batches_per_epoch * loader.batch_size) // loader.batch_size
    acc = _RankAccumulator(extractor, keep)
    done = 0
    ckpt_url = storage.join(work_url, f"rank{rank}.pt")
    if storage.exists(ckpt_url):
        state = _load_torch(ckpt_url)
        if state["world_size"] != world or state["quota"] != quota:
            raise RuntimeError(
                f"{storage.redact(ckpt_url)} was written by a run with {state['world_size']} ranks / quota "
                f"{state['quota']}; resume with the same world size and n_samples, or delete {storage.redact(work_url)}")
        acc.load_state_dict(state["accumulator"])
        loader.load_state_dict(state["loader"])
        done = state["done"]
    batches = done // loader.batch_size
    iterator = iter(loader) if done < quota else iter(())
    for batch in iterator:
        take = min(quota - done, len(batch["image"]))
        acc.add(batch, extractor(batch["image"]), take)
        done += take
        batches += 1
        if batches % checkpoint_every == 0 and batches < common_batches:
            _save_torch({"accumulator": acc.state_dict(), "loader": loader.state_dict(), "done": done,
                         "world_size": world, "quota": quota}, ckpt_url)
        if done >= quota:
            break

    # Rank parts go through storage rather than a collective: arr_0 can be gigabytes.
    part_url = storage.join(work_url, f"part_rank{rank}.pt")
    part = acc.state_dict()
    _save_torch({k: part[k] for k in ("images", "features", "labels", "captions")}, part_url)
    acc.pool.all_reduce()
    if acc.spatial is not None:
        acc.spatial.all_reduce()
    dist.barrier()
    result = None
    if rank == 0:
        parts = [_load_torch(storage.join(work_url, f"part_rank{r}.pt")) for r in range(world)]
        images = [a.numpy() for p in parts for a in p["images"]]
        features = [a.numpy() for p in parts for a in p["features"]]
        labels = [a.numpy() for p in parts for a in p["labels"]]
        captions = [c for p in parts for c in p["captions"]]
        result = ReferenceStats(
            pool=acc.pool.stats(), spatial=acc.spatial.stats() if acc.spatial is not None else None,
            images=np.concatenate(images) if images else None,
            features=np.concatenate(features) if features else None,
            labels=np.concatenate(labels) if labels else None,
            captions=captions or None,
            meta=dict(meta or {}, extractor=extractor.describe(), world_size=world,
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



def reference_from_shards(urls: List[str], extractor: FeatureExtractor, *, n_samples: int, keep_images: int,
                          resolution: int, conditioning: str, out_url: Optional[str] = None,
                          batch_size: int = 50, num_workers: int = 2, seed: int = 0, checkpoint_every: int = 20,
                          storage_cfg: Optional[storage.StorageConfig] = None) -> str:
    """Compute (or reuse) the reference file of a shard set; returns its URL. Collective.

    Images go through the training pipeline's decode / centre-crop / resize to ``resolution``, one
    pass over the shards in a fixed order (no sample shuffling), each rank reading its own shards.
    An existing file at the output URL is reused as is.
    """
    from ldm_scale.data import DataConfig, build_loader

    info = dist.get_dist_info()
    out_url = out_url or default_reference_url(urls[0], extractor, resolution, n_samples, conditioning)
    if storage.exists(out_url):
        return out_url
    data_cfg = DataConfig(urls=list(urls), mode="epoch", conditioning=conditioning, resolution=resolution,
                          crop="center", flip=False, shuffle_buffer=0, num_workers=num_workers,
                          storage=storage_cfg or storage.StorageConfig())
    loader = build_loader(data_cfg, info, batch_size=batch_size, seed=seed)
    work_url = out_url + ".partial"
    result = compute_reference_stats(loader, extractor, n_samples=n_samples, keep_images=keep_images,
                                     work_url=work_url, checkpoint_every=checkpoint_every,
                                     meta={"data": [storage.redact(u) for u in urls], "resolution": resolution,
                                           "conditioning": conditioning, "seed": seed})
    finish_reference(result, out_url, work_url)
    return out_url
