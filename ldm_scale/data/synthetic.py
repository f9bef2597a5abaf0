"""A procedural LAION-shaped dataset and an analytic detector to score prompt adherence.

Each image is one coloured shape on a plain (slightly noisy, slightly shaded) background, captioned
e.g. "a red circle on a blue background". The vocabulary is deliberately small (5 colours x 3 shapes x
4 background colours = 60 prompts) so that a tiny LDM on CPU learns it in minutes, yet it exercises
everything the real pipeline does: JPEG decoding, varied original sizes and aspect ratios,
img2dataset-style json metadata (aesthetic score, punsafe, pwatermark, similarity, sha256, ...),
parquet and stats files, class-labelled (.cls) variants.

:func:`detect_attributes` recovers (shape colour, shape, background colour) from an image without any
learned weights, robust to the blur and noise of generated samples, so a training run can report
:func:`prompt_adherence` (fraction of the three attributes a generated image gets right) against
:data:`CHANCE_ADHERENCE`.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ldm_scale import storage
from ldm_scale.data.buckets import aspect_bin
from ldm_scale.data.shard_writer import write_aspects, write_shard, write_sizes
from ldm_scale.data.shards import read_dataset_card

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)
CLASS_NAMES: Tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)

# dataset.json's "generator": the identity of these shards, which the dataset-specific evaluation
# (the training loop's prompt-adherence score) checks before scoring with the detector below.
GENERATOR = "ldm_scale.data.synthetic"

# Expected fraction of attributes matched when image and caption are independent: each attribute is
# uniform over its vocabulary, so the chance of a match is 1/|vocabulary| for each of the three.
CHANCE_ADHERENCE: float = (1 / len(COLOURS) + 1 / len(SHAPES) + 1 / len(COLOURS)) / 3

_TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "a photo of a {fg} {shape} on a {bg} background",
    "{fg} {shape}, {bg} background",
    "A {fg} {shape} on a {bg} background.",
)


def class_index(colour: str, shape: str) -> int:
    """Class id of (shape colour, shape) for class-conditional shards (15 classes)."""
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    background: str


def render(attrs: Attributes, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 image of ``attrs``: shaded noisy background, one shape, size 35-60% of the
    short side, placed so that a centre crop of the image keeps the whole shape."""
    from PIL import Image, ImageDraw

    bg = np.array(COLOURS[attrs.background], dtype=np.float32)
    fg = tuple(int(v) for v in np.clip(np.array(COLOURS[attrs.colour]) + rng.normal(0, 8, 3), 0, 255))
    # A gentle linear shade makes backgrounds less trivial without changing their colour class.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.normal(size=2)
    shade = (direction[0] * yy / height + direction[1] * xx / width) * 12.0
    img = bg[None, None, :] + shade[..., None] + rng.normal(0, 4, (height, width, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    short = min(width, height)
    size = int(short * rng.uniform(0.35, 0.6))
    cx = width / 2 + rng.uniform(-1, 1) * (short - size) / 4
    cy = height / 2 + rng.uniform(-1, 1) * (short - size) / 4
    x0, y0, x1, y1 = cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2
    draw = ImageDraw.Draw(pil)
    if attrs.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fg)
    elif attrs.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fg)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fg)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}; expected one of {SHAPES}")
    return np.asarray(pil)


def random_attributes(rng: np.random.Generator) -> Attributes:
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    others = [c for c in COLOUR_NAMES if c != colour]
    return Attributes(colour, SHAPES[rng.integers(len(SHAPES))], others[rng.integers(len(others))])


def make_sample(seed: int, index: int, *, min_size: int = 48, max_size: int = 96, jpeg_quality: int = 90,
                max_aspect: Optional[float] = None) -> Tuple[Attributes, str, bytes, Dict]:
    """Sample ``index`` of the dataset with ``seed``: (attributes, caption, jpeg bytes, metadata).

    Sizes: the width is uniform in [min_size, max_size]; the height is the width times a ratio in
    [0.75, 1.33] clipped to the same range (the default, which the recorded quickstart figures
    used), or, with ``max_aspect``, times a log-uniform ratio in [1/max_aspect, max_aspect], unclipped
    (wide and tall images for aspect-ratio buckets)."""
    rng = np.random.default_rng([seed, index])
    attrs = random_attributes(rng)
    width = int(rng.integers(min_size, max_size + 1))
    if max_aspect is None:
        height = int(np.clip(width * rng.uniform(0.75, 1.33), min_size, max_size))
    else:
        log_ratio = float(np.log(max_aspect))
        height = max(8, int(round(width * float(np.exp(rng.uniform(-log_ratio, log_ratio))))))
    pixels = render(attrs, width, height, rng)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=jpeg_quality)
    jpg = out.getvalue()
    caption = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(fg=attrs.colour, shape=attrs.shape,
                                                               bg=attrs.background)
    meta = {
        "url": f"https://synthetic.ldm-scale.invalid/{seed}/{index}.jpg",
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": None,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "similarity": round(float(rng.uniform(0.26, 0.4)), 4),
        "aesthetic": round(float(np.clip(rng.normal(5.5, 0.8), 1, 10)), 3),
        "punsafe": round(float(rng.beta(0.5, 20)), 5),
        "pwatermark": round(float(rng.beta(0.7, 6)), 5),
        "NSFW": "UNLIKELY",
        "LICENSE": "?",
    }
    return attrs, caption, jpg, meta


