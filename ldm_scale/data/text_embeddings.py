"""Precomputed text conditioning: a frozen text encoder's outputs stored in the shards, so a training
step never runs the encoder (MosaicML report 1.4x cheaper steps with precomputed VAE + CLIP outputs;
MLPerf's Flux.1 recipe stores the text-encoder outputs and the empty-prompt embedding the same way).

Written by ``data_tools/precompute_latents.py text_encoder.kind=openclip ...`` beside each latent:

- ``<key>.text.npy``: the context tokens ``[L, D]`` (float16 or float32), or ``<key>.text_bf16.npy``
  (bfloat16, stored as its uint16 bit patterns: numpy has no bfloat16);
- ``<key>.pooled.npy`` / ``<key>.pooled_bf16.npy``: the pooled vector ``[P]`` (OpenCLIP's projected
  end-of-text state, what SD3 and SDXL feed as the global text vector);
- once per set, ``null_text.npz``: the empty prompt's ``context`` and ``pooled`` (float32), the
  condition that classifier-free-guidance dropout substitutes;
- ``dataset.json`` ``"text_encoder"``: the encoder's identity (:func:`encoder_identity`: kind, arch,
  layer, max_length, width, tokenizer, checkpoint file name and size) plus ``weights_sha256`` (the
  fingerprint of the weights that ran, :func:`weights_fingerprint`), the dtype and the shapes.

Training with ``data.text_embeddings=true`` checks the shards' identity against the experiment's
encoder twice: in ``validate()`` from the configuration (no weights read), and once the frozen
encoder is built on the host, by the weights' fingerprint; a mismatch stops before the first step.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ldm_scale import storage
from ldm_scale.data.filters import CONTEXT_MEMBERS
from ldm_scale.data.shards import read_dataset_card, shard_set_dirs

TEXT_DTYPES = ("float16", "bfloat16", "float32")
NULL_FILE = "null_text.npz"
POOLED_MEMBERS = ("pooled.npy", "pooled_bf16.npy")
# The identity fields compared between the shards and the experiment (weights_sha256 is compared
# once the encoder is built; the rest come from the configuration alone).
IDENTITY_FIELDS = ("kind", "arch", "layer", "max_length", "tokenizer", "checkpoint", "checkpoint_bytes")


def encoder_identity(cond_stage: Any) -> Dict[str, Any]:
    """What names a frozen text encoder, from its ``ConditionerConfig`` alone (nothing is loaded)."""
    if cond_stage.kind != "openclip":
        raise ValueError(f"cond_stage.kind={cond_stage.kind!r} has no precomputable outputs: only a frozen "
                         "encoder (openclip) can be precomputed; a jointly trained one changes every step")
    o = cond_stage.openclip
    path = o.pretrained
    return {"kind": "openclip", "arch": o.arch, "layer": o.layer, "max_length": int(o.max_length),
            "tokenizer": f"open_clip.get_tokenizer({o.arch!r})",
            "checkpoint": os.path.basename(path) if path else None,
            "checkpoint_bytes": os.path.getsize(path) if path and os.path.isfile(path) else None}


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes and float32 values, in name order): the same
    weights give the same digest whatever file or dtype they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def member_bytes(values: torch.Tensor, dtype: str, base: str) -> Tuple[str, bytes]:
    """``(member name, .npy bytes)`` for one sample's context (``base="text"``) or pooled vector."""
    if dtype not in TEXT_DTYPES:
        raise ValueError(f"text dtype {dtype!r}; expected one of {TEXT_DTYPES}")
    buf = io.BytesIO()
    if dtype == "bfloat16":
        bits = values.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.save(buf, bits)
        return f"{base}_bf16.npy", buf.getvalue()
    np.save(buf, values.detach().float().cpu().numpy().astype(dtype))
    return f"{base}.npy", buf.getvalue()


