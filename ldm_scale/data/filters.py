"""Per-sample checks before decoding: required members present, caption cleanup, metadata filters.

:func:`check_sample` returns the reason a raw sample is dropped (a metric name) or None. Reasons:
``missing_image`` / ``missing_latent`` / ``missing_text_embedding`` / ``missing_micro_conditioning`` / ``missing_caption`` / ``missing_label`` / ``bad_metadata``
(damaged data) and ``filter/<name>`` (the sample is fine but the config excludes it).
"""
from __future__ import annotations

import html
import json
import re
from typing import Dict, Optional

from ldm_scale.data.config import DataConfig, FilterConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
MICRO_MEMBER = "micro.json"  # bucketed latent shards: the crop's micro-conditioning (data/latents.py)
# The precomputed text members (ldm_scale/data/text_embeddings.py, which imports this module's config).
CONTEXT_MEMBERS = ("text.npy", "text_bf16.npy")

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Caption as the conditioner should see it: HTML entities unescaped, tags removed, whitespace
    collapsed, surrounding quotes and spaces stripped. Case and punctuation are kept."""
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def image_member(raw: Dict) -> Optional[str]:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return ext
    return None


def _first(meta: Dict, *names: str):
    for n in names:
        v = meta.get(n)
        if v is not None:
            return v
    return None


def metadata_reason(meta: Dict, f: FilterConfig, caption: Optional[str]) -> Optional[str]:
    """The first filter in ``f`` that ``meta`` fails, as ``filter/<name>``; None if it passes."""
    w = _first(meta, "original_width", "width")
    h = _first(meta, "original_height", "height")
    if f.min_width is not None and w is not None and float(w) < f.min_width:
        return "filter/min_width"
    if f.min_height is not None and h is not None and float(h) < f.min_height:
        return "filter/min_height"
    aesthetic = _first(meta, "aesthetic", "AESTHETIC_SCORE", "aesthetic_score")
    if f.min_aesthetic is not None and aesthetic is not None and float(aesthetic) < f.min_aesthetic:
        return "filter/min_aesthetic"
    punsafe = _first(meta, "punsafe", "pUnsafe")
    if f.max_punsafe is not None and punsafe is not None and float(punsafe) > f.max_punsafe:
        return "filter/max_punsafe"
    pwm = _first(meta, "pwatermark", "pWatermark")
    if f.max_pwatermark is not None and pwm is not None and float(pwm) > f.max_pwatermark:
        return "filter/max_pwatermark"
    sim = _first(meta, "similarity")
    if f.min_similarity is not None and sim is not None and float(sim) < f.min_similarity:
        return "filter/min_similarity"
    if caption is not None:
        if len(caption) < f.min_caption_length:
            return "filter/min_caption_length"
        if f.max_caption_length is not None and len(caption) > f.max_caption_length:
            return "filter/max_caption_length"
    return None


def check_sample(raw: Dict, cfg: DataConfig) -> Optional[str]:
    """Reason to drop ``raw`` (see module doc), or None. Sets ``raw["caption"]`` (cleaned),
    ``raw["label"]`` and ``raw["meta"]`` for samples that pass."""
    if cfg.input == "image" and image_member(raw) is None:
        return "missing_image"
    if cfg.input == "latent" and LATENT_EXT not in raw:
        return "missing_latent"
    if cfg.text_embeddings and not any(m in raw for m in CONTEXT_MEMBERS):
        return "missing_text_embedding"
    if cfg.input == "latent" and cfg.buckets.enabled and MICRO_MEMBER not in raw:
        return "missing_micro_conditioning"
    meta: Dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return "bad_metadata"
    caption = None
    if cfg.conditioning == "text":
        try:
            caption = clean_caption(raw["txt"].decode("utf-8")) if "txt" in raw else ""
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            return "missing_caption"
    elif cfg.conditioning == "class":
        try:
            raw["label"] = int(raw["cls"].decode("ascii").strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            return "missing_label"
    reason = metadata_reason(meta, cfg.filters, caption)
    if reason is None:
        raw["caption"] = caption
        raw["meta"] = meta
    return reason
