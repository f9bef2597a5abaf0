"""The training configuration: typed Hydra schemas, composition, and one ``validate()``.

Every component owns its dataclass next to its code; this module composes them into
:class:`Config`, registers it in Hydra's ConfigStore as ``schema`` (``conf/config.yaml`` lists it
first in its defaults), so an unknown key or a wrong type fails at compose time; a key added with
``+key=`` / ``++key=`` (which Hydra lets past the schema) fails in :func:`to_object`
(:func:`unknown_keys`), with the closest valid key.

:func:`validate` is the single place for derived arithmetic and cross-field checks (global batch =
micro-batch x accumulation x world, image/latent sizes, conditioning vs model, required URLs,
finite numbers), and for the files the configuration names (``model.first_stage_ckpt``). It runs
before any model is built or anything is written and reports *all* problems at once, each naming
the key and the fix (one problem: one line).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import enum
import json
import math
import os
import secrets
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ldm_scale import dist, storage
from ldm_scale.choices import Choice, plain_choices
from ldm_scale.data.config import DataConfig
from ldm_scale.diffusion import DiffusionConfig, SamplerConfig
from ldm_scale.losses.autoencoder import AutoencoderLossConfig
from ldm_scale.models.registry import AUTOENCODERS, FLAVOURS, FirstStageConfig, LDMSpec
from ldm_scale.preemption import PreemptionConfig
from ldm_scale.storage import StorageConfig
from ldm_scale.train.checkpoint import CheckpointConfig
from ldm_scale.train.compile import CompileMode
from ldm_scale.train.ema import EmaConfig
from ldm_scale.train.engine import BatchPlan, DeepSpeedConfig, OptimConfig, peak_lr
from ldm_scale.train.health import DebugSpikeConfig, SpikeRuleConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
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


@dataclass
class LoggerConfig:
    """Experiment tracking (W&B on rank 0) and console output."""

    backend: LoggerBackend = "wandb"
    mode: LoggerMode = "auto"
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


# ------------------------------------------------------------------------------------------
# Registration and composition

def register_configs() -> None:
    """Register the schema so ``conf/config.yaml``'s first default (``schema``) types the tree, and
    the model registries as typed group options: ``model=<flavour>`` (an :class:`LDMSpec` at
    ``model.ldm``) and ``autoencoder=<name>`` (a :class:`FirstStageConfig` at ``model.autoencoder``).
    The registries stay the one place a flavour is written."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, spec in FLAVOURS.items():
        store.store(group="model", name=name, node={"ldm": copy.deepcopy(spec)}, package="model")
    for name, first_stage in AUTOENCODERS.items():
        store.store(group="autoencoder", name=name, node=copy.deepcopy(first_stage), package="model.autoencoder")