def decode_member(name: str, data: bytes) -> torch.Tensor:
    """The tensor of a ``text*.npy`` / ``pooled*.npy`` member, in its stored dtype."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if name.endswith("_bf16.npy"):
        if arr.dtype != np.uint16:
            raise ValueError(f"{name} holds {arr.dtype}; expected uint16 bfloat16 bit patterns")
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    if arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"{name} holds {arr.dtype}; expected float16 or float32")
    return torch.from_numpy(arr.copy())


def context_member(raw: Dict[str, Any]) -> Optional[str]:
    return next((m for m in CONTEXT_MEMBERS if m in raw), None)


def pooled_member(raw: Dict[str, Any]) -> Optional[str]:
    return next((m for m in POOLED_MEMBERS if m in raw), None)


def decode_into(raw: Dict[str, Any]) -> None:
    """Decode a raw sample's text members into ``raw["text_context"]`` (and ``"text_pooled"``);
    raises on bytes that do not decode (the readers count the sample as undecodable)."""
    name = context_member(raw)
    raw["text_context"] = decode_member(name, raw[name])
    pooled = pooled_member(raw)
    if pooled is not None:
        raw["text_pooled"] = decode_member(pooled, raw[pooled])


def collate_into(batch: Dict[str, Any], samples: List[Dict[str, Any]]) -> None:
    """``text_context`` [B, L, D] (and ``text_pooled`` [B, P] when every sample has one) of decoded
    samples; one shape per batch, since every sample of a set comes from one encoder (dataset.json)."""
    batch["text_context"] = torch.stack([s["text_context"] for s in samples])
    if all("text_pooled" in s for s in samples):
        batch["text_pooled"] = torch.stack([s["text_pooled"] for s in samples])


def null_bytes(context: torch.Tensor, pooled: Optional[torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    arrays = {"context": context.detach().float().cpu().numpy()}
    if pooled is not None:
        arrays["pooled"] = pooled.detach().float().cpu().numpy()
    np.savez(buf, **arrays)
    return buf.getvalue()


class TextEmbeddingError(ValueError):
    """Shards whose precomputed text embeddings are missing or made by another encoder."""


def read_text_record(urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> Tuple[Dict[str, Any], str]:
    """The ``text_encoder`` record all shard sets of ``data.urls`` share, and the first set's
    directory (where ``null_text.npz`` is); :class:`TextEmbeddingError` when a set has none or two
    sets were made by different encoders."""
    fix = ("encode them with data_tools/precompute_latents.py text_encoder.kind=openclip "
           "text_encoder.openclip.arch=<the experiment's> text_encoder.openclip.pretrained=<its file>, "
           "or set data.text_embeddings=false to run the encoder in the step")
    found: Optional[Tuple[str, Dict[str, Any]]] = None
    for shard_dir in shard_set_dirs(urls, cfg):
        card = read_dataset_card(shard_dir, cfg)
        record = (card or {}).get("text_encoder")
        if not isinstance(record, dict):
            raise TextEmbeddingError(f"data.text_embeddings=true but {storage.redact(shard_dir)} has no precomputed "
                                     f"text embeddings (no text_encoder record in its dataset.json): {fix}")
        if found is None:
            found = (shard_dir, record)
        elif _identity(record) != _identity(found[1]) or record.get("weights_sha256") != found[1].get("weights_sha256"):
            raise TextEmbeddingError(f"{storage.redact(shard_dir)} and {storage.redact(found[0])} hold text embeddings of "
                                     f"different encoders ({_differences(record, found[1])}): train on one encoder's "
                                     f"embeddings; {fix}")
    assert found is not None, "data.urls is validated non-empty"
    return found[1], found[0]


def _identity(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: record.get(k) for k in IDENTITY_FIELDS}


def _differences(found: Dict[str, Any], expected: Dict[str, Any], fields: Sequence[str] = IDENTITY_FIELDS) -> str:
    return ", ".join(f"{k}: shards {found.get(k)!r} vs {expected.get(k)!r}" for k in fields
                     if found.get(k) != expected.get(k))


def identity_problem(record: Dict[str, Any], cond_stage: Any, where: str) -> Optional[str]:
    """Why the shards' ``record`` was not made by the experiment's encoder (from the config), or None."""
    expected = encoder_identity(cond_stage)
    diff = _differences(record, expected)
    if not diff:
        return None
    return (f"data.text_embeddings=true but the embeddings in {storage.redact(where)} were made by another text "
            f"encoder than model.ldm.cond_stage ({diff}): re-run data_tools/precompute_latents.py with the "
            "experiment's encoder, or set data.text_embeddings=false")


def check_weights(record: Dict[str, Any], encoder: nn.Module, where: str) -> None:
    """Refuse when the built encoder's weights are not those the shards were encoded with."""
    digest = weights_fingerprint(encoder)
    if record.get("weights_sha256") != digest:
        raise TextEmbeddingError(
            f"data.text_embeddings=true but the text encoder's weights (sha256 {digest[:12]}) are not those that "
            f"encoded {storage.redact(where)} (sha256 {str(record.get('weights_sha256'))[:12]}): give "
            "model.ldm.cond_stage.openclip.pretrained the checkpoint the shards were made with, or re-run "
            "data_tools/precompute_latents.py")


def load_null(shard_dir: str, cfg: Optional[storage.StorageConfig] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The empty prompt's (context [L, D], pooled [P] or None), float32, from a set's ``null_text.npz``."""
    url = storage.join(shard_dir, NULL_FILE)
    with np.load(io.BytesIO(storage.read_bytes(url, cfg)), allow_pickle=False) as data:
        context = torch.from_numpy(data["context"].copy())
        pooled = torch.from_numpy(data["pooled"].copy()) if "pooled" in data.files else None
    return context, pooled


@dataclass
class PrecomputedText:
    """What a training run needs of precomputed shards: their encoder record, where it was read,
    and the empty prompt's outputs (float32, host) that condition dropout substitutes."""

    record: Dict[str, Any]
    where: str
    null_context: torch.Tensor  # [L, D]
    null_pooled: Optional[torch.Tensor]  # [P]

    @classmethod
    def load(cls, urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> "PrecomputedText":
        record, where = read_text_record(urls, cfg)
        context, pooled = load_null(where, cfg)
        return cls(record, where, context, pooled)

    def null(self, n: int) -> torch.Tensor:
        """The empty prompt's context for ``n`` samples ``[n, L, D]`` (a view, no copy)."""
        return self.null_context.unsqueeze(0).expand(n, -1, -1)
