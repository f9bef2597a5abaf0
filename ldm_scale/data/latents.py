"""Pre-encode image shards into latent shards with a frozen autoencoder (Rombach et al. 2022, Sec. 3:
the first stage is trained once and reused, so its encoder need not run in every LDM step).

A latent shard keeps the image shard's name, keys and ``.txt`` / ``.cls`` / ``.json`` members and
replaces the image by ``<key>.latent.npy``: the posterior moments stacked as ``[2, C, h, w]``
(mean, logvar) of ``q(z|x)``. Storing the moments rather than one sample keeps the posterior noise
random per training step, as with online encoding. A VQ first stage stores its pre-quantisation
latent as the mean with ``logvar = -30`` (a point mass).

With aspect-ratio buckets (``buckets=``, ``data/buckets.py``) each image is centre-cropped to its
bucket instead of the square, so the latents have the bucket's shape; ``<key>.micro.json`` records
SDXL's micro-conditioning of the crop (``original_size``, ``crop_top_left``, ``target_size``), and
the output directory gets ``aspects.json`` (each shard's samples per bucket, for the loader's epoch
plan) and the bucket set in ``dataset.json``.

Work is split by shard over ranks (shard ``i`` goes to rank ``i % world``). A shard is complete
when its ``_stats.json`` exists (written after the tar), so a restarted job skips finished shards.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ldm_scale import storage
from ldm_scale.data import buckets as bucket_lib
from ldm_scale.data import text_embeddings
from ldm_scale.data.config import DataConfig
from ldm_scale.data.filters import check_sample, image_member
from ldm_scale.data.shard_writer import write_aspects, write_shard, write_sizes
from ldm_scale.data.tar_stream import iter_tar_samples
from ldm_scale.data.transforms import crop_to_bucket, decode_image, image_header_size, resize_crop_flip, to_unit_range
from ldm_scale.formats import AUTOENCODER_FORMAT

log = logging.getLogger(__name__)

VQ_LOGVAR = -30.0


def _config_from_dict(d: Dict[str, Any]):
    from omegaconf import OmegaConf

    from ldm_scale.models.autoencoder import AutoencoderConfig, VQConfig
    from ldm_scale.models.registry import FirstStageConfig

    cls = FirstStageConfig if "kind" in d else VQConfig if "n_embed" in d else AutoencoderConfig
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), d))


def load_autoencoder(ckpt_url: Optional[str], name: Optional[str] = None,
                     cfg: Optional[storage.StorageConfig] = None) -> nn.Module:
    """A frozen autoencoder: from an exported ``ldm_scale/autoencoder-v1`` checkpoint (its
    ``model_config``, or the registry ``name`` when given), or randomly initialised from ``name``
    alone when ``ckpt_url`` is None (only for tests and benchmarks)."""
    from ldm_scale.models import build_autoencoder

    if ckpt_url is None:
        if name is None:
            raise ValueError("give an autoencoder checkpoint URL or a registry name")
        return build_autoencoder(name).eval().requires_grad_(False)
    payload = torch.load(io.BytesIO(storage.read_bytes(ckpt_url, cfg)), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != AUTOENCODER_FORMAT:
        raise ValueError(f"{storage.redact(ckpt_url)} is not an exported autoencoder checkpoint "
                         f"(format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
                         f"expected {AUTOENCODER_FORMAT!r})")
    model = build_autoencoder(name if name else _config_from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval().requires_grad_(False)


@torch.no_grad()
def posterior_moments(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, 2, C, h, w] (mean, logvar) of the first stage's latent for images in [-1, 1]."""
    if hasattr(model, "encode_prequant"):  # VQ: deterministic pre-quantisation latent
        h = model.encode_prequant(images)
        return torch.stack([h, torch.full_like(h, VQ_LOGVAR)], dim=1)
    posterior = model.encode(images)
    return torch.stack([posterior.mean, posterior.logvar], dim=1)