def compose(overrides: Sequence[str] = (), config_dir: Optional[Path] = None, *,
            config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (tests, tools, and the
    commands of ``ldm_scale/cli.py``).

    ``launch/train.py`` goes through ``@hydra.main`` instead; both paths give the same tree.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str((config_dir or CONF_DIR).resolve()), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def to_object(cfg: DictConfig, schema: type = None) -> Any:  # type: ignore[assignment]
    """The composed tree as typed dataclasses (``schema``, default :class:`Config`); unset required
    values (``???``) and keys the schema lacks (added with ``+key=``) raise :class:`ConfigError`."""
    schema = schema or Config
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            example = (" data.urls=\"['s3://bucket/laion/{00000..41407}.tar']\" model.first_stage_ckpt=s3://bucket/ae/"
                       "kl_f8.pt checkpoint.root=s3://bucket/checkpoints") if schema is Config else ""
            raise ConfigError("required values are not set: " + ", ".join(missing) + ". Set them on the command "
                              "line" + (", e.g." + example if example else ""))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # e.g. an interpolation ${...} that names no key
        message = str(exc).strip().splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(message + (f" (key {key})" if key and key not in message else "")) from None
    if not isinstance(obj, schema):
        raise ConfigError(f"the composed config is not typed by {schema.__name__}: its conf/*.yaml must list "
                          "the schema first in its defaults")
    plain_choices(obj)  # choices as plain strings from here on (ldm_scale/choices.py says why)
    unknown = unknown_keys(obj)
    if unknown:
        raise ConfigError("; ".join(unknown))
    return obj


def _closest_key(key: str, valid: Sequence[str], prefix: str) -> str:
    """``did you mean <prefix><closest>?`` (difflib), or the valid keys at that level."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    return f"valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"


def _unknown_key_message(full_key: str, schema: type) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(schema)]
    return f"unknown config key {full_key}: {_closest_key(leaf, valid, parent + '.' if parent else '')}"


def _nodes(value: Any, path: str = ""):
    """``(path, value)`` of ``value`` and everything under it: dataclass fields, dict keys, list items."""
    yield path, value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _nodes(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nodes(v, f"{path}[{i}]")


def unknown_keys(cfg: Any) -> List[str]:
    """One message per attribute of the dataclass tree ``cfg`` that its schema does not declare.

    Struct mode rejects a misspelt ``key=value`` at compose time, but Hydra applies ``+key=`` and
    ``++key=`` inside ``open_dict`` (struct lifted), and ``OmegaConf.to_object`` then sets a key the
    dataclass lacks as a plain attribute that nothing reads: ``+train.max_step=10`` (Hydra's own hint
    after the typo) would be accepted and ignored.
    """
    problems = []
    for path, node in _nodes(cfg):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            declared = {f.name for f in dataclasses.fields(node)}
            for extra in (k for k in vars(node) if k not in declared):
                problems.append(_unknown_key_message(f"{path}.{extra}" if path else extra, type(node)))
    return problems


def choice_problems(cfg: Any) -> List[str]:
    """One message per choice field (typed by an :class:`~enum.Enum`) of the dataclass tree ``cfg``
    whose value is not one of its members.

    Composition already refuses such a value (OmegaConf checks enum fields); this catches a config
    built or changed in code (tests, tools), which no compose step checked, in one place for every
    choice rather than a hand-written list per field."""
    problems = []
    for path, node in _nodes(cfg):
        if not (dataclasses.is_dataclass(node) and not isinstance(node, type)):
            continue
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            kind, value = hints.get(f.name), getattr(node, f.name)
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and value not in set(kind):
                valid = [m.value for m in kind]
                problems.append(f"{path + '.' if path else ''}{f.name}={value!r}: expected one of {valid}")
    return problems


def describe_composition_error(exc: BaseException) -> str:
    """One line for a Hydra composition error (a typo in an override or an experiment file, a wrong
    type, a missing config group option): the problem, the full key, and the closest valid key."""
    # Hydra raises from (overrides) or while handling (config files) OmegaConf's error.
    inner = exc.__cause__ or exc.__context__
    cause = inner if isinstance(inner, OmegaConfBaseException) else exc
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key and dataclasses.is_dataclass(schema):
        where = str(exc).split(":", 1)[0] + ": " if str(exc).startswith("In '") else ""  # In 'experiment/x'
        return where + _unknown_key_message(key, schema)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key and key not in message:
        message += f" (key {key})"
    options = getattr(exc, "options", None)  # MissingConfigException: the group's options
    missing = getattr(exc, "missing_cfg_file", None)
    if options and missing:
        message += f": {_closest_key(Path(missing).name, list(options), '')}"
    return message


# ------------------------------------------------------------------------------------------
# validate(): derived plan + cross-field checks, before anything is allocated

@dataclass(frozen=True)
class Plan:
    """What validate() derived; builders take their numbers from here, not from re-computation."""

    batch: BatchPlan
    image_size: int
    latent_size: int
    latent_channels: int
    peak_lr: float
    spec: Optional[LDMSpec] = None  # task=ldm: the resolved flavour (+ overrides, + diffusion slice)
    autoencoder: Optional[FirstStageConfig] = None  # task=autoencoder: the resolved first stage

    def describe(self) -> str:
        b = self.batch
        return (f"global batch {b.global_batch_size} = micro {b.micro_batch_size} x accumulation "
                f"{b.gradient_accumulation_steps} x world {b.world_size}; images {self.image_size}px -> "
                f"latents {self.latent_channels}x{self.latent_size}x{self.latent_size}; peak lr {self.peak_lr:g}")


def _context_width(spec: LDMSpec) -> Optional[int]:
    """Width of the conditioner's context tokens, computed from the config alone (no model)."""
    cond = spec.cond_stage
    if cond.kind == "text":
        return cond.text.width
    if cond.kind == "class":
        return cond.classes.embed_dim
    if cond.kind == "openclip":
        import open_clip  # lazy: only text-to-image configs with an OpenCLIP tower need it

        model_cfg = open_clip.get_model_config(cond.openclip.arch)
        if model_cfg is None:
            return None
        return int(model_cfg["text_cfg"]["width"])
    return None


def _batch_plan(train: TrainConfig, world_size: int, problems: List[str]) -> BatchPlan:
    micro = train.micro_batch_size
    accum = train.gradient_accumulation_steps
    if micro < 1:
        problems.append(f"train.micro_batch_size={micro}: must be >= 1")
        micro = 1
    if accum is not None and accum < 1:
        problems.append(f"train.gradient_accumulation_steps={accum}: must be >= 1 (or null to derive it)")
        accum = 1
    target = train.global_batch_size
    if target is None:
        return BatchPlan(micro, accum or 1, world_size)
    per_accum = micro * world_size
    if accum is None:
        if target % per_accum:
            problems.append(
                f"train.global_batch_size={target} is not a multiple of train.micro_batch_size x world size "
                f"= {micro} x {world_size} = {per_accum}: pick a micro-batch that divides "
                f"{target // world_size if target % world_size == 0 else 'it'} or change the global batch / GPU count")
            return BatchPlan(micro, 1, world_size)
        return BatchPlan(micro, target // per_accum, world_size)
    if micro * accum * world_size != target:
        problems.append(
            f"train.global_batch_size={target} but train.micro_batch_size x train.gradient_accumulation_steps "
            f"x world size = {micro} x {accum} x {world_size} = {micro * accum * world_size}: set "
            f"train.gradient_accumulation_steps=null to derive it, or make the product equal")
    return BatchPlan(micro, accum, world_size)


def _is_url_set(value: Optional[str]) -> bool:
    return bool(value) and "???" not in str(value)


def _check_ldm(cfg: Config, problems: List[str]) -> Optional[LDMSpec]:
    m = cfg.model
    spec = copy.deepcopy(m.ldm)
    # The diffusion slice is authoritative for the forward process; the exported spec records it.
    d = cfg.diffusion
    spec.linear_start, spec.linear_end, spec.num_timesteps = d.linear_start, d.linear_end, d.num_timesteps
    spec.parameterization = d.parameterization
    if m.scale_factor is not None:
        spec.scale_factor = m.scale_factor
    try:
        spec.validate()
    except ValueError as exc:
        problems.append(f"model: {exc}")
    width = _context_width(spec)
    if spec.unet.use_spatial_transformer and spec.cond_stage.kind in ("text", "openclip", "class"):
        if width is not None and spec.unet.context_dim != width:
            problems.append(
                f"model: unet.context_dim={spec.unet.context_dim} but the {spec.cond_stage.kind} encoder emits "
                f"{width}-wide tokens: set model.ldm.unet.context_dim={width} or change the encoder width")
    if m.scale_factor_mode == "estimate" and m.scale_factor is not None:
        problems.append("model.scale_factor is set but model.scale_factor_mode=estimate would replace it: "
                        "set model.scale_factor=null or model.scale_factor_mode=spec")
    text = spec.cond_stage.text
    if spec.cond_stage.kind == "text" and text.tokenizer.kind == "wordpiece" and not _is_url_set(text.tokenizer.vocab_path):
        # A typed field cannot be marked `???` by an experiment (OmegaConf keeps the value under a
        # MISSING), so the file the word tokenizer reads is asked for here.
        problems.append("model.ldm.cond_stage.text.tokenizer.vocab_path is not set: tokenizer.kind=wordpiece reads a "
                        "vocab.txt; give the one data_tools/build_vocab.py wrote (or the overrides it prints for "
                        "CLIP's BPE)")
    # Needed with latent shards too: sample grids are decoded by the first stage.
    if not _is_url_set(m.first_stage_ckpt) and not m.allow_random_first_stage:
        problems.append("model.first_stage_ckpt is not set: give the exported autoencoder checkpoint "
                        "(train one with experiment=autoencoder_* ) or set model.allow_random_first_stage=true "
                        "for tests")
    conditioning = {"text": "text", "openclip": "text", "class": "class", "label": "class"}.get(spec.cond_stage.kind, "none")
    if cfg.data.conditioning != conditioning:
        problems.append(f"data.conditioning={cfg.data.conditioning!r} but model {spec.name} is conditioned on "
                        f"{conditioning!r}: set data.conditioning={conditioning} or choose another model=<flavour>")
    if cfg.data.input == "image" and cfg.data.resolution != spec.image_size:
        problems.append(f"data.resolution={cfg.data.resolution} but model {spec.name} is built for "
                        f"{spec.image_size}px images: set data.resolution={spec.image_size} or "
                        f"model.ldm.image_size={cfg.data.resolution}")
    try:
        d.validate()
    except ValueError as exc:
        problems.append(str(exc))
    try:
        cfg.eval.sampler.validate()
    except ValueError as exc:
        problems.append(f"eval.sampler: {exc}")
    if conditioning == "text" and (cfg.eval.sample_every > 0 or cfg.eval.sample_at_end) and not cfg.eval.prompts:
        problems.append("eval.prompts is empty but a text model samples grids: list prompts or set "
                        "eval.sample_every=0 eval.sample_at_end=false")
    return spec


def _check_autoencoder(cfg: Config, problems: List[str]) -> Optional[FirstStageConfig]:
    ae = copy.deepcopy(cfg.model.autoencoder)
    if ae is None:
        problems.append(f"model.autoencoder is not set: task=autoencoder needs autoencoder=<name>, one of "
                        f"{sorted(AUTOENCODERS)} (or an experiment=autoencoder_* that names one)")
        return None
    if cfg.data.input != "image":
        problems.append("task=autoencoder trains on images: set data.input=image")
    try:
        check_autoencoder_plan(ae, cfg.autoencoder_loss, cfg.deepspeed.zero.stage, cfg.data.resolution)
    except ValueError as exc:
        problems.append(str(exc))
    return ae


def check_autoencoder_plan(first_stage: FirstStageConfig, loss: AutoencoderLossConfig, zero_stage: int,
                           image_size: Optional[int] = None) -> None:
    """Cross-field checks for autoencoder training (ValueError naming the setting and the fix).

    ``validate()`` runs it with the other checks, and the autoencoder task again first thing when it
    is built (it can be built from a hand-made config), before any model or engine is allocated."""
    loss.check()
    if zero_stage == 3:
        raise ValueError(
            "autoencoder training does not support deepspeed.zero.stage=3: the adaptive GAN weight "
            "(Esser et al. 2021, Eq. 7) needs autograd.grad of the reconstruction and GAN losses w.r.t. "
            "the decoder's last-layer weight, and ZeRO-3 partitions that parameter across ranks. Use "
            "stage 1 or 2 (autoencoders are small enough that only optimizer/gradient sharding matters).")
    if first_stage.kind not in ("kl", "vq"):
        raise ValueError(f"model.first_stage.kind={first_stage.kind!r}: choose 'kl' or 'vq'")
    f = first_stage.downsample_factor
    if image_size is not None and image_size % f:
        raise ValueError(f"data image size {image_size} is not divisible by the autoencoder's factor f={f}")
    if loss.discriminator.in_channels != (first_stage.kl if first_stage.kind == "kl" else first_stage.vq).ddconfig.out_ch:
        raise ValueError("loss.discriminator.in_channels must equal the autoencoder's output channels")


# Fields of a first stage that do not shape its weights (training-only); everything else must match.
_FIRST_STAGE_TRAINING_ONLY = ("ddconfig.dropout", "beta", "legacy_beta")


def _first_stage_differences(found: FirstStageConfig, expected: FirstStageConfig) -> List[str]:
    """``field=found (needs expected)`` for each architecture field where ``found`` differs."""
    if found.kind != expected.kind:
        return [f"kind={found.kind!r} (needs {expected.kind!r})"]

    def flat(cfg: FirstStageConfig) -> Dict[str, Any]:
        active = dataclasses.asdict(cfg.kl if cfg.kind == "kl" else cfg.vq)
        dd = active.pop("ddconfig")
        return {**{f"ddconfig.{k}": v for k, v in dd.items()}, **active}

    have, need = flat(found), flat(expected)
    # The encoder and decoder place attention by resolution; without attention it shapes nothing.
    skip = set(_FIRST_STAGE_TRAINING_ONLY) | (set() if need["ddconfig.attn_resolutions"] else {"ddconfig.resolution"})
    order = sorted(need, key=lambda k: (k not in ("embed_dim", "ddconfig.z_channels"), k))
    return [f"{k}={have[k]} (needs {need[k]})" for k in order if k not in skip and have.get(k) != need[k]]


def check_first_stage_ckpt(url: str, spec: LDMSpec, storage_cfg: Optional[StorageConfig] = None) -> Optional[str]:
    """The problem with ``model.first_stage_ckpt=url`` for the LDM ``spec``, or None.

    It must exist and be readable (a local path or an object-store URL), be an autoencoder export
    (``train/export.py``'s format string) and hold the first stage ``spec`` is built for (same
    kind, latent width ``embed_dim`` and ``z_channels``, same layout), so the run fails here, before
    the run directory, rather than inside ``load_first_stage`` after it. Only the export's pickle
    is read (:func:`ldm_scale.train.export.read_metadata`), not its weights.
    """
    from ldm_scale.models.registry import config_from_dict
    from ldm_scale.formats import AUTOENCODER_FORMAT, LDM_FORMAT, read_metadata

    key = f"model.first_stage_ckpt={storage.redact(url)}"
    fix = ("give the export.pt an experiment=autoencoder_* run writes under checkpoint.root/<run id>/ "
           "(or `python -m ldm_scale.train.export <checkpoint> <out>`)")
    try:
        if not storage.exists(url, storage_cfg):
            return f"{key} does not exist: {fix}"
        if storage.is_local(url) and os.path.isdir(storage.local_path(url)):
            return f"{key} is a directory (a training checkpoint?), not an export file: {fix}"
        meta = read_metadata(url, storage_cfg)
    except ValueError as exc:
        return f"{key} is not an exported autoencoder ({exc}): {fix}"
    except OSError as exc:  # permissions, storage errors after retries (StorageError is an OSError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{key} cannot be read ({type(exc).__name__}: {reason}): check the path and its permissions"
    fmt = meta.get("format")
    if fmt != AUTOENCODER_FORMAT:
        what = "an LDM export" if fmt == LDM_FORMAT else "not an ldm_scale export"
        return f"{key} is {what} (format {fmt!r}, expected {AUTOENCODER_FORMAT!r}): {fix}"
    try:
        found = config_from_dict(FirstStageConfig, meta.get("model_config"))
    except (TypeError, ValueError) as exc:
        return f"{key} has an unreadable model_config ({exc}): re-export it with this version ({fix})"
    differences = _first_stage_differences(found, spec.first_stage)
    if differences:
        names = [n for n, ae in AUTOENCODERS.items() if ae == spec.first_stage]
        wanted = f"autoencoder={names[0]}" if names else "the first stage model.ldm.first_stage describes"
        return (f"{key} holds another first stage than model {spec.name}'s: {', '.join(differences)}: give the "
                f"export of an autoencoder trained with {wanted}, or set model.ldm.first_stage.* to match")
    return None


def validate(cfg: Config, world_size: Optional[int] = None, *, check_files: bool = True) -> Plan:
    """Check the whole configuration and derive the plan; raise :class:`ConfigError` listing every problem.

    With ``check_files`` (the default), a consistent configuration is then checked against the files
    it names before anything is written: ``model.first_stage_ckpt`` (:func:`check_first_stage_ckpt`).
    Pass False to check the configuration alone (tests with placeholder URLs, offline planning).
    """
    world_size = world_size or dist.get_dist_info().world_size
    problems: List[str] = unknown_keys(cfg)
    # NaN compares false with everything, so every range check below would let it through.
    problems += [f"{path}={value}: must be a finite number" for path, value in _nodes(cfg)
                 if isinstance(value, float) and not math.isfinite(value)]
    problems += choice_problems(cfg)
    batch = _batch_plan(cfg.train, world_size, problems)
    try:
        cfg.data.validate()
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if any(not _is_url_set(u) for u in cfg.data.urls):
            problems.append(f"data.urls={cfg.data.urls} has an unset entry: give the shard URLs, e.g. "
                            "data.urls=\"['s3://bucket/laion/{00000..41407}.tar']\"")

    spec = autoencoder = None
    if cfg.task == "ldm":
        spec = _check_ldm(cfg, problems)
    elif cfg.task == "autoencoder":
        autoencoder = _check_autoencoder(cfg, problems)

    ds, z = cfg.deepspeed, cfg.deepspeed.zero
    if z.stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero.stage={z.stage}: expected 0, 1, 2 or 3")
    if z.offload_param and z.stage != 3:
        problems.append("deepspeed.zero.offload_param needs deepspeed.zero.stage=3 (use deepspeed=zero3_offload)")
    if z.offload_optimizer and z.stage == 0:
        problems.append("deepspeed.zero.offload_optimizer needs ZeRO stage >= 1")
    if ds.channels_last and z.stage == 3:
        problems.append("deepspeed.channels_last needs ZeRO stage <= 2 (ZeRO-3 keeps parameters as flat shards)")
    if ds.precision == "fp32" and ds.frozen_precision in ("bf16", "fp16"):
        problems.append(f"deepspeed.frozen_precision={ds.frozen_precision} needs a half-precision run: the frozen "
                        "text encoder runs under the run's autocast, and deepspeed.precision=fp32 has none")
    if ds.gradient_clipping < 0:
        problems.append("deepspeed.gradient_clipping must be >= 0 (0 disables clipping)")

    o = cfg.optim
    if o.lr <= 0:
        problems.append(f"optim.lr={o.lr}: must be > 0")
    if len(o.betas) != 2:
        problems.append(f"optim.betas={o.betas}: give two numbers, e.g. [0.9, 0.999]")
    if o.scale_lr and o.lr_reference_batch < 1:
        problems.append("optim.lr_reference_batch must be >= 1 when optim.scale_lr=true")

    t = cfg.train
    if t.max_steps < 1:
        problems.append(f"train.max_steps={t.max_steps}: must be >= 1")
    if t.log_every < 1:
        problems.append(f"train.log_every={t.log_every}: must be >= 1")
    if t.collective_timeout_s <= 0 or (t.step_collective_timeout_s is not None and t.step_collective_timeout_s <= 0):
        problems.append("train.collective_timeout_s and train.step_collective_timeout_s must be > 0")
    if t.gc_every < 0:
        problems.append("train.gc_every must be >= 0 (0: automatic garbage collection)")
    if t.compile == CompileMode.unet and cfg.deepspeed.zero.stage == 3:
        problems.append("train.compile=unet under deepspeed.zero.stage=3 breaks the graph at every layer's "
                        "parameter gather: use train.compile=blocks (one gather per compiled block)")
    if t.max_consecutive_unhealthy < 1:
        problems.append("train.max_consecutive_unhealthy must be >= 1")
    if t.spike.enabled and (t.spike.factor <= 1.0 or t.spike.window < 1 or t.spike.patience < 1):
        problems.append("train.spike needs factor > 1, window >= 1 and patience >= 1")
    if not _is_url_set(cfg.checkpoint.root):
        problems.append("checkpoint.root is not set: give a local directory or an object-store URL "
                        "(e.g. checkpoint.root=s3://bucket/ckpt)")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 1:
        problems.append("checkpoint.every_steps must be >= 0 (0 = only final) and checkpoint.keep_last >= 1")
    try:
        cfg.ema.validate()
    except ValueError as exc:
        problems.append(str(exc))
    problems += storage.config_problems(cfg.storage, "storage") + storage.config_problems(cfg.data.storage, "data.storage")

    # Reads storage, so only once the configuration itself is consistent (and the spec resolved).
    if not problems and check_files and spec is not None and _is_url_set(cfg.model.first_stage_ckpt):
        problem = check_first_stage_ckpt(cfg.model.first_stage_ckpt, spec, cfg.storage)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError.of(problems)

    if spec is not None:
        image_size, latent_size, channels = spec.image_size, spec.latent_size, spec.first_stage.latent_channels
    else:
        assert autoencoder is not None
        image_size = cfg.data.resolution
        latent_size = image_size // autoencoder.downsample_factor
        channels = autoencoder.latent_channels
    return Plan(batch=batch, image_size=image_size, latent_size=latent_size, latent_channels=channels,
                peak_lr=peak_lr(cfg.optim, batch), spec=spec, autoencoder=autoencoder)


# ------------------------------------------------------------------------------------------
# Run identity and the resolved config on disk

def resolve_run_id(cfg: Config) -> str:
    """The run id, identical on every rank.

    From the config, else ``$LDM_SCALE_RUN_ID`` (set it in a requeued SLURM job so the run resumes),
    else generated on rank 0 and broadcast (``${now:}`` differs between ranks, hydra #2070).
    """
    run_id = cfg.run_id or os.environ.get(RUN_ID_ENV)
    if not run_id:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{cfg.name}-{stamp}-{secrets.token_hex(3)}"
    # Broadcast even a configured id: ranks that disagree (different env per node) would write apart.
    return dist.broadcast_object(run_id, src=0)


def resolved_dict(cfg: Config) -> Dict[str, Any]:
    """The fully resolved configuration as plain containers, as it is persisted (config.yaml, W&B,
    every checkpoint's client state, exports): credentials are masked by
    :func:`ldm_scale.storage.redact_config`. ``cfg`` itself keeps the real values the run needs; a
    reader of a persisted copy must not connect with its URLs (see ``storage.is_redacted``)."""
    # Enums as their strings: persisted copies stay plain data (weights_only loads, JSON, YAML).
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return storage.redact_config(container)  # type: ignore[return-value]


def write_resolved(cfg: Config, plan: Plan, run_dir: Path) -> Path:
    """Write ``config.yaml`` (resolved, redacted) and ``plan.json`` to the run directory (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_dict(cfg))))
    plan_dict = {
        "global_batch_size": plan.batch.global_batch_size,
        "micro_batch_size": plan.batch.micro_batch_size,
        "gradient_accumulation_steps": plan.batch.gradient_accumulation_steps,
        "world_size": plan.batch.world_size, "image_size": plan.image_size,
        "latent_size": plan.latent_size, "latent_channels": plan.latent_channels, "peak_lr": plan.peak_lr,
        "spec": dataclasses.asdict(plan.spec) if plan.spec is not None else None,
        "autoencoder": dataclasses.asdict(plan.autoencoder) if plan.autoencoder is not None else None,
    }
    (run_dir / "plan.json").write_text(json.dumps(storage.redact_config(plan_dict), indent=2) + "\n")
    return path
