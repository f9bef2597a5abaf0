"""Typed configs of the data tools (``data_tools/*.py``): the schemas of ``conf/commands/<tool>.yaml``.

Each tool is a Hydra command like ``eval/fid.py`` (``ldm_scale.cli.compose_command``): its arguments
are overrides (``out=s3://bucket/shapes num_samples=4096 storage.endpoint_url=http://...``), a
misspelt key, a wrong type or a bad choice fails at compose time with one line, and ``check()`` says
what is missing before any shard is read or written. Every tool has the training run's ``storage``
block; shard inputs are the ``data`` key of :class:`ShardInput`, as in
``data_tools/reference_stats.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm_scale.choices import Choice
from ldm_scale.data.caption_vocab import MAX_TOKENS, MAX_UNSEEN
from ldm_scale.data.config import BucketConfig
from ldm_scale.data.download import DownloadConfig
from ldm_scale.models.conditioners import ConditionerConfig
from ldm_scale.storage import URL_LIST_SEPARATOR, StorageConfig, is_local


@dataclass
class ShardInput:
    """``data``: the input shards of a command, one pattern (brace / glob / list file) or several
    joined by ``::``: ``data='s3://b/laion/{00000..00099}.tar::s3://b/extra/*.tar'``."""

    data: Optional[str] = None

    def shard_patterns(self) -> List[str]:
        return [u for u in (self.data or "").split(URL_LIST_SEPARATOR) if u]

    def require_data(self) -> None:
        if not self.shard_patterns():
            raise ValueError("data= is required: shard URLs, e.g. data='s3://bucket/set/{00000..00099}.tar'")


def _require_out(out: Optional[str], example: str) -> None:
    if not out:
        raise ValueError(f"out= is required: {example}")


# text: .txt captions; class: .cls class ids; both. Functional form: a member cannot be named
# `class` in a class body, and OmegaConf matches members by name, so the name must be the value.
SyntheticLabels = Choice("SyntheticLabels", [(v, v) for v in ("text", "class", "both")],  # type: ignore[misc]
                         module=__name__, qualname="SyntheticLabels")


@dataclass
class MakeSyntheticConfig:
    """``python data_tools/make_synthetic.py out=data/shapes num_samples=4096 [labels=class]``."""

    out: Optional[str] = None  # output directory or URL (local, s3://, gs://)
    num_samples: int = 2048
    samples_per_shard: int = 256
    seed: int = 0
    min_size: int = 48  # smallest original image side (px)
    max_size: int = 96  # largest original image side (px)
    # Widest width/height (and height/width) ratio, log-uniform (aspect-ratio buckets); null: the
    # near-square default (0.75-1.33, sides clipped to [min_size, max_size]).
    max_aspect: Optional[float] = None
    labels: SyntheticLabels = "text"  # type: ignore[assignment]
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        _require_out(self.out, "a directory or URL for the shards, e.g. out=data/shapes")
        if self.num_samples < 1 or self.samples_per_shard < 1:
            raise ValueError(f"num_samples and samples_per_shard must be >= 1, got {self.num_samples} and "
                             f"{self.samples_per_shard}")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"need 8 <= min_size <= max_size, got min_size={self.min_size} max_size={self.max_size}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect={self.max_aspect} must be >= 1 (e.g. max_aspect=3 for 1:3 to 3:1), or null")


@dataclass
class DownloadCommandConfig(DownloadConfig):
    """``python data_tools/download.py parquet=laion_part0.parquet out=s3://bucket/laion image_size=512``;
    the img2dataset settings are :class:`~ldm_scale.data.download.DownloadConfig`'s fields."""

    parquet: Optional[str] = None  # url / caption / metadata columns (path or URL)
    out: Optional[str] = None  # output directory or URL (local or s3://)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        if not self.parquet:
            raise ValueError("parquet= is required: a parquet with url and caption columns, e.g. parquet=part0.parquet")
        _require_out(self.out, "a directory or URL for the shards, e.g. out=data/mine")
        if self.image_size < 1 or self.samples_per_shard < 1 or self.processes < 1 or self.threads < 1:
            raise ValueError("image_size, samples_per_shard, processes and threads must be >= 1")
        self.extra_column_choice()  # all, none or names: a bad value fails here, before any download


