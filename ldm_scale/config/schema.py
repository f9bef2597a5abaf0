"""The training run's typed schema: :class:`Config` and the slices owned here (model, train, logger,
eval); every other slice lives next to its component and is imported."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence


from ldm_scale.choices import Choice
from ldm_scale.data.config import DataConfig
from ldm_scale.diffusion import DiffusionConfig, SamplerConfig
from ldm_scale.losses.autoencoder import AutoencoderLossConfig
from ldm_scale.models.registry import FLAVOURS, FirstStageConfig, LDMSpec
from ldm_scale.preemption import PreemptionConfig
from ldm_scale.storage import StorageConfig
from ldm_scale.train.checkpoint import CheckpointConfig
from ldm_scale.train.compile import CompileMode
from ldm_scale.train.ema import EmaConfig
from ldm_scale.train.engine import DeepSpeedConfig, OptimConfig
from ldm_scale.train.health import DebugSpikeConfig, SpikeRuleConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RUN_ID_ENV = "LDM_SCALE_RUN_ID"


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem with its fix."""

    @classmethod
    def of(cls, problems: Sequence[str]) -> "ConfigError":
        """One problem reads as one line (what a shell shows); several as a list."""
        if len(problems) == 1:
            return cls(f"invalid configuration: {problems[0]}")
        return cls("invalid configuration:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------
# Slices owned here (the others live next to their components and are imported above).

class Task(Choice):
    """``task``: what the run trains."""

    ldm = "ldm"
    autoencoder = "autoencoder"


TASKS = tuple(Task.values())


class ScaleFactorMode(Choice):
    """``model.scale_factor_mode``: the flavour's latent scale, or 1/std of the first batch's latents."""

    spec = "spec"
    estimate = "estimate"


class LoggerBackend(Choice):
    wandb = "wandb"
    none = "none"


class LoggerMode(Choice):
    """W&B mode: auto (online with an API key, else offline) | online | offline | disabled."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Which network to train, typed to its last field, so a misspelt key or a wrong type in it
    fails when the config is composed.

    task=ldm: ``ldm`` is the :class:`LDMSpec` the ``model=<flavour>`` group option fills from
    ``models.registry.FLAVOURS`` (``model.ldm.unet.model_channels=64``); task=autoencoder:
    ``autoencoder`` is the :class:`FirstStageConfig` the ``autoencoder=<name>`` option fills from
    ``AUTOENCODERS`` (``model.autoencoder.kl.embed_dim=8``). :func:`register_configs` stores both
    registries as the options of those groups.
    """

    ldm: LDMSpec = field(default_factory=lambda: copy.deepcopy(FLAVOURS["tiny"]))
    autoencoder: Optional[FirstStageConfig] = None
    # Exported autoencoder checkpoint (ldm_scale/autoencoder-v1) for the frozen first stage.
    first_stage_ckpt: Optional[str] = None
    # A randomly initialised first stage is only useful for tests and benchmarks: opt in explicitly.
    allow_random_first_stage: bool = False
    activation_checkpointing: bool = False
    # Latent scale: "spec" uses the flavour's factor (or `scale_factor` when set); "estimate"
    # computes 1/std of the first batch's latents over all ranks (paper Sec. 4.3.2).
    scale_factor_mode: ScaleFactorMode = "spec"
    scale_factor: Optional[float] = None


@dataclass
class StageConfig:
    """One stage of ``train.stages`` (``config/stages.py``): from optimizer step ``start_step`` on,
    the run's configuration with ``overrides`` (Hydra-style ``key=value``) applied."""

    start_step: int = 0
    overrides: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The loop: batch arithmetic, length, cadence, failure policy."""

    micro_batch_size: int = 4
    # None: derived from global_batch_size (or 1 when that is unset too).
    gradient_accumulation_steps: Optional[int] = None
    # None: micro x accumulation x world. Set it to pin the paper's batch whatever the world size.
    global_batch_size: Optional[int] = None
    max_steps: int = 1000
    log_every: int = 10
    # Stop with an error after this many unhealthy optimizer steps in a row (train/health.py: a
    # non-finite loss, a step DeepSpeed skipped for overflow, a non-finite gradient norm).
    max_consecutive_unhealthy: int = 5
    # Loss-spike rollback to the last good checkpoint, skipping the data since it (off by default).
    spike: SpikeRuleConfig = field(default_factory=SpikeRuleConfig)
    # Fault injection to test the spike rule (off unless debug_spike.start_batch is set).
    debug_spike: DebugSpikeConfig = field(default_factory=DebugSpikeConfig)
    # A collective (NCCL/gloo) that does not complete within this long fails the run: start-up,
    # checkpoints, sampling and evaluation run under it ...
    collective_timeout_s: float = 1800.0
    # ... and the training steps from the second one on under this much shorter one, so a hung or
    # dead rank is found in minutes rather than half an hour. None: collective_timeout_s throughout.
    step_collective_timeout_s: Optional[float] = 300.0
    # Python's cyclic garbage collector: 0 leaves it automatic; N > 0 disables it in the loop and
    # collects generation 1 every N steps, at the same step on every rank (an automatic collection
    # pauses one rank at a random moment and every other rank waits for it in the next collective).
    gc_every: int = 50
    # Loss by timestep bucket: T is split into this many equal ranges.
    timestep_buckets: int = 4
    progress_bar: bool = True
    # torch.compile of the trainable networks (train/compile.py): off | unet (each network as one
    # graph) | blocks (each residual / transformer block as its own graph; use it under ZeRO-3).
    compile: CompileMode = "off"
    # Training in stages (progressive resolution: 256^2 then 512^2, as Stable Diffusion): each from
    # its start_step on, with its overrides of data.*, the batch, the learning rate and the model's
    # image size (config/stages.py). Empty: one stage, the configuration as it is.
    stages: List[StageConfig] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Experiment tracking (W&B on rank 0) and console output."""

    backend: LoggerBackend = "wandb"
    mode: LoggerMode = "auto"
    # Rank 0 renders <run_dir>/report/index.html (ldm_scale/report.py) when the run ends.
    report: bool = True
    project: str = "ldm_scale"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None  # None: the run directory
    # Peak dense TFLOPS of one device for MFU; None: looked up from the CUDA device name.
    peak_tflops: Optional[float] = None
    # Show the warnings our dependencies raise (deprecations, DeepSpeed's start-up notices);
    # LDM_SCALE_SHOW_LIBRARY_WARNINGS=1/0 overrides (see ldm_scale.logging.setup_console).
    show_library_warnings: bool = False


@dataclass
class TrainingFIDConfig:
    """``eval.fid``: FID (and KID, precision/recall) of the current weights every ``every`` optimizer
    steps and at the end, on ``n_samples`` samples, through ``eval/fid.py``'s own code path
    (``evaluation/in_training.py``): the same conditions, seeding, features and metrics, so the number
    equals ``eval/fid.py`` on the exported checkpoint with the same settings. ``ref``: a reference
    ``.npz`` or held-out shards (statistics computed once, stored next to them, reused)."""

    every: int = 0  # 0 = off
    ref: Optional[str] = None
    n_samples: int = 1000
    batch_size: int = 16  # samples per chunk (one sampler call)
    extractor: str = "auto"  # eval/fid.py's extractor.name
    extractor_weights: Optional[str] = None
    extractor_sha256: Optional[str] = None  # eval/fid.py's extractor.sha256 (None: the extractor's pin)
    extractor_input_size: Optional[int] = None  # random-inception only (CPU smoke runs)
    kid: bool = True
    kid_subset_size: int = 100
    precision_recall: bool = False


@dataclass
class EvalConfig:
    """Periodic sample grids with fixed prompts/labels and seeds, and the final adherence score."""

    sample_every: int = 0  # optimizer steps; 0 = only at the end
    sample_at_end: bool = True
    prompts: List[str] = field(default_factory=list)  # text models
    class_labels: List[int] = field(default_factory=list)  # class-conditional models
    num_unconditional: int = 8  # unconditional models
    seed: int = 1234
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # Images generated at the end to score prompt adherence (synthetic shapes data); 0 = off.
    prompt_adherence_samples: int = 0
    # Fixed-timestep validation loss (evaluation/val_loss.py): every val_every optimizer steps and
    # at the end, the diffusion loss on held-out shards (val_data: brace patterns like data.urls,
    # read with data.*'s input, conditioning and resolution) at fixed timesteps with fixed noise;
    # identical for any world size and across resumes. 0 = off.
    val_every: int = 0
    val_data: List[str] = field(default_factory=list)
    val_samples: int = 256  # the first N held-out samples (in the pass's planned order)
    val_batch_size: int = 32
    val_timesteps: List[int] = field(default_factory=list)  # []: 8 bin centres of [0, T), 62 ... 937
    fid: TrainingFIDConfig = field(default_factory=TrainingFIDConfig)
    # Sample grids and scores with the EMA weights (CompVis' ema_scope: what export ships); False:
    # the raw trained weights. Ignored when ema.enabled is false.
    use_ema: bool = True


@dataclass
class Config:
    """Top-level schema (``conf/config.yaml``). Components receive only their own slice."""

    task: Task = "ldm"
    name: str = "default"  # experiment name (W&B run name prefix, run id prefix)
    run_id: Optional[str] = None  # None: $LDM_SCALE_RUN_ID, else generated on rank 0 and broadcast
    output_dir: str = "runs"  # local run directories: <output_dir>/<run_id>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    # Object storage for every component (data and its workers, checkpoints, exports, the first
    # stage); data.storage.* fields override it for the shards only (ldm_scale.storage.resolve).
    storage: StorageConfig = field(default_factory=StorageConfig)
