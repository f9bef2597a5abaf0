"""Configuration of the shard pipeline (an OmegaConf-compatible structured config; no hydra here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm_scale.choices import Choice
from ldm_scale.storage import StorageOverrides


class ShardMode(Choice):
    """``data.mode``: every shard once per epoch, or shards drawn with replacement (a weighted mixture)."""

    epoch = "epoch"
    resampled = "resampled"


class DataInput(Choice):
    """``data.input``: images (jpg/png/webp members) or pre-encoded latents (``.latent.npy`` members)."""

    image = "image"
    latent = "latent"


# `class` is a Python keyword, so the members are declared through the functional API (name = value).
Conditioning = Choice("Conditioning", [(v, v) for v in ("text", "class", "none")], module=__name__,
                      qualname="Conditioning")
Conditioning.__doc__ = "Which label a sample carries: ``.txt`` captions, ``.cls`` class labels, or none."


class Crop(Choice):
    """``data.crop``: center or random square crop after the shorter-side resize."""

    center = "center"
    random = "random"


class Decoder(Choice):
    """``data.decoder``: auto (PIL with DCT-domain downscaling for JPEG) | pil (full decode)."""

    auto = "auto"
    pil = "pil"


@dataclass
class FilterConfig:
    """Metadata filters applied to each sample's ``.json`` before decoding (None = off).

    Sizes are the original image size (``original_width``/``original_height``, falling back to
    ``width``/``height``), as LAION filters are. A filter whose field is absent from a sample's
    metadata lets the sample through: synthetic or class datasets have no aesthetic score.
    """

    min_width: Optional[int] = None
    min_height: Optional[int] = None
    min_aesthetic: Optional[float] = None  # "aesthetic" / "AESTHETIC_SCORE"
    max_punsafe: Optional[float] = None
    max_pwatermark: Optional[float] = None
    min_similarity: Optional[float] = None
    min_caption_length: int = 0  # characters after cleanup
    max_caption_length: Optional[int] = None


@dataclass
class BucketConfig:
    """``data.buckets``: aspect-ratio buckets (``data/buckets.py``). Off: every image is resized and
    cropped to a ``data.resolution`` square. On: the bucket set has about ``data.resolution**2``
    pixels per image, sides in multiples of ``step``, aspect ratios up to ``max_aspect``; each batch
    holds one bucket, the same on every rank at every step; batches carry SDXL's micro-conditioning
    (``original_size``, ``crop_top_left``, ``target_size``). Needs ``aspects.json`` next to the
    shards (written by make_synthetic and inspect_shards; for latent shards by precompute_latents
    with the same ``buckets.*``, whose latents already have their bucket's shape)."""

    enabled: bool = False
    step: int = 64  # pixels; a multiple of the first stage's downsampling x the denoiser's
    max_aspect: float = 2.0
    # Undecoded samples a data worker may hold in its bucket queues (a web JPEG is ~30-100 KB);
    # beyond it a bucket its shards are short of borrows its nearest bucket's samples, cropped to
    # size (metric bucket_borrowed). The queues' spread grows like sqrt(samples per worker).
    queue_limit: int = 4096

    def validate(self, resolution: int, prefix: str = "data.buckets", resolution_key: str = "data.resolution") -> None:
        if not self.enabled:
            return
        if self.step < 8 or resolution % self.step:
            raise ValueError(f"{prefix}.step={self.step} must be >= 8 and divide {resolution_key}={resolution}")
        if self.max_aspect < 1:
            raise ValueError(f"{prefix}.max_aspect={self.max_aspect} must be >= 1")
        if self.queue_limit < 1:
            raise ValueError(f"{prefix}.queue_limit={self.queue_limit} must be >= 1")


@dataclass
class DataConfig:
    """Where shards are and how samples become batches.

    ``urls``: one entry per dataset; each entry is a brace pattern (``s3://b/laion/{00000..41407}.tar``),
    a ``::``-separated list, or a glob. ``mode="epoch"`` visits every shard once per epoch in an order
    fixed by (seed, epoch); ``mode="resampled"`` draws shards with replacement, dataset ``i`` with
    probability ``weights[i]`` (a weighted mixture), for ``samples_per_epoch`` samples per epoch.
    """

    urls: List[str] = field(default_factory=list)
    mode: ShardMode = "epoch"
    weights: List[float] = field(default_factory=list)  # resampled mode: one per urls entry (default equal)
    samples_per_epoch: Optional[int] = None  # default: total of sizes.json / _stats.json counts
    input: DataInput = "image"
    conditioning: Conditioning = "text"  # type: ignore[valid-type]
    # Read the frozen text encoder's outputs from the shards (``<key>.text.npy`` and ``pooled.npy``,
    # written by data_tools/precompute_latents.py text_encoder.kind=...): batches carry
    # ``text_context`` [B, L, D] (and ``text_pooled`` [B, P]) and the step never runs the encoder.
    text_embeddings: bool = False
    resolution: int = 256
    crop: Crop = "center"
    flip: bool = False  # random horizontal flip (p=0.5)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    decoder: Decoder = "auto"
    filters: FilterConfig = field(default_factory=FilterConfig)
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling
    shards_per_block: int = 2  # shards read interleaved by one worker; the buffer drains at block ends
    prefetch_factor: int = 2
    pin_memory: bool = False
    # How data workers start. None: "forkserver" once this process has initialised CUDA (a forked
    # child of a process holding a CUDA context, NCCL communicators and their threads can deadlock
    # or crash), else the platform default ("fork" on Linux: the cheapest start).
    multiprocessing_context: Optional[str] = None
    # Keep the data workers across epochs (started once per run; they prefetch the next epoch's
    # first batches while this one ends). False: start them anew each epoch.
    persistent_workers: bool = True
    # Overrides of the top-level ``storage`` block for the shards only; every field defaults to
    # None = inherit ``storage.*`` (see ``ldm_scale.storage.resolve``).
    storage: StorageOverrides = field(default_factory=StorageOverrides)

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        if not self.urls:
            raise ValueError("data.urls is empty: give at least one shard pattern, e.g. 's3://bucket/set/{00000..00099}.tar'")
        if self.mode not in ("epoch", "resampled"):
            raise ValueError(f"data.mode={self.mode!r}; expected 'epoch' or 'resampled'")
        if self.weights:
            if len(self.weights) != len(self.urls):
                raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.urls)} urls entries")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("data.weights must be non-negative with a positive sum")
            if self.mode == "epoch" and len(set(self.weights)) > 1:
                raise ValueError("unequal data.weights need data.mode=resampled (epoch mode visits every shard once)")
        if self.input not in ("image", "latent"):
            raise ValueError(f"data.input={self.input!r}; expected 'image' or 'latent'")
        if self.conditioning not in ("text", "class", "none"):
            raise ValueError(f"data.conditioning={self.conditioning!r}; expected 'text', 'class' or 'none'")
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop={self.crop!r}; expected 'center' or 'random'")
        if self.decoder not in ("auto", "pil"):
            raise ValueError(f"data.decoder={self.decoder!r}; expected 'auto' or 'pil'")
        if self.text_embeddings and self.conditioning != "text":
            raise ValueError(f"data.text_embeddings=true needs data.conditioning=text (got {self.conditioning!r}): "
                             "precomputed embeddings are of captions")
        if self.resolution <= 0:
            raise ValueError("data.resolution must be positive")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.shards_per_block < 1:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0, data.shards_per_block >= 1")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ValueError("data.samples_per_epoch must be positive")
        self.buckets.validate(self.resolution)


def worker_start_method(configured: Optional[str]) -> Optional[str]:
    """The DataLoader ``multiprocessing_context`` for ``data.multiprocessing_context`` (see there)."""
    if configured is not None:
        return configured
    import torch

    return "forkserver" if torch.cuda.is_available() and torch.cuda.is_initialized() else None