@dataclass
class PrecomputeResult:
    encoded: List[str]  # output shard URLs written by this call
    skipped_complete: List[str]  # already complete, left alone
    counts: Dict[str, int]


def _latent_bytes(moments: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, moments.float().cpu().numpy().astype(dtype))
    return buf.getvalue()


@torch.no_grad()
def text_outputs(encoder: nn.Module, captions: List[str], device: torch.device):
    """(context [B, L, D], pooled [B, P]) of a frozen text encoder for cleaned captions."""
    tokens = encoder.caption_tokenizer(list(captions)).to(device)
    return encoder.encode_tokens_and_pooled(tokens)


def _encode_into(pending: List[Dict[str, Any]], samples: List[Dict[str, Any]], model: nn.Module,
                 device: torch.device, dtype: str, text_encoder: Optional[nn.Module] = None,
                 text_dtype: str = "float16") -> None:
    """Encode the images (and captions) of ``pending`` in one batch, move the samples (now with
    latents and text members) to ``samples``."""
    if not pending:
        return
    images = torch.stack([p.pop("image") for p in pending]).to(device)
    for p, m in zip(pending, posterior_moments(model, images)):
        p["latent.npy"] = _latent_bytes(m, dtype)
    if text_encoder is not None:
        context, pooled = text_outputs(text_encoder, [p.pop("caption") for p in pending], device)
        for p, c, v in zip(pending, context, pooled):
            name, data = text_embeddings.member_bytes(c, text_dtype, "text")
            p[name] = data
            name, data = text_embeddings.member_bytes(v, text_dtype, "pooled")
            p[name] = data
    samples.extend(pending)
    pending.clear()