@dataclass
class InspectShardsConfig(ShardInput):
    """``python data_tools/inspect_shards.py data='s3://bucket/laion/{00000..41407}.tar' report=r.json``."""

    report: Optional[str] = None  # write the full report JSON here (path or URL)
    threads: int = 8
    write_sizes: bool = True  # sizes.json next to the shards
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        self.require_data()


@dataclass
class BuildVocabConfig(ShardInput):
    """``python data_tools/build_vocab.py data='data/mine/*.tar' out=data/mine_vocab.txt``."""

    out: Optional[str] = None  # vocab.txt to write (a local path: the tokenizer opens it)
    max_tokens: int = MAX_TOKENS  # largest vocabulary (special tokens included) = the embedding rows it needs
    max_unseen: float = MAX_UNSEEN  # largest Good-Turing probability that a new caption's word is unknown
    max_samples: Optional[int] = None  # read at most this many captions
    cased: bool = False  # keep case (then set tokenizer.lowercase=false too)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        self.require_data()
        _require_out(self.out, "the vocab.txt to write, e.g. out=data/mine_vocab.txt")
        if not is_local(self.out):
            raise ValueError(f"out={self.out}: the tokenizer reads a local file; give a local path")
        if self.max_tokens < 5 or not 0.0 <= self.max_unseen <= 1.0:
            raise ValueError(f"need max_tokens >= 5 and 0 <= max_unseen <= 1, got {self.max_tokens} and "
                             f"{self.max_unseen}")


class LatentDtype(Choice):
    float16 = "float16"
    float32 = "float32"


class TextDtype(Choice):
    """Storage dtype of precomputed text embeddings (``data/text_embeddings.py``)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def _no_text_encoder() -> ConditionerConfig:
    return ConditionerConfig(kind="none")


@dataclass
class PrecomputeLatentsConfig(ShardInput):
    """``torchrun ... data_tools/precompute_latents.py data='s3://b/laion/{00000..41407}.tar'
    out=s3://b/laion_kl8_256 ckpt=s3://b/ae/kl_f8.pt resolution=256``."""

    out: Optional[str] = None  # output directory or URL for the latent shards
    ckpt: Optional[str] = None  # exported autoencoder (ldm_scale/autoencoder-v1)
    # A registry name (ldm_scale.models.AUTOENCODERS): the architecture instead of the export's own, or,
    # without ckpt, random weights (tests). Not `autoencoder=`: that is the training tree's config
    # group in Hydra's ConfigStore, which every command's composition sees.
    architecture: Optional[str] = None
    resolution: Optional[int] = None  # image side the shards are resized / cropped to before encoding
    batch_size: int = 32
    dtype: LatentDtype = "float16"  # type: ignore[assignment]
    # Also store a frozen text encoder's outputs per caption (kind=openclip, with the training
    # experiment's model.ldm.cond_stage.openclip fields), for data.text_embeddings=true.
    text_encoder: ConditionerConfig = field(default_factory=_no_text_encoder)
    text_dtype: TextDtype = "float16"  # type: ignore[assignment]
    # Aspect-ratio buckets of about resolution^2 pixels: each image is encoded at its bucket's size
    # (train on the result with the same data.resolution and data.buckets.*).
    buckets: BucketConfig = field(default_factory=BucketConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        from ldm_scale.models import AUTOENCODERS

        if self.text_encoder.kind not in ("none", "openclip"):
            raise ValueError(f"text_encoder.kind={self.text_encoder.kind!r}: only a frozen encoder can be precomputed "
                             "(openclip); the paper's text transformer (kind=text) is trained with the UNet, so its "
                             "outputs change every step: leave text_encoder.kind=none")

        self.require_data()
        _require_out(self.out, "a directory or URL for the latent shards, e.g. out=data/mine_latents")
        if self.ckpt is None and self.architecture is None:
            raise ValueError("ckpt= is required: an exported autoencoder, e.g. ckpt=runs/checkpoints/ae/export.pt "
                             "(or architecture=<registry name> for a randomly initialised test encoder)")
        if self.architecture is not None and self.architecture not in AUTOENCODERS:
            raise ValueError(f"architecture={self.architecture!r} is not a registered autoencoder; choose one of "
                             f"{sorted(AUTOENCODERS)}")
        if self.resolution is None or self.resolution < 8:
            raise ValueError(f"resolution= is required (the image side to encode, e.g. resolution=256), got "
                             f"{self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.buckets.validate(self.resolution, prefix="buckets", resolution_key="resolution")
