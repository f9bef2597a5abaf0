"""Typed configs of the evaluation commands (``eval/fid.py``, ``data_tools/reference_stats.py``).

The schemas of ``conf/commands/fid.yaml`` and ``conf/commands/reference_stats.yaml``, composed by
``ldm_scale.cli.compose_command`` with the shared groups ``sampler/``, ``extractor/``, ``metrics/``
and ``preset/``, so a misspelt key, a wrong type or a bad choice fails before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm_scale.cli import compose_command
from ldm_scale.config import LoggerConfig
from ldm_scale.data.commands import ShardInput
from ldm_scale.data.config import Conditioning
from ldm_scale.diffusion import SamplerConfig
from ldm_scale.evaluation.preprocess import Resize
from ldm_scale.sampling.checkpoints import CheckpointSource
from ldm_scale.storage import StorageConfig


@dataclass
class ExtractorConfig:
    """Which feature extractor (``features.get_extractor``) and how images reach it.

    ``name="auto"`` uses the pinned FID Inception when its weights are on this machine (explicit
    ``weights``, ``$LDM_SCALE_FID_WEIGHTS`` or the torch hub cache) and otherwise falls back, with a
    warning, to ``random-inception`` (recorded as NOT comparable). ``inception`` never falls back.
    """

    # auto | inception | random-inception | clip:<arch>[@<pretrained>] | dinov2:<arch>[@random]
    name: str = "auto"
    # path or URL of the weights file (pt_inception-2015-12-05-6726825d.pth, dinov2_vitl14_pretrain.pth)
    weights: Optional[str] = None
    # None: the extractor's pinned digest (Inception: FID_WEIGHTS_SHA256; DINOv2: none published, so
    # the digest of the file used is recorded with the results); a digest (or >= 8 hex digits) pins it.
    sha256: Optional[str] = None
    allow_download: bool = True  # published weights (inception, dinov2:*); "auto" never downloads
    resize: Resize = "pil_bicubic"  # see preprocess.py
    seed: int = 0  # random-weight extractors
    input_size: Optional[int] = None  # random-inception only: a smaller input for CPU smoke runs
    batch_size: int = 50


@dataclass
class MetricsConfig:
    fid: bool = True
    inception_score: bool = True  # needs an extractor with logits (Inception)
    precision_recall: bool = True
    kid: bool = False
    sfid: bool = False  # needs spatial features (Inception) in the generated and the reference set
    clip_score: bool = False  # text-conditional models only
    clip_model: str = "clip:ViT-B-32@openai"  # "clip:ViT-B-32" = random weights (offline smoke runs)
    is_splits: int = 10
    # Split in sample order (the original TF code, ADM) or after torch-fidelity's seeded shuffle
    # (its default); results.json records which, in metric_settings.
    is_shuffle: bool = False
    pr_k: int = 3
    pr_batch_size: int = 10000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    # Density and coverage (Naeem et al. 2020) on the extractor's features, k-NN balls of the reference.
    density_coverage: bool = False
    dc_k: int = 5
    # CMMD (Jayasumana et al. 2024): RBF-kernel MMD on CLIP embeddings; needs a clip: extractor
    # (the paper's: extractor.name=clip:ViT-L-14-336@openai, conf/commands/metrics/cmmd.yaml).
    cmmd: bool = False


@dataclass
class FIDEvalConfig(CheckpointSource):
    """``python eval/fid.py ckpt=... ref=... n_samples=50000 sampler.steps=200 sampler.guidance_scale=1.5``.

    The checkpoint block (``ckpt``, ``use_ema``, ``precision``, ...) is the one ``launch/sample.py``
    has; ``sampler`` is the training run's ``eval.sampler`` (``conf/commands/sampler/``)."""

    quickstart_dir: str = "quickstart"  # launch/quickstart.py --workdir (preset=quickstart)
    ref: Optional[str] = None  # reference .npz (ours or ADM's) or shard URLs to compute it from
    ref_n_samples: int = 50000  # when `ref` is shards: images in mu/sigma (at most: all if the set is smaller)
    ref_keep_images: int = 10000  # when `ref` is shards: images kept in arr_0 (precision/recall)
    ref_out: Optional[str] = None  # when `ref` is shards: where to store it (default: next to the data)
    ref_resolution: Optional[int] = None  # when `ref` is shards: default the model's image size
    prompts: Optional[str] = None  # text file (one prompt / label per line) or shards; default: the reference's
    out: Optional[str] = None  # run directory for samples, features, result JSON (default ./eval_runs/<tag>)
    n_samples: int = 50000
    batch_size: int = 16  # samples per chunk (one sampler call)
    # Sample size (e.g. one aspect bucket of a bucketed model); default: the flavour's training size.
    # The extractor resizes every sample to its own square input, as for the reference.
    H: Optional[int] = None
    W: Optional[int] = None
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=200, guidance_scale=1.0))
    seed: int = 0
    write_adm_npz: bool = False  # also write samples as one ADM-style arr_0 .npz
    keep_samples: bool = True
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # A guidance sweep (evaluation/sweep.py): one evaluation per scale, each of n_samples, under
    # <out>/scale_<s>/, and the FID-vs-CLIP-score curve (sweep.png, sweep.md, sweep.json) in <out>;
    # sampler.guidance_scale is then unused. [] = one evaluation.
    guidance_scales: List[float] = field(default_factory=list)
    # W&B on rank 0 (ldm_scale.logging); "auto" is offline unless an API key is configured.
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(project="ldm_scale", tags=["eval"]))
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        """What the settings alone decide, before the Inception weights or the checkpoint are read."""
        self.sampler.validate()
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError(f"n_samples and batch_size must be >= 1, got {self.n_samples} and {self.batch_size}")
        if any(g < 0 for g in self.guidance_scales) or len(set(self.guidance_scales)) != len(self.guidance_scales):
            raise ValueError(f"guidance_scales={list(self.guidance_scales)}: give distinct scales >= 0, e.g. [1.5,3,5,8]")
        inception_only = [k for k in ("inception_score", "sfid") if getattr(self.metrics, k)]
        if inception_only and not _is_inception_family(self.extractor.name):
            raise ValueError(f"metrics.{'/'.join(inception_only)} need Inception logits/spatial features but "
                             f"extractor.name={self.extractor.name!r}: set "
                             + " ".join(f"metrics.{k}=false" for k in inception_only)
                             + " (metrics=fd_dinov2 for FD-DINOv2), or an Inception extractor")
        if self.metrics.cmmd and not self.extractor.name.startswith("clip:"):
            raise ValueError(f"metrics.cmmd=true needs CLIP embeddings but extractor.name={self.extractor.name!r}: set "
                             "extractor.name=clip:ViT-L-14-336@openai (the paper's model), or metrics.cmmd=false")
        if self.metrics.density_coverage and self.metrics.dc_k < 1:
            raise ValueError(f"metrics.dc_k={self.metrics.dc_k} must be >= 1")
        if self.metrics.kid and self.metrics.kid_subset_size > self.n_samples:
            raise ValueError(f"metrics.kid_subset_size={self.metrics.kid_subset_size} > n_samples={self.n_samples}: "
                             f"KID subsets are drawn from the generated samples; set metrics.kid_subset_size<="
                             f"{self.n_samples} or n_samples>={self.metrics.kid_subset_size}")