def precompute_latents(
    src_urls: Sequence[str] | str,
    out_url: str,
    model: nn.Module,
    *,
    resolution: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
    dtype: str = "float16",
    device: Optional[torch.device] = None,
    cfg: Optional[storage.StorageConfig] = None,
    text_encoder: Optional[nn.Module] = None,
    text_dtype: str = "float16",
    buckets: Optional[Sequence[bucket_lib.Bucket]] = None,
) -> PrecomputeResult:
    """Encode this rank's share of ``src_urls`` into latent shards under ``out_url``.

    Images get the training pipeline's centre crop at ``resolution`` (no flip), or with ``buckets``
    the centre crop of their bucket (see the module doc). Samples whose image is missing or
    undecodable are skipped and counted in the shard's ``_stats.json``. With a frozen
    ``text_encoder`` each sample also gets its caption's outputs (``data/text_embeddings.py``) of
    the caption exactly as the loader cleans it; samples without a caption are then skipped."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype={dtype!r}; expected 'float16' or 'float32'")
    f = int(getattr(model, "downsample_factor", 1))
    if buckets and any(side % f for bucket in buckets for side in bucket):
        raise ValueError(f"bucket sides must be multiples of the autoencoder's factor f={f}: use a buckets step "
                         f"that is a multiple of {f}")
    urls = storage.expand_urls(src_urls, cfg)
    device = device or torch.device("cpu")
    model = model.to(device)
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    check_cfg = DataConfig(urls=["-"], input="image", conditioning="none" if text_encoder is None else "text",
                           resolution=resolution)
    result = PrecomputeResult([], [], {})
    total: Counter = Counter()
    for i, src in enumerate(urls):
        if i % world_size != rank:
            continue
        name = src.rsplit("/", 1)[-1]
        stem = name[: -len(".tar")] if name.endswith(".tar") else name.split(".", 1)[0]
        out_stats = storage.join(out_url, stem + "_stats.json")
        if storage.exists(out_stats, cfg):
            result.skipped_complete.append(storage.join(out_url, stem + ".tar"))
            continue
        counters: Counter = Counter()
        samples: List[Dict[str, Any]] = []
        pending: Dict[int, List[Dict[str, Any]]] = {}  # by bucket (one square bucket without buckets)
        histogram: Counter = Counter()

        for raw in iter_tar_samples(src, i, counters, cfg):
            counters["samples_read"] += 1
            reason = check_sample(raw, check_cfg)
            if reason is not None:
                counters["skip/" + reason] += 1
                continue
            data = raw[image_member(raw)]
            try:
                if buckets:
                    stored = image_header_size(data)
                    bucket = bucket_lib.assign_bucket(*stored, buckets)
                    pixels, micro = crop_to_bucket(data, buckets[bucket], stored=stored, meta=raw["meta"],
                                                   crop="center", flip=False, rng=None)
                else:
                    bucket, micro = 0, None
                    pixels = resize_crop_flip(decode_image(data, resolution, "auto"), resolution, "center", False, None)
                image = to_unit_range(pixels)
            except Exception:  # noqa: BLE001 - undecodable image: skipped and counted
                counters["skip/decode_error"] += 1
                continue
            out = {"__key__": raw["__key__"], "image": image, "__order__": counters["samples_read"]}
            if micro is not None:
                out["micro.json"] = micro
                histogram[bucket_lib.aspect_bin(*buckets[bucket])] += 1
            if text_encoder is not None:
                out["caption"] = raw["caption"]  # cleaned by check_sample, as the loader would
            for ext in ("txt", "cls", "json"):
                if ext in raw:
                    out[ext] = raw[ext]
            batch = pending.setdefault(bucket, [])
            batch.append(out)  # one image size per encoder batch
            if len(batch) == batch_size:
                _encode_into(batch, samples, model, device, dtype, text_encoder, text_dtype)
        for batch in pending.values():
            _encode_into(batch, samples, model, device, dtype, text_encoder, text_dtype)
        samples.sort(key=lambda sample: sample.pop("__order__"))  # the source shard's order
        extra = {"aspects": dict(histogram), "buckets": [list(b) for b in buckets]} if buckets else {}
        digits = len(stem) if stem.isdigit() else 5
        shard_id = int(stem) if stem.isdigit() else i
        # The tar is written before _stats.json: _stats.json marks the shard complete.
        write_shard(out_url, shard_id, samples, digits=digits, cfg=cfg,
                    stats_extra={"count": len(samples), "successes": len(samples), "source": src,
                                 "resolution": resolution, "skips": dict(counters), **extra})
        result.encoded.append(storage.join(out_url, stem + ".tar"))
        total.update(counters)
        log.info("rank %d: encoded %s (%d samples)", rank, storage.redact(src), len(samples))
    result.counts = dict(total)
    return result


def bucket_record_problem(data: DataConfig, cfg: Optional[storage.StorageConfig] = None) -> Optional[str]:
    """For latent shards: the problem with ``data.buckets`` / ``data.resolution`` against the bucket
    record each set's ``dataset.json`` has from precompute_latents, or None. Latents have the
    shape they were encoded at, so a set encoded with buckets needs the same buckets to train, and
    a square set cannot be bucketed."""
    from ldm_scale.data.shards import read_dataset_card, shard_set_dirs

    wanted = data.buckets
    for shard_dir in shard_set_dirs(data.urls, cfg):
        card = read_dataset_card(shard_dir, cfg) or {}
        record, where = card.get("buckets"), storage.redact(shard_dir)
        if record is None and wanted.enabled:
            return (f"data.buckets.enabled=true but the latent shards in {where} were encoded at one size (no buckets "
                    "in their dataset.json): encode them with data_tools/precompute_latents.py buckets.enabled=true "
                    f"buckets.step={wanted.step} buckets.max_aspect={wanted.max_aspect}, or set data.buckets.enabled=false")
        if record is not None:
            used = (card.get("resolution"), record.get("step"), record.get("max_aspect"))
            if not wanted.enabled or used != (data.resolution, wanted.step, wanted.max_aspect):
                return (f"the latent shards in {where} were encoded in aspect buckets (resolution={used[0]}, "
                        f"buckets.step={used[1]}, buckets.max_aspect={used[2]}): train with data.buckets.enabled=true "
                        f"data.resolution={used[0]} data.buckets.step={used[1]} data.buckets.max_aspect={used[2]}")
    return None


def text_record(text_encoder: nn.Module, cond_stage: Any, text_dtype: str) -> Dict[str, Any]:
    """The ``dataset.json`` ``text_encoder`` entry (``data/text_embeddings.py``)."""
    return {**text_embeddings.encoder_identity(cond_stage), "width": int(text_encoder.output_dim),
            "pooled_dim": int(text_encoder.pooled_dim), "dtype": text_dtype,
            "weights_sha256": text_embeddings.weights_fingerprint(text_encoder),
            "members": {"context": "text" + ("_bf16" if text_dtype == "bfloat16" else "") + ".npy",
                        "pooled": "pooled" + ("_bf16" if text_dtype == "bfloat16" else "") + ".npy",
                        "null": text_embeddings.NULL_FILE}}


def finalize_latent_dataset(src_urls: Sequence[str] | str, out_url: str, model: nn.Module, resolution: int,
                            cfg: Optional[storage.StorageConfig] = None, *, text_encoder: Optional[nn.Module] = None,
                            text_cond_stage: Any = None, text_dtype: str = "float16",
                            buckets: Optional[Dict[str, Any]] = None, **info: Any) -> Dict[str, Any]:
    """Write ``sizes.json`` and ``dataset.json`` once every shard is complete (rank 0, after a
    barrier); with a text encoder also its record and the empty prompt's outputs (``null_text.npz``);
    with ``buckets`` (``{"step", "max_aspect", "sizes"}``) ``aspects.json`` and the bucket record."""
    urls = storage.expand_urls(src_urls, cfg)
    sizes, aspects = {}, {}
    for src in urls:
        name = src.rsplit("/", 1)[-1]
        stem = name[: -len(".tar")] if name.endswith(".tar") else name.split(".", 1)[0]
        stats_url = storage.join(out_url, stem + "_stats.json")
        if not storage.exists(stats_url, cfg):
            raise RuntimeError(f"latent shard for {storage.redact(src)} is not complete ({storage.redact(stats_url)} "
                               "missing): rerun precompute_latents, it resumes")
        stats = json.loads(storage.read_text(stats_url, cfg))
        sizes[stem + ".tar"] = int(stats["count"])
        if buckets is not None:
            if stats.get("buckets") != [list(b) for b in buckets["sizes"]]:
                raise RuntimeError(f"latent shard {storage.redact(storage.join(out_url, stem + '.tar'))} was encoded "
                                   f"with other buckets ({stats.get('buckets')}): delete it (and its _stats.json) and "
                                   "rerun with one buckets.* setting for the whole set")
            aspects[stem + ".tar"] = {int(k): int(v) for k, v in stats["aspects"].items()}
    write_sizes(out_url, sizes, cfg)
    if buckets is not None:
        write_aspects(out_url, aspects, cfg)
    f = int(getattr(model, "downsample_factor", 1))
    meta = {"kind": "latent", "source": list(urls), "resolution": resolution,
            "latent_shape": [int(getattr(model, "latent_channels", 0)), resolution // f, resolution // f],
            "num_samples": sum(sizes.values()), **info}
    if buckets is not None:
        meta["buckets"] = {**buckets, "sizes": [list(b) for b in buckets["sizes"]]}
    if text_encoder is not None:
        device = next(text_encoder.parameters()).device
        context, pooled = text_outputs(text_encoder, [""], device)
        storage.write_bytes(storage.join(out_url, text_embeddings.NULL_FILE),
                            text_embeddings.null_bytes(context[0], pooled[0]), cfg)
        meta["text_encoder"] = {**text_record(text_encoder, text_cond_stage, text_dtype),
                                "context_shape": list(context.shape[1:])}
    storage.write_text(storage.join(out_url, "dataset.json"), json.dumps(meta, indent=1), cfg)
    return meta