def write_synthetic_dataset(
    url: str,
    *,
    num_samples: int = 256,
    samples_per_shard: int = 32,
    seed: int = 0,
    min_size: int = 48,
    max_size: int = 96,
    labels: str = "text",
    jpeg_quality: int = 90,
    max_aspect: Optional[float] = None,
    cfg: Optional[storage.StorageConfig] = None,
) -> List[str]:
    """Write a deterministic synthetic dataset to ``url`` (any storage URL); returns the shard URLs.

    ``labels``: ``"text"`` writes ``.txt`` captions, ``"class"`` writes ``.cls`` class ids (see
    :data:`CLASS_NAMES`), ``"both"`` writes both. Every shard also has ``.json`` metadata per sample,
    ``.parquet`` and ``_stats.json``; ``sizes.json``, ``aspects.json`` and ``dataset.json`` describe the
    whole set.
    ``max_aspect``: see :func:`make_sample` (None: the near-square default).
    """
    if max_aspect is not None and max_aspect < 1:
        raise ValueError(f"max_aspect={max_aspect} must be >= 1 (the widest width/height or height/width)")
    if labels not in ("text", "class", "both"):
        raise ValueError(f"labels={labels!r}; expected 'text', 'class' or 'both'")
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be positive")
    shard_urls, sizes, aspects = [], {}, {}
    num_shards = -(-num_samples // samples_per_shard)
    for shard in range(num_shards):
        samples, rows, histogram = [], [], {}
        for i in range(samples_per_shard):
            index = shard * samples_per_shard + i
            if index >= num_samples:
                break
            attrs, caption, jpg, meta = make_sample(seed, index, min_size=min_size, max_size=max_size,
                                                    jpeg_quality=jpeg_quality, max_aspect=max_aspect)
            key = f"{shard:05d}{i:04d}"
            meta = dict(meta, key=key, shard_id=shard)
            sample = {"__key__": key, "jpg": jpg, "json": meta}
            if labels in ("text", "both"):
                sample["txt"] = caption
            if labels in ("class", "both"):
                sample["cls"] = class_index(attrs.colour, attrs.shape)
            samples.append(sample)
            rows.append({k: v for k, v in meta.items() if k != "exif"})
            b = aspect_bin(meta["width"], meta["height"])
            histogram[b] = histogram.get(b, 0) + 1
        tar_url = write_shard(url, shard, samples, parquet_rows=rows, cfg=cfg)
        shard_urls.append(tar_url)
        sizes[tar_url.rsplit("/", 1)[-1]] = len(samples)
        aspects[tar_url.rsplit("/", 1)[-1]] = histogram
    write_sizes(url, sizes, cfg)
    write_aspects(url, aspects, cfg)
    import json

    storage.write_text(storage.join(url, "dataset.json"), json.dumps({
        "generator": GENERATOR, "seed": seed, "num_samples": num_samples,
        "samples_per_shard": samples_per_shard, "labels": labels, "max_aspect": max_aspect, "colours": list(COLOUR_NAMES),
        "shapes": list(SHAPES), "class_names": list(CLASS_NAMES),
        "shards": f"{url.rstrip('/')}/{{{0:05d}..{num_shards - 1:05d}}}.tar",
    }, indent=1), cfg)
    return shard_urls


def not_synthetic_reason(urls: Sequence[str], cfg: Optional[storage.StorageConfig] = None) -> Optional[str]:
    """None when every shard set in ``urls`` (``data.urls`` entries) is this synthetic dataset, else
    why not, naming the set: the scores of this module mean something only on it.

    A set is this dataset when its directory's ``dataset.json`` (written by
    :func:`write_synthetic_dataset`) names :data:`GENERATOR`, or when it is a latent set
    (``data_tools/precompute_latents.py``, ``"kind": "latent"``) encoded from such a set.
    """
    for entry in urls:
        dirs = dict.fromkeys(storage.parent(u) for u in storage.expand_urls(entry, cfg))
        for shard_dir in dirs:
            card = read_dataset_card(shard_dir, cfg)
            if card is not None and card.get("kind") == "latent" and card.get("source"):
                source = storage.parent(list(card["source"])[0])
                card = read_dataset_card(source, cfg)
                shard_dir = f"{shard_dir} (latents of {source})"
            if card is None:
                return f"{storage.redact(shard_dir)} has no dataset.json from {GENERATOR}"
            if card.get("generator") != GENERATOR:
                return (f"{storage.redact(shard_dir)}/dataset.json names generator {card.get('generator')!r}, "
                        f"not {GENERATOR!r}")
    return None


# ---------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)


def _to_uint8_hwc(image) -> np.ndarray:
    """Accept a PIL image, an HxWx3 uint8 array, or a [3,H,W] float tensor/array in [-1, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip((arr.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    return arr


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    d = ((pixels[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def _template_masks(h: int, w: int, cy: float, cx: float, sy: float, sx: float) -> Dict[str, np.ndarray]:
    """Ideal shapes with the given centroid and standard deviations (moment matching):
    square side = sigma*sqrt(12), circle radius = 2*sigma, upright triangle base = sigma_x*sqrt(24),
    height = sigma_y*sqrt(18) with its centroid one third of the height above the base."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    s = (sx + sy) / 2
    half = s * np.sqrt(12) / 2
    square = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= (2 * s) ** 2
    base, height = sx * np.sqrt(24), sy * np.sqrt(18)
    top = cy - 2 * height / 3
    frac = np.clip((yy - top) / max(height, 1e-6), 0, None)  # 0 at apex, 1 at base
    triangle = (yy >= top) & (yy <= top + height) & (np.abs(xx - cx) <= frac * base / 2)
    return {"circle": circle, "square": square, "triangle": triangle}


def detect_attributes(image) -> Optional[Attributes]:
    """(shape colour, shape, background colour) of a synthetic-style image, or None if no shape.

    Background = palette colour nearest the border pixels' median; shape colour = most frequent
    palette label among non-background pixels; shape = the ideal circle / square / triangle with the
    same centroid and second moments as the largest connected blob of that colour that overlaps it
    best (IoU). A 3x3 median filter first removes sampling noise.
    """
    from scipy import ndimage

    arr = _to_uint8_hwc(image).astype(np.float32)
    arr = ndimage.median_filter(arr, size=(3, 3, 1))
    h, w, _ = arr.shape
    b = max(1, min(h, w) // 16)
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                             arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    bg_idx = int(_nearest_colour(np.median(border, axis=0, keepdims=True))[0])
    labels = _nearest_colour(arr.reshape(-1, 3)).reshape(h, w)
    counts = np.bincount(labels[labels != bg_idx].ravel(), minlength=len(COLOUR_NAMES))
    if counts.sum() < max(4, h * w // 200):
        return None
    fg_idx = int(counts.argmax())
    blobs, n = ndimage.label(labels == fg_idx)
    if n == 0:
        return None
    mask = blobs == (np.bincount(blobs.ravel())[1:].argmax() + 1)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    sy, sx = max(ys.std(), 0.5), max(xs.std(), 0.5)
    best, best_iou = SHAPES[0], -1.0
    for name, tmpl in _template_masks(h, w, cy, cx, sy, sx).items():
        iou = (tmpl & mask).sum() / max((tmpl | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = name, iou
    return Attributes(COLOUR_NAMES[fg_idx], best, COLOUR_NAMES[bg_idx])


_CAPTION_RE = re.compile(r"\b(?P<fg>%s)\s+(?P<shape>%s)\b.*?\b(?P<bg>%s)\s+background" % (
    "|".join(COLOUR_NAMES), "|".join(SHAPES), "|".join(COLOUR_NAMES)), re.IGNORECASE)


def parse_caption(caption: str) -> Attributes:
    """Attributes named by a synthetic caption ("a red circle on a blue background")."""
    m = _CAPTION_RE.search(caption)
    if not m:
        raise ValueError(f"caption {caption!r} does not name '<colour> <shape> ... <colour> background' "
                         f"with colours {COLOUR_NAMES} and shapes {SHAPES}")
    return Attributes(m.group("fg").lower(), m.group("shape").lower(), m.group("bg").lower())


def prompt_adherence(images: Union[Sequence, "np.ndarray"], captions: Sequence[str]) -> float:
    """Fraction of (shape colour, shape, background colour) attributes that the detected content of
    ``images`` matches in ``captions`` (1.0 = perfect; :data:`CHANCE_ADHERENCE` for unrelated pairs).
    ``images``: a [B,3,H,W] tensor in [-1, 1], or a sequence of PIL images / HxWx3 uint8 arrays."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("prompt_adherence needs at least one image")
    matched = 0
    for image, caption in zip(images, captions):
        want = parse_caption(caption)
        got = detect_attributes(image)
        if got is not None:
            matched += (got.colour == want.colour) + (got.shape == want.shape) + (got.background == want.background)
    return matched / (3 * len(captions))
