"""``validate()``: the derived :class:`Plan` and every cross-field check, before anything is
allocated or written (see the package docstring)."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


from ldm_scale import dist, storage
from ldm_scale.losses.autoencoder import AutoencoderLossConfig
from ldm_scale.models.registry import AUTOENCODERS, FirstStageConfig, LDMSpec
from ldm_scale.storage import StorageConfig
from ldm_scale.train.compile import CompileMode
from ldm_scale.train.engine import BatchPlan, peak_lr
from ldm_scale.config.compose import _nodes, choice_problems, unknown_keys
from ldm_scale.config.schema import Config, ConfigError, TrainConfig

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
    if spec.is_dit:
        # The position table's grid is the training latent's: derived, like the schedule above.
        spec.dit.input_size = spec.latent_size
    if m.scale_factor is not None:
        spec.scale_factor = m.scale_factor
    try:
        spec.validate()
    except ValueError as exc:
        problems.append(f"model: {exc}")
    width = _context_width(spec)
    if spec.context_dim is not None and spec.cond_stage.kind in ("text", "openclip", "class"):
        if width is not None and spec.context_dim != width:
            field_name = "dit.context_dim" if spec.is_dit else "unet.context_dim"
            problems.append(
                f"model: {field_name}={spec.context_dim} but the {spec.cond_stage.kind} encoder emits "
                f"{width}-wide tokens: set model.ldm.{field_name}={width} or change the encoder width")
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
    if cfg.data.text_embeddings and spec.cond_stage.kind != "openclip":
        problems.append(f"data.text_embeddings=true but model {spec.name}'s text encoder (cond_stage.kind="
                        f"{spec.cond_stage.kind}) is "
                        + ("trained jointly with the denoiser, so its outputs change every step: set "
                           "data.text_embeddings=false" if spec.cond_stage.kind == "text" else
                           "not a frozen text encoder: set data.text_embeddings=false"))
    if cfg.data.input == "image" and cfg.data.resolution != spec.image_size:
        problems.append(f"data.resolution={cfg.data.resolution} but model {spec.name} is built for "
                        f"{spec.image_size}px images: set data.resolution={spec.image_size} or "
                        f"model.ldm.image_size={cfg.data.resolution}")
    if spec.micro_conditioned and not cfg.data.buckets.enabled:
        problems.append(f"model {spec.name} is micro-conditioned (size and crop, SDXL) but data.buckets.enabled=false: "
                        "only the bucketed loader provides those values; set data.buckets.enabled=true or "
                        "micro_conditioning=false")
    multiple = spec.first_stage.downsample_factor * spec.denoiser_downsampling
    if cfg.data.buckets.enabled and cfg.data.buckets.step % multiple:
        problems.append(f"data.buckets.step={cfg.data.buckets.step} but model {spec.name}'s image sides must be "
                        f"multiples of {multiple} (first stage f={spec.first_stage.downsample_factor} x denoiser "
                        f"{spec.denoiser_downsampling}): set data.buckets.step to a multiple of {multiple}")
    try:
        d.validate()
    except ValueError as exc:
        problems.append(str(exc))
    try:
        cfg.eval.sampler.validate()
        cfg.eval.sampler.check_model(d.parameterization)
    except ValueError as exc:
        problems.append(f"eval.sampler: {exc}")
    if conditioning == "text" and (cfg.eval.sample_every > 0 or cfg.eval.sample_at_end) and not cfg.eval.prompts:
        problems.append("eval.prompts is empty but a text model samples grids: list prompts or set "
                        "eval.sample_every=0 eval.sample_at_end=false")
    _check_validation(cfg, d.num_timesteps, problems)
    _check_training_fid(cfg, problems)
    return spec


def _check_training_fid(cfg: Config, problems: List[str]) -> None:
    """eval.fid.*: what eval/fid.py would refuse, refused now (before any step is trained)."""
    f = cfg.eval.fid
    if f.every < 0:
        problems.append(f"eval.fid.every={f.every} must be >= 0 (0 turns the in-training FID off)")
    if f.every <= 0:
        return
    if not f.ref:
        problems.append("eval.fid.every > 0 but eval.fid.ref is not set: give a reference .npz or held-out shards")
    if cfg.deepspeed.zero.stage == 3:
        problems.append("eval.fid.every > 0 with deepspeed.zero.stage=3: ranks sample unequal numbers of chunks, "
                        "which ZeRO-3's collective parameter gathers cannot serve; use stage 1/2, or run "
                        "eval/fid.py on the export")
    # What FIDEvalConfig.check() would refuse for the config evaluation/in_training.py builds (not
    # imported here: evaluation.config imports the command-line layer, which imports this package).
    if f.n_samples < 1 or f.batch_size < 1:
        problems.append(f"eval.fid.n_samples={f.n_samples} and eval.fid.batch_size={f.batch_size} must be >= 1")
    if f.kid and f.kid_subset_size > f.n_samples:
        problems.append(f"eval.fid.kid_subset_size={f.kid_subset_size} > eval.fid.n_samples={f.n_samples}: KID "
                        f"subsets are drawn from the generated samples; lower it or raise eval.fid.n_samples")


def _check_validation(cfg: Config, num_timesteps: int, problems: List[str]) -> None:
    """eval.val_*: the held-out set is given, disjoint from the training shards, and the timesteps exist."""
    e = cfg.eval
    if e.val_every < 0:
        problems.append(f"eval.val_every={e.val_every} must be >= 0 (0 turns the validation loss off)")
    if e.val_every <= 0:
        return
    if not e.val_data:
        problems.append("eval.val_every > 0 but eval.val_data is empty: give held-out shards (e.g. "
                        "eval.val_data=['/data/val/{00000..00001}.tar']) or set eval.val_every=0")
    if e.val_samples <= 0 or e.val_batch_size <= 0:
        problems.append(f"eval.val_samples={e.val_samples} and eval.val_batch_size={e.val_batch_size} must be positive")
    bad = [t for t in e.val_timesteps if not 0 <= t < num_timesteps]
    if bad:
        problems.append(f"eval.val_timesteps {bad} are outside [0, {num_timesteps}) (diffusion.num_timesteps)")
    if len(set(e.val_timesteps)) != len(e.val_timesteps):
        problems.append(f"eval.val_timesteps={list(e.val_timesteps)} repeats a timestep")
    def names(entries: List[str]) -> set:  # brace expansion only: validate() never lists storage
        return {url for entry in entries for part in str(entry).split(storage.URL_LIST_SEPARATOR)
                if part.strip() for url in storage.expand_braces(part.strip())}

    try:
        shared = sorted(names(list(cfg.data.urls)) & names(list(e.val_data)))
    except ValueError as exc:
        problems.append(f"eval.val_data: {exc}")
        return
    if shared:
        problems.append(f"eval.val_data shares {len(shared)} shard(s) with data.urls (e.g. {storage.redact(shared[0])}): "
                        "a validation loss on training data measures memorisation; hold those shards out")


def _check_autoencoder(cfg: Config, problems: List[str]) -> Optional[FirstStageConfig]:
    ae = copy.deepcopy(cfg.model.autoencoder)
    if ae is None:
        problems.append(f"model.autoencoder is not set: task=autoencoder needs autoencoder=<name>, one of "
                        f"{sorted(AUTOENCODERS)} (or an experiment=autoencoder_* that names one)")
        return None
    if cfg.data.input != "image":
        problems.append("task=autoencoder trains on images: set data.input=image")
    if cfg.eval.fid.every > 0:
        problems.append("eval.fid.every > 0 but in-training FID samples an LDM: set eval.fid.every=0 for "
                        "task=autoencoder (eval/recon.py gives rFID)")
    if cfg.eval.val_every > 0:
        problems.append("eval.val_every > 0 but the fixed-timestep validation loss is the LDM's diffusion loss: "
                        "set eval.val_every=0 for task=autoencoder (eval/recon.py scores autoencoders)")
    try:
        check_autoencoder_plan(ae, cfg.autoencoder_loss, cfg.deepspeed.zero.stage, cfg.data.resolution)
    except ValueError as exc:
        problems.append(str(exc))
    if cfg.data.buckets.enabled and cfg.data.buckets.step % ae.downsample_factor:
        problems.append(f"data.buckets.step={cfg.data.buckets.step} is not a multiple of the autoencoder's factor "
                        f"f={ae.downsample_factor}: set data.buckets.step to a multiple of {ae.downsample_factor}")
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


def check_text_embeddings(cfg: Config, spec: LDMSpec) -> Optional[str]:
    """The problem with ``data.text_embeddings=true`` for these shards and this model, or None: every
    set has a ``text_encoder`` record, all from one encoder, and it is the experiment's (by its
    configuration; the weights' fingerprint is checked once the encoder is built, in the task)."""
    from ldm_scale.data import text_embeddings

    shard_storage = storage.resolve(cfg.data.storage, cfg.storage, key="data.storage")
    try:
        # Held-out shards are read with the same data settings, so they need the same embeddings.
        record, where = text_embeddings.read_text_record(list(cfg.data.urls) + list(cfg.eval.val_data), shard_storage)
    except text_embeddings.TextEmbeddingError as exc:
        return str(exc)
    except OSError as exc:
        return f"data.text_embeddings=true but the shard sets' dataset.json cannot be read: {storage.redact(exc)}"
    return text_embeddings.identity_problem(record, spec.cond_stage, where)