def _is_inception_family(name: str) -> bool:
    # features.is_inception_family without importing torch at compose time
    return name in ("auto", "inception", "inception-v3-fid") or name.startswith("random-inception")


@dataclass
class ReferenceStatsConfig(ShardInput):
    """``python data_tools/reference_stats.py data=<shard urls> n_samples=50000 [out=...]``."""

    out: Optional[str] = None  # default: <shard dir>/reference_stats/<extractor>-<resize>_<res>px_n<N>.npz
    n_samples: int = 50000  # at most; N (file name, meta) is what went in: min(n_samples, set size) less dropped
    keep_images: int = 10000
    resolution: int = 256
    conditioning: Conditioning = "text"  # type: ignore[valid-type]  # labels kept for generation
    batch_size: int = 50
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 20  # batches between resume checkpoints
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        self.require_data()


def compose_fid_config(overrides: List[str]) -> FIDEvalConfig:
    """``conf/commands/fid.yaml`` with Hydra ``overrides`` (``preset=quickstart`` selects ``conf/commands/preset/``;
    explicit overrides still win). A bad key, type or choice raises ``ValueError``."""
    return compose_command("fid", FIDEvalConfig, overrides)


def compose_reference_stats_config(overrides: List[str]) -> ReferenceStatsConfig:
    """``conf/commands/reference_stats.yaml`` with Hydra ``overrides``."""
    return compose_command("reference_stats", ReferenceStatsConfig, overrides)
