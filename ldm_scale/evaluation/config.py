"""Typed configs of the evaluation CLIs (``eval/fid.py``, ``data_tools/reference_stats.py``).

OmegaConf structured configs: ``key=value`` arguments are merged onto these by
``ldm_scale.evaluation.cli.compose_config``, so a misspelt key or a wrong type fails before any work
starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ldm_scale.config import LoggerConfig
from ldm_scale.evaluation.cli import Preset, compose_config
from ldm_scale.evaluation.inception import FID_WEIGHTS_SHA256
from ldm_scale.storage import StorageConfig


@dataclass
class ExtractorConfig:
    """Which feature extractor (``features.get_extractor``) and how images reach it.

    ``name="auto"`` uses the pinned FID Inception when its weights are on this machine (explicit
    ``weights``, ``$LDM_SCALE_FID_WEIGHTS`` or the torch hub cache) and otherwise falls back, with a
    warning, to ``random-inception`` (recorded as NOT comparable). ``inception`` never falls back.
    """

    name: str = "auto"  # auto | inception | random-inception | clip:<arch>[@<pretrained>]
    weights: Optional[str] = None  # path or URL of pt_inception-2015-12-05-6726825d.pth
    sha256: str = FID_WEIGHTS_SHA256
    allow_download: bool = True  # "inception" only; "auto" never downloads
    resize: str = "pil_bicubic"  # pil_bicubic | tf_bilinear | torch_bilinear (see preprocess.py)
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
    pr_k: int = 3
    pr_batch_size: int = 10000
    kid_subsets: int = 100
    kid_subset_size: int = 1000


@dataclass
class FIDEvalConfig:
    """``python eval/fid.py ckpt=... ref=... n_samples=50000 ddim_steps=200 ddim_eta=0 scale=1.5``."""

    preset: Optional[str] = None  # "quickstart": defaults for launch/quickstart.py's outputs (see PRESETS)
    quickstart_dir: str = "quickstart"  # launch/quickstart.py --workdir
    ckpt: Optional[str] = None  # exported checkpoint (path or URL) or a training checkpoint directory
    ref: Optional[str] = None  # reference .npz (ours or ADM's) or shard URLs to compute it from
    ref_n_samples: int = 50000  # when `ref` is shards: images in mu/sigma (at most: all if the set is smaller)
    ref_keep_images: int = 10000  # when `ref` is shards: images kept in arr_0 (precision/recall)
    ref_out: Optional[str] = None  # when `ref` is shards: where to store it (default: next to the data)
    ref_resolution: Optional[int] = None  # when `ref` is shards: default the model's image size
    prompts: Optional[str] = None  # text file (one prompt / label per line) or shards; default: the reference's
    out: Optional[str] = None  # run directory for samples, features, result JSON (default ./eval_runs/<tag>)
    n_samples: int = 50000
    batch_size: int = 16  # samples per chunk (one sampler call)
    sampler: str = "ddim"  # ddim | plms | ddpm
    ddim_steps: int = 200
    ddim_eta: float = 0.0
    spacing: str = "uniform"  # uniform (CompVis/SD) | quadratic | trailing: as training's eval.sampler.spacing
    scale: float = 1.0  # classifier-free guidance scale (1 = off)
    seed: int = 0
    use_ema: bool = True
    precision: str = "fp32"  # fp32 | bf16 (autocast of the networks; the sampler state stays fp32)
    flavour: Optional[str] = None  # CompVis-layout checkpoints only: the registered flavour
    trust_checkpoint: bool = False  # allow arbitrary pickles (CompVis Lightning .ckpt)
    device: Optional[str] = None  # default: this rank's CUDA device, else CPU
    write_adm_npz: bool = False  # also write samples as one ADM-style arr_0 .npz
    keep_samples: bool = True
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # W&B on rank 0 (ldm_scale.logging); "auto" is offline unless an API key is configured.
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(project="ldm_scale", tags=["eval"]))
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class ReferenceStatsConfig:
    """``python data_tools/reference_stats.py data=<shard urls> n_samples=50000 [out=...]``."""

    data: Optional[str] = None  # shard pattern(s), "::"-separated: s3://b/set/{00000..00099}.tar
    out: Optional[str] = None  # default: <shard dir>/reference_stats/<extractor>-<resize>_<res>px_n<N>.npz
    n_samples: int = 50000  # at most; N (file name, meta) is what went in: min(n_samples, set size) less dropped
    keep_images: int = 10000
    resolution: int = 256
    conditioning: str = "text"  # text | class | none: which labels to keep for conditioning generation
    batch_size: int = 50
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 20  # batches between resume checkpoints
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        if not self.data:
            raise ValueError("data= is required: shard URLs, e.g. data='s3://bucket/set/{00000..00099}.tar'")


def _quickstart_preset(cfg: "FIDEvalConfig") -> List[str]:
    """The outputs of ``launch/quickstart.py`` (tiny text LDM on the synthetic shapes) in
    ``cfg.quickstart_dir``, evaluated offline in minutes on 2 CPU cores: few samples, and without the
    real Inception weights the random-weight Inception at 96 px (``auto`` uses the real one when its
    weights are present)."""
    workdir = cfg.quickstart_dir
    return [f"ckpt={workdir}/runs/checkpoints/quickstart-ldm/export.pt", f"ref={workdir}/data/synthetic/*.tar",
            "ref_n_samples=4096", "ref_keep_images=4096", "n_samples=512", "batch_size=32", "ddim_steps=25",
            "scale=3.0", "extractor.input_size=96", "extractor.batch_size=32", "metrics.pr_batch_size=4096"]


PRESETS: Dict[str, Preset] = {"quickstart": _quickstart_preset}


def compose_fid_config(overrides: List[str]) -> FIDEvalConfig:
    """``key=value`` overrides on the schema; ``preset=<name>`` first applies that preset's values
    (explicit overrides still win). Unknown keys and wrong types raise ``ValueError``."""
    return compose_config(FIDEvalConfig, overrides, presets=PRESETS)
