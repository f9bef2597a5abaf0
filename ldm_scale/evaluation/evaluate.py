"""The FID evaluation run behind ``eval/fid.py``: sample -> features -> metrics -> JSON (+ W&B).

Order (each stage resumable, every stage collective over ranks):
1. load the checkpoint's EMA weights and build the DDIM (+CFG) sampler (``ldm_scale.sampling``);
2. build the pinned / named feature extractor;
3. load the reference statistics, or compute them once from shards and store them next to the data;
4. pick the conditions (class labels / captions from the reference set, or given prompts);
5. generate the N samples as chunk files (``<out>/samples/``), skipping chunks already written;
6. extract features per chunk (``<out>/features/<extractor>/``), skipping chunks already done;
7. compute FID / IS / precision-recall (+ KID, sFID, CLIP score) and write ``<out>/results.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ldm_scale import dist, storage
from ldm_scale.evaluation.config import FIDEvalConfig
from ldm_scale.evaluation.features import FeatureExtractor, extract_features, extractor_from_config, get_extractor
from ldm_scale.evaluation.fid import fid_from_stats, gaussian_stats, warn_if_undersampled
from ldm_scale.evaluation.generate import (
    extract_chunk_features,
    generate_samples,
    load_features,
    load_samples,
    write_adm_npz,
)
from ldm_scale.evaluation.inception_score import inception_score
from ldm_scale.evaluation.kid import kernel_inception_distance
from ldm_scale.evaluation.cmmd import cmmd
from ldm_scale.evaluation.precision_recall import density_coverage, precision_recall
from ldm_scale.evaluation.preprocess import nchw_uint8
from ldm_scale.evaluation.reference import ReferenceStats, load_reference, reference_from_shards

log = logging.getLogger("ldm_scale.eval")


def settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_reference_file(url: str) -> bool:
    return url.endswith(".npz")


def resolve_reference(cfg: FIDEvalConfig, extractor: FeatureExtractor, image_size: int,
                      condition_kind: str) -> Tuple[ReferenceStats, str]:
    """The reference statistics for ``extractor``: a stored file, or computed from shards (once)."""
    if not cfg.ref:
        raise ValueError("ref= is required: a reference .npz (ours or an ADM VIRTUAL_*.npz) or the shard "
                         "URLs of the real data, e.g. ref='s3://bucket/laion/{00000..00099}.tar'")
    url = cfg.ref
    if not _is_reference_file(url):
        shards = [u for u in url.split("::") if u]
        url = reference_from_shards(
            shards, extractor, n_samples=cfg.ref_n_samples, keep_images=cfg.ref_keep_images,
            resolution=cfg.ref_resolution or image_size,
            conditioning={"text": "text", "class": "class"}.get(condition_kind, "none"),
            out_url=cfg.ref_out, batch_size=cfg.extractor.batch_size, seed=cfg.seed, storage_cfg=cfg.storage)
    return load_reference(url), url


def _features_of_images(extractor: FeatureExtractor, images: np.ndarray, batch_size: int) -> Dict[str, np.ndarray]:
    """Features of reference images, the work split over ranks and gathered (every rank gets all)."""
    info = dist.get_dist_info()
    bounds = np.linspace(0, len(images), info.world_size + 1).astype(int)
    mine = images[bounds[info.rank]:bounds[info.rank + 1]]
    feats = extract_features(extractor, nchw_uint8(mine), batch_size) if len(mine) else {}
    parts = dist.all_gather_object({k: v.numpy() for k, v in feats.items()})
    keys = next(p.keys() for p in parts if p)
    return {k: np.concatenate([p[k] for p in parts if p]) for k in keys}


def check_reference_for_metrics(cfg: FIDEvalConfig, ref: ReferenceStats) -> None:
    """KID subsets are drawn from the reference's stored features (or its arr_0 images): refuse a
    subset size larger than that set before any sample is generated."""
    stored = ref.features if ref.features is not None else ref.images
    if cfg.metrics.kid and (stored is None or len(stored) < cfg.metrics.kid_subset_size):
        have = 0 if stored is None else len(stored)
        raise ValueError(f"metrics.kid_subset_size={cfg.metrics.kid_subset_size} but the reference stores "
                         f"{have} images' features: set metrics.kid_subset_size<={have}, or rebuild the "
                         "reference with more kept images (ref_keep_images= / keep_images=)")


def reference_features(ref: ReferenceStats, extractor: FeatureExtractor, batch_size: int,
                       notes: List[str]) -> Dict[str, Any]:
    """Statistics and per-image features of the reference set as seen by ``extractor``.

    A file made with another extractor, resize rule or weights file (both digests recorded and
    different: e.g. two DINOv2 files under one name) is only usable through its ``arr_0`` images: then
    everything is recomputed from them (N becomes the number of stored images).
    """
    same_weights = None in (ref.weights_sha256, extractor.weights_sha256) or ref.weights_sha256 == extractor.weights_sha256
    same = (ref.extractor_name == extractor.name and ref.resize == extractor.resize and same_weights
            and ref.pool is not None)
    if same:
        feats = ref.features
        if feats is None:
            if ref.images is None:
                raise ValueError("the reference file has statistics but neither features nor arr_0 images: "
                                 "precision/recall/KID cannot be computed; disable them or rebuild the file")
            feats = _features_of_images(extractor, ref.images, batch_size)["pool"]
        return {"pool": ref.pool, "spatial": ref.spatial, "features": feats, "n": ref.pool.n}
    theirs = f"{ref.extractor_name!r} (resize {ref.resize!r}, weights sha256 {ref.weights_sha256})"
    ours = f"{extractor.name!r} (resize {extractor.resize!r}, weights sha256 {extractor.weights_sha256})"
    if ref.images is None:
        raise ValueError(
            f"the reference was computed with extractor {theirs} but this run uses {ours}, and it stores no arr_0 "
            "images to recompute from: use the same extractor.name / extractor.resize / weights, or rebuild the "
            "reference")
    notes.append(f"reference statistics recomputed from its {len(ref.images)} arr_0 images: it was made with "
                 f"{theirs}, this run uses {ours}")
    feats = _features_of_images(extractor, ref.images, batch_size)
    spatial = gaussian_stats(feats["spatial"]) if "spatial" in feats else None
    return {"pool": gaussian_stats(feats["pool"]), "spatial": spatial, "features": feats["pool"],
            "n": len(ref.images)}


def read_prompts(url: str, condition_kind: str) -> List[Any]:
    """Conditions from a text file (one caption, or one integer class label, per line)."""
    lines = [line.strip() for line in storage.read_text(url).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{storage.redact(url)} holds no prompts")
    if condition_kind == "class":
        try:
            return [int(line) for line in lines]
        except ValueError as exc:
            raise ValueError(f"{storage.redact(url)}: a class-conditional model needs one integer label per line") from exc
    return lines


def prompts_from_shards(urls: List[str], condition_kind: str, n: int, cfg: FIDEvalConfig) -> List[Any]:
    """Up to ``n`` captions / labels read from shards (every rank reads the same, in shard order)."""
    from ldm_scale.data import DataConfig, build_loader

    data_cfg = DataConfig(urls=urls, mode="epoch", conditioning=condition_kind, resolution=8, shuffle_buffer=0,
                          num_workers=1, storage=cfg.storage)
    loader = build_loader(data_cfg, dist.DistInfo(), batch_size=1, seed=cfg.seed)
    out: List[Any] = []
    for batch in loader:
        out.extend(batch["caption"] if condition_kind == "text" else batch["label"].tolist())
        if len(out) >= n:
            break
    return out[:n]


def resolve_conditions(cfg: FIDEvalConfig, ref: ReferenceStats, condition_kind: str) -> Optional[List[Any]]:
    if condition_kind == "none":
        return None
    if cfg.prompts:
        if cfg.prompts.endswith(".tar") or "{" in cfg.prompts or "::" in cfg.prompts:
            return prompts_from_shards([u for u in cfg.prompts.split("::") if u], condition_kind, cfg.n_samples, cfg)
        return read_prompts(cfg.prompts, condition_kind)
    found = ref.captions if condition_kind == "text" else ref.labels
    if found is None or len(found) == 0:
        raise ValueError(
            f"a {condition_kind}-conditional model needs conditions: the reference file has no "
            f"{'captions' if condition_kind == 'text' else 'labels'}; pass prompts=<file or shards>")
    return list(found) if condition_kind == "text" else [int(v) for v in found]


def compute_metrics(cfg: FIDEvalConfig, gen: Dict[str, np.ndarray], refd: Dict[str, Any],
                    notes: List[str]) -> Dict[str, float]:
    """Metrics from generated features ``gen`` and reference ``refd``. Precision/recall is collective."""
    m = cfg.metrics
    out: Dict[str, float] = {}
    n, dim = gen["pool"].shape
    if m.precision_recall:
        out.update(precision_recall(refd["features"], gen["pool"], k=m.pr_k, batch_size=m.pr_batch_size,
                                    device=dist.resolve_device(cfg.device), distributed=True))
    if m.density_coverage:
        out.update(density_coverage(refd["features"], gen["pool"], k=m.dc_k, batch_size=m.pr_batch_size,
                                    device=dist.resolve_device(cfg.device), distributed=True))
    if not dist.get_dist_info().is_main:
        return out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if m.fid:
            warn_if_undersampled(n, dim, "generated features")
            warn_if_undersampled(refd["n"], dim, "reference features")
            out["fid"] = fid_from_stats(gaussian_stats(gen["pool"]), refd["pool"])
        if m.sfid:
            if "spatial" not in gen or refd["spatial"] is None:
                raise ValueError("metrics.sfid needs spatial features (an Inception extractor) in both sets")
            out["sfid"] = fid_from_stats(gaussian_stats(gen["spatial"]), refd["spatial"])
        if m.inception_score:
            if "logits" not in gen:
                raise ValueError("metrics.inception_score needs an extractor with class logits (Inception); "
                                 "set metrics.inception_score=false for this extractor")
            out["inception_score"], out["inception_score_std"] = inception_score(gen["logits"], splits=m.is_splits,
                                                                                    shuffle=m.is_shuffle)
        if m.cmmd:  # the reference's stored embeddings against the samples' (FIDEvalConfig.check: CLIP)
            out["cmmd"] = cmmd(refd["features"], gen["pool"])
        if m.kid:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                refd["features"], gen["pool"], num_subsets=m.kid_subsets, subset_size=m.kid_subset_size, seed=cfg.seed)
    notes.extend(str(w.message) for w in caught)
    return out


def clip_score_of_samples(cfg: FIDEvalConfig, samples_url: str, run_url: str) -> float:
    """CLIP score of the generated images against their captions (rank 0 computes; collective)."""
    from ldm_scale.evaluation.clip_score import clip_score

    clip = get_extractor(cfg.metrics.clip_model, device=dist.resolve_device(cfg.device), resize=cfg.extractor.resize,
                         seed=cfg.extractor.seed)
    features_url = storage.join(run_url, "features", _slug(clip.name))
    extract_chunk_features(clip, samples_url=samples_url, features_url=features_url, n_samples=cfg.n_samples,
                           chunk_size=cfg.batch_size, batch_size=cfg.extractor.batch_size)
    if not dist.get_dist_info().is_main:
        return float("nan")
    captions = load_samples(samples_url, cfg.n_samples, cfg.batch_size).get("captions")
    if captions is None:
        raise ValueError("metrics.clip_score needs a text-conditional model (the samples have no captions)")
    emb = torch.from_numpy(load_features(features_url, cfg.n_samples, cfg.batch_size)["embedding"])
    text = torch.cat([clip.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    return clip_score(emb, text)


def log_to_wandb(cfg: FIDEvalConfig, record: Dict[str, Any], run_url: str) -> None:
    from ldm_scale.logging import RunLogger

    if cfg.logger.backend == "none":
        return
    local_dir = Path(storage.local_path(run_url)) if storage.is_local(run_url) else Path("eval_runs") / record["settings_hash"]
    logger = RunLogger(cfg.logger, run_id=f"eval-{record['settings_hash']}", name="fid", run_dir=local_dir,
                       resolved_config={k: v for k, v in record.items() if k != "metrics"})
    metrics = {f"eval/{k}": v for k, v in record["metrics"].items()}
    logger.log(metrics, step=int(record["checkpoint"].get("step") or 0))
    logger.summary(metrics)
    record["wandb_dir"] = logger.run_path
    logger.finish()


def _slug(name: str) -> str:
    return name.split(" ")[0].replace(":", "_").replace("/", "_").replace("@", "_")


def check_settings_for_model(cfg: FIDEvalConfig, ms) -> None:
    """Raise ValueError (one line: the setting, the model, the fix) for settings this model cannot
    serve, before the extractor, the reference or a single sample is made."""
    problems = []
    if cfg.metrics.clip_score and ms.condition_kind != "text":
        problems.append(f"metrics.clip_score=true needs a text-conditional model, and {storage.redact(cfg.ckpt)} is "
                        f"{ms.condition_kind}-conditioned ({ms.checkpoint_info.get('flavour')}): set "
                        "metrics.clip_score=false")
    if problems:
        raise ValueError("; ".join(problems))


def run_fid_eval(cfg: FIDEvalConfig, model_sampler=None) -> Optional[Dict[str, Any]]:
    """The whole evaluation (collective); returns the JSON record on rank 0, None elsewhere.

    ``model_sampler`` (a :class:`~ldm_scale.evaluation.model_sampler.ModelSampler`) may be passed in
    by callers that already hold the model; otherwise it is loaded from ``cfg.ckpt``.
    """
    from ldm_scale.evaluation.model_sampler import load_model_sampler

    info = dist.init_distributed()
    storage.configure(cfg.storage)
    device = dist.resolve_device(cfg.device)
    notes: List[str] = []
    t_start = time.time()

    # 1. model + sampler, and every setting that depends on the model checked before any work
    ms = model_sampler or load_model_sampler(cfg, device)
    check_settings_for_model(cfg, ms)
    # 2. extractor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extractor = extractor_from_config(cfg.extractor, device)
    notes.extend(str(w.message) for w in caught)
    for note in notes:
        log.warning(note)
    # 3. reference (and the metrics that need enough of its images, before any sample is made)
    ref, ref_url = resolve_reference(cfg, extractor, ms.image_size, ms.condition_kind)
    check_reference_for_metrics(cfg, ref)
    # 4. conditions
    conditions = resolve_conditions(cfg, ref, ms.condition_kind)
    # 5. samples (the run directory is a function of the settings, so re-running resumes)
    settings = {"checkpoint": storage.redact(cfg.ckpt), "checkpoint_step": ms.checkpoint_info.get("step"),
                "use_ema": cfg.use_ema, "sampler": asdict(cfg.sampler), "seed": cfg.seed, "n_samples": cfg.n_samples,
                "chunk_size": cfg.batch_size, "prompts": cfg.prompts,
                "conditions_hash": settings_hash({"c": [str(c) for c in (conditions or [])]})}
    if "size" in ms.checkpoint_info:  # only off the training size: the tags of earlier runs stay valid
        settings["size"] = ms.checkpoint_info["size"]
    tag = settings_hash(settings)
    run_url = cfg.out or str(Path("eval_runs") / f"{_slug(Path(str(cfg.ckpt)).stem) or 'model'}-{tag}")
    samples_url = storage.join(run_url, "samples")
    if info.is_main:
        settings_url = storage.join(run_url, "settings.json")
        if storage.exists(settings_url) and json.loads(storage.read_text(settings_url)) != settings:
            raise RuntimeError(f"{storage.redact(run_url)} holds samples made with other settings; use another out=")
        storage.write_text(settings_url, json.dumps(settings, indent=1))
    dist.barrier()
    gen_stats = generate_samples(ms.sample_batch, samples_url=samples_url, n_samples=cfg.n_samples,
                                 chunk_size=cfg.batch_size, seed=cfg.seed, latent_shape=ms.latent_shape,
                                 conditions=conditions, device=device)
    # 6. features
    features_url = storage.join(run_url, "features", _slug(extractor.name) + "-" + extractor.resize)
    extract_chunk_features(extractor, samples_url=samples_url, features_url=features_url,
                           n_samples=cfg.n_samples, chunk_size=cfg.batch_size, batch_size=cfg.extractor.batch_size)
    gen = load_features(features_url, cfg.n_samples, cfg.batch_size)
    refd = reference_features(ref, extractor, cfg.extractor.batch_size, notes)
    # 7. metrics
    metrics = compute_metrics(cfg, gen, refd, notes)
    if cfg.metrics.clip_score:
        metrics["clip_score"] = clip_score_of_samples(cfg, samples_url, run_url)
    if cfg.write_adm_npz and info.is_main:
        write_adm_npz(samples_url, storage.join(run_url, f"samples_{cfg.n_samples}.npz"), cfg.n_samples, cfg.batch_size)
    throughput = dist.all_gather_object(asdict(gen_stats) | {"images_per_second": gen_stats.images_per_second})
    if not info.is_main:
        dist.barrier()
        return None
    record = {
        "metrics": metrics,
        "metric_settings": asdict(cfg.metrics),  # e.g. is_shuffle, kid_subsets: how the numbers were made
        "n_samples": cfg.n_samples,
        "n_reference": refd["n"],
        "n_reference_features": int(len(refd["features"])),
        "extractor": extractor.describe(),
        "comparable_to_published": extractor.comparable_to_published,
        "reference": {"url": storage.redact(ref_url), "meta": ref.meta},
        "sampler": {**asdict(cfg.sampler), "seed": cfg.seed, "chunk_size": cfg.batch_size,
                    "use_ema": cfg.use_ema, "condition_kind": ms.condition_kind},
        "checkpoint": dict(ms.checkpoint_info, url=storage.redact(cfg.ckpt)),
        "generation": {"per_rank": throughput, "world_size": info.world_size},
        "settings_hash": tag,
        "run_dir": storage.redact(run_url),
        "notes": notes,
        "seconds": time.time() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(storage.join(run_url, "results.json"), json.dumps(record, indent=1, default=str))
    # 8. W&B (rank 0; offline unless configured): the metrics at the checkpoint's step, the record as config.
    log_to_wandb(cfg, record, run_url)
    if not cfg.keep_samples:
        storage.rm(samples_url, recursive=True)
    dist.barrier()
    return record