def validate(cfg: Config, world_size: Optional[int] = None, *, check_files: bool = True) -> Plan:
    """Check the whole configuration and derive the plan; raise :class:`ConfigError` listing every problem.

    With ``train.stages`` every stage's configuration is checked (``config/stages.py``), each
    problem prefixed by its stage, and the plan is the first stage's (the loop asks for the others).
    """
    if not cfg.train.stages:
        return _validate_one(cfg, world_size, check_files=check_files)
    from ldm_scale.config.stages import stage_configs

    per_stage: List[List[str]] = []
    plans = []
    for _, _, stage_cfg in stage_configs(cfg):
        try:
            plans.append(_validate_one(stage_cfg, world_size, check_files=check_files))
            per_stage.append([])
        except ConfigError as exc:
            lines = str(exc).replace("invalid configuration:", "").strip().splitlines()
            per_stage.append([line.strip().lstrip("- ") for line in lines if line.strip()])
    # A problem of every stage is the base configuration's: said once, without a stage.
    common = [p for p in per_stage[0] if all(p in other for other in per_stage[1:])]
    problems = common + [f"train.stages[{i}]: {p}" for i, found in enumerate(per_stage) for p in found
                         if p not in common]
    if problems:
        raise ConfigError.of(problems)
    return plans[0]


def _validate_one(cfg: Config, world_size: Optional[int] = None, *, check_files: bool = True) -> Plan:
    """:func:`validate` of one stage's (or an unstaged run's) configuration.

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
    if not problems and check_files and cfg.data.input == "latent":
        from ldm_scale.data.latents import bucket_record_problem

        try:
            problem = bucket_record_problem(cfg.data, storage.resolve(cfg.data.storage, cfg.storage, key="data.storage"))
        except OSError:  # an unlistable glob: the loader reports it, naming the URL and the fix
            problem = None
        if problem:
            problems.append(problem)
    if not problems and check_files and spec is not None and cfg.data.text_embeddings:
        problem = check_text_embeddings(cfg, spec)
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
