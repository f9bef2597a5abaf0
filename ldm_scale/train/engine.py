"""DeepSpeed, applied from outside the single-device model code.

This is the only training module that imports ``deepspeed`` (lazily, inside the functions that
need it, so the config dataclasses here can be composed without loading DeepSpeed). It turns the typed Hydra slices
(:class:`DeepSpeedConfig`, :class:`OptimConfig`) and the derived batch plan into a DeepSpeed config
dict, builds AdamW with decoupled weight decay (Loshchilov & Hutter 2019) and a warmup + decay
schedule, and initialises the engine.

Order of application (see STYLE.md, principle 2):
  1. trainable modules are built inside :func:`model_init_context` (``deepspeed.zero.Init`` under
     ZeRO-3, so a 1.45B model is partitioned as it is constructed and never exists whole on a rank);
  2. activation checkpointing is switched on by the model's own ``set_activation_checkpointing``;
  3. ``train.compile`` compiles the networks or their blocks in place (:mod:`ldm_scale.train.compile`:
     state-dict keys unchanged; under ZeRO-3 :func:`initialize_engine` makes compiled blocks leaves);
  4. :func:`initialize_engine` wraps the trainable module (never the frozen autoencoder / frozen
     text encoder: those stay plain modules, unsharded, outside the optimizer and the checkpoint).

DeepSpeed's JIT-built C++ ops (where they are built, build locks, compiler output, the CPU comm op
that is skipped) are handled by :mod:`ldm_scale.train.ds_ops` before DeepSpeed first starts.

Why one module of ~540 lines: it is the training side's whole DeepSpeed adapter by design (the
rule above: one place that imports DeepSpeed, so a DeepSpeed upgrade is read against one file):
the config translation and engine construction, the step-status and optimizer accessors the loop
reads, and the ZeRO accessors and checkpoint calls the EMA, the checkpoint manager and the export
use (the section at its end). The JIT op handling is split out (``train/ds_ops.py``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ldm_scale.choices import Choice
from ldm_scale.train import compile as compile_lib
from ldm_scale.train import ds_ops
from ldm_scale.train import precision as precision_policy
from ldm_scale.train.precision import FrozenPrecision, Precision

log = logging.getLogger(__name__)

PRECISIONS = tuple(Precision.values())


class LRSchedule(Choice):
    """``optim.schedule``: the decay after the linear warmup."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class AdamWImplementation(Choice):
    """``optim.implementation``: which torch AdamW kernel (``auto``: fused, see :func:`adamw_kernel`)."""

    auto = "auto"
    fused = "fused"
    foreach = "foreach"
    for_loop = "for_loop"


LR_SCHEDULES = tuple(LRSchedule.values())


@dataclass
class ZeroConfig:
    """ZeRO partitioning (Rajbhandari et al. 2020): 1 = optimizer states, 2 = + gradients, 3 = + parameters."""

    stage: int = 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    offload_optimizer: bool = False  # optimizer states + step on the CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # stage 3 only: parameter shards live in pinned CPU memory
    pin_memory: bool = True
    # Stage-3 knobs. Parameters smaller than the persistence threshold stay unpartitioned (cheap to
    # keep, expensive to gather every layer); tests that check partitioning set it to 0.
    stage3_param_persistence_threshold: int = 100_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000


@dataclass
class DeepSpeedConfig:
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: Precision = "bf16"  # fp16 uses dynamic loss scaling
    # Always explicit: DeepSpeed's own default changed from off to 1.0 in 0.19.3.
    gradient_clipping: float = 1.0
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2
    fp16_min_loss_scale: float = 1.0
    # Reduce gradients in fp32 even when training in bf16/fp16 (slower, more exact). None = DeepSpeed's choice.
    communication_data_type: Optional[str] = None
    # Dtype of a frozen text encoder: auto = the run's half precision on CUDA, fp32 on CPU
    # (train/precision.py, which also says why the first stage stays fp32); or fp32 | bf16 | fp16.
    frozen_precision: FrozenPrecision = "auto"
    # CUDA only: TF32 tensor cores for the fp32 matmuls and convolutions that remain (frozen parts,
    # fp32 runs). ~8x the fp32 matmul rate on A100/H100 at 10-bit mantissa inputs; ignored on CPU.
    tf32: bool = True
    # Memory format of the trainable conv stacks (and the inputs they get): channels_last lets cuDNN
    # pick its NHWC convolution kernels under bf16/fp16. ZeRO-1/2 only (ZeRO-3 keeps flat shards).
    channels_last: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a constant / cosine / linear decay of the learning rate."""

    lr: float = 1.0e-4
    # CompVis scaled base_learning_rate by the global batch; set to use lr * global_batch / lr_reference_batch.
    scale_lr: bool = False
    lr_reference_batch: int = 1
    # torch AdamW kernel: auto = fused (one kernel over all parameters; torch has CUDA and CPU
    # kernels), or fused | foreach | for_loop. Offloaded optimizers use DeepSpeedCPUAdam.
    implementation: AdamWImplementation = "auto"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: LRSchedule = "constant"
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak lr
    decay_steps: Optional[int] = None  # steps over which the decay runs; None = train.max_steps


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic DeepSpeed checks: global = micro x accumulation x data-parallel world."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def peak_lr(optim: OptimConfig, plan: BatchPlan) -> float:
    if optim.scale_lr:
        return optim.lr * plan.global_batch_size / optim.lr_reference_batch
    return optim.lr


def build_ds_config(ds: DeepSpeedConfig, plan: BatchPlan) -> Dict[str, Any]:
    """The DeepSpeed JSON config for one run, derived from the typed Hydra slice."""
    if ds.precision not in PRECISIONS:
        raise ValueError(f"deepspeed.precision={ds.precision!r}: expected one of {PRECISIONS}")
    z = ds.zero
    zero: Dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_scatter": z.reduce_scatter,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": z.pin_memory}
    if z.stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": z.stage3_param_persistence_threshold,
            "stage3_prefetch_bucket_size": z.stage3_prefetch_bucket_size,
            "stage3_max_live_parameters": z.stage3_max_live_parameters,
            "stage3_max_reuse_distance": z.stage3_max_reuse_distance,
            # Consolidated 16-bit weights are produced by our export path, not on every save.
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if z.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": z.pin_memory}
    config: Dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": ds.fp16_loss_scale_window,
            "hysteresis": ds.fp16_hysteresis,
            "min_loss_scale": ds.fp16_min_loss_scale,
        },
        # Our logger reports progress; DeepSpeed's own periodic prints stay off.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.communication_data_type is not None:
        config["communication_data_type"] = ds.communication_data_type
    return config


def model_init_context(ds_config: Dict[str, Any]) -> contextlib.AbstractContextManager:
    """Context to construct *trainable* modules in: ``zero.Init`` under ZeRO-3, else a no-op.

    Under ZeRO-3 each parameter is partitioned right after its module's ``__init__`` so no rank ever
    holds the whole model. Build frozen modules outside this context.
    """
    zero = ds_config["zero_optimization"]
    if zero["stage"] != 3:
        return contextlib.nullcontext()
    ds_ops.prepare()  # before DeepSpeed's comm backend starts (it may JIT-build an op)
    import deepspeed

    if torch.distributed.is_initialized():
        # zero.Init reads the world size from deepspeed.comm, which otherwise is only set up by
        # deepspeed.initialize (later): adopt the process group dist.init_distributed created.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    remote_device = "cpu" if "offload_param" in zero else None
    return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote_device,
                               pin_memory=bool(zero.get("offload_param", {}).get("pin_memory", False)))


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters split so that biases and norm gains (ndim <= 1) get no weight decay."""
    decay, no_decay = [], []
    for _, param in module.named_parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 the local tensor is a flat shard; the original shape is in ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the module given to the engine has no trainable parameters")
    return groups


def lr_multiplier(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then the decay."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = optim.decay_steps or max(total_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / decay_steps, 1.0)
    if optim.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif optim.schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r}: expected one of {LR_SCHEDULES}")
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def _optimizer_section(optim: OptimConfig, plan: BatchPlan, offload: bool) -> Dict[str, Any]:
    params: Dict[str, Any] = {
        "lr": peak_lr(optim, plan), "betas": list(optim.betas), "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not offload:
        # torch.optim.AdamW: no JIT-built fused kernel needed; DeepSpeedCPUAdam is used with offload.
        params["torch_adam"] = True
        params.update(adamw_kernel(optim.implementation))
    return {"type": "AdamW", "params": params}


ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def adamw_kernel(implementation: str) -> Dict[str, Any]:
    """torch.optim.AdamW keyword arguments for ``optim.implementation`` (DeepSpeed passes them on).

    ``auto`` is the fused kernel on every device: on CUDA one launch for all parameters instead of
    several per tensor; on CPU (torch >= 2.4 has a fused CPU kernel) measured 4x faster than torch's
    default for-loop AdamW and 3.4x faster than foreach (11.3M parameters in 864 tensors, 1 thread:
    19.9 / 81.1 / 67.6 ms per step; RESULTS.md, training spine)."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation={implementation!r}: expected one of {ADAMW_IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "fused"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def configure_device_math(ds: DeepSpeedConfig) -> None:
    """Process-wide numerics of the device: TF32 for fp32 matmuls/convolutions on CUDA."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = ds.tf32
        torch.backends.cudnn.allow_tf32 = ds.tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes per run: pick the fastest conv kernels once


def apply_memory_format(module: nn.Module, ds: DeepSpeedConfig) -> nn.Module:
    """Put the 4-D weights of ``module`` in channels_last when ``deepspeed.channels_last`` is set
    (before the engine wraps it, so DeepSpeed's flat bf16 / fp32 copies keep that layout)."""
    if ds.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def to_memory_format(x: torch.Tensor, ds: DeepSpeedConfig) -> torch.Tensor:
    """Inputs of a channels_last model in channels_last (a no-op copy otherwise)."""
    if ds.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def initialize_engine(module: nn.Module, ds_config: Dict[str, Any], optim: OptimConfig,
                      plan: BatchPlan, total_steps: int):
    """Wrap the trainable `module` in a DeepSpeed engine with AdamW and the lr schedule.

    Returns the ``deepspeed.DeepSpeedEngine``; its ``optimizer`` and ``lr_scheduler`` are attached.
    The schedule is stepped by DeepSpeed on each applied optimizer step (not on fp16 overflow skips).
    """
    ds_ops.prepare()  # JIT op builds (comm op, cpu_adam with offload): see ds_ops
    import deepspeed

    config = dict(ds_config)
    offload = "offload_optimizer" in config["zero_optimization"]
    # Without ZeRO in fp32 DeepSpeed clips with a per-tensor Python loop (deepspeed.runtime.utils.
    # clip_grad_norm_: a norm kernel and a multiply per tensor); there our checked step clips
    # instead, with the multi-tensor norm it needs for the finiteness check anyway.
    plain = config["zero_optimization"]["stage"] == 0 and not (config["bf16"]["enabled"] or config["fp16"]["enabled"])
    clip = float(config.get("gradient_clipping", 0.0))
    if plain:
        config["gradient_clipping"] = 0.0
    config["optimizer"] = _optimizer_section(optim, plan, offload)
    if config["zero_optimization"]["stage"] == 3:
        # Compiled blocks become ZeRO-3 "leaf" modules: their parameters are gathered once at the
        # block's entry and no ZeRO hook fires inside a compiled graph (train/compile.py).
        for block in compile_lib.zero3_leaf_modules(module):
            deepspeed.utils.set_z3_leaf_module(block, True)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, optim, total_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, optim.weight_decay), config=config,
        lr_scheduler=make_scheduler)
    _guard_unchecked_optimizer(engine, clip)
    stage = config["zero_optimization"]["stage"]
    if engine.dp_world_size == 1 and stage in (1, 2) and not offload and engine.global_rank == 0:
        # Measured (benchmarks/RESULTS.md, training spine): ZeRO-2 at one rank costs 1.7x the step
        # of a bare loop on CPU, ZeRO-0 1.07x: per-parameter bucket hooks in backward, copies into
        # the flat partition and back, a per-tensor norm loop; with no peer, none of it buys memory.
        log.warning("deepspeed.zero.stage=%d with one data-parallel rank shards nothing and only adds "
                    "DeepSpeed's bucketing and copies to every step: use deepspeed.zero.stage=0 (or "
                    "zero.offload_optimizer=true to save GPU memory)", stage)
    if engine.dp_world_size == 1 and stage <= 1:
        # No data-parallel peers: DeepSpeed would still flatten every gradient into buckets and
        # "all-reduce" them with itself, a full copy of the gradients per step.
        engine.enable_backward_allreduce = False
    return engine


def _guard_unchecked_optimizer(engine, clip: float) -> None:
    """Make DeepSpeed skip non-finite updates in the one mode where it does not check for them.

    Every DeepSpeed optimizer wrapper (ZeRO 1-3, bf16, fp16) checks the gradients and sets an
    ``overflow`` flag that makes the engine skip the update (``was_step_applied() is False``). ZeRO
    disabled in fp32 hands the step to the plain torch optimizer, which would write NaN into the
    weights. There the step is wrapped with the same check and the same flag, and clips the
    gradients to ``clip`` (0: no clipping) with the global norm the check computed, which the
    engine then reports (``get_global_grad_norm``) as the ZeRO wrappers' norms are.
    """
    optimizer = engine.optimizer
    if optimizer is None or hasattr(optimizer, "overflow"):
        return
    plain_step = optimizer.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            optimizer.overflow = False
            return plain_step(*args, **kwargs)
        # One multi-tensor 2-norm (NaN/inf elements make it non-finite, as does a gradient too
        # large to square in fp32: the ZeRO wrappers call that an overflow too) and one host sync,
        # in this fp32/no-ZeRO mode only (the ZeRO wrappers do the same internally).
        # (torch._foreach_* directly, as torch.nn.utils.clip_grad_norm_ does inside: its split into
        # get_total_norm / clip_grads_with_norm_ is torch >= 2.6, older than the GPU image may be.)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        optimizer._global_grad_norm = norm  # the engine copies it after the step
        finite = bool(torch.isfinite(norm))
        optimizer.overflow = not finite
        if not finite:
            return None
        if clip > 0:
            torch._foreach_mul_(grads, (clip / (norm + 1e-6)).clamp(max=1.0))
        return plain_step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = checked_step


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that writes the weights (or, under ZeRO, their fp32 masters): DeepSpeed's
    ZeRO / bf16 wrappers keep it as ``.optimizer``; without ZeRO in fp32 it is the engine's own."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def step_status(engine, ds_config: Dict[str, Any]) -> Tuple[bool, Any, bool]:
    """(applied, global grad norm, fp16 loss scale still above its floor) of the engine's last
    optimizer step, read without a host sync (the norm may be a device tensor)."""
    applied = bool(engine.was_step_applied())
    searching = False
    if ds_config["fp16"]["enabled"]:
        optimizer = engine.optimizer
        scale = getattr(optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
        searching = scale is not None and float(scale) > float(ds_config["fp16"]["min_loss_scale"])
    return applied, engine.get_global_grad_norm(), searching


def autocast(ds_config: Dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes of an engine's module (``train/precision.py``)."""
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    return precision_policy.autocast(precision, device)


def engine_stats(engine) -> Dict[str, float]:
    """lr, global grad norm (after clipping is decided) and the fp16 loss scale of the last step."""
    stats: Dict[str, float] = {"lr": float(engine.get_lr()[0])}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        stats["grad_norm"] = float(grad_norm)
    if engine.fp16_enabled():
        optimizer = engine.optimizer
        scale = getattr(optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
        if scale is not None:
            stats["loss_scale"] = float(scale)
    stats["overflow_skipped_steps"] = float(engine.skipped_steps)
    return stats


def iter_local_param_bytes(engine) -> Iterator[int]:
    """Bytes of parameter storage held by this rank (the local shard under ZeRO-3)."""
    for param in engine.module.parameters():
        local = getattr(param, "ds_tensor", None)
        tensor = local if local is not None else param.data
        yield tensor.numel() * tensor.element_size()


def optimizer_state_bytes(engine) -> int:
    """Bytes this rank holds for the optimizer beyond the module's parameters: fp32 master weights
    (the tensors the wrapped optimizer updates) and the Adam moments; each storage counted once."""
    seen = {p.data_ptr() for p in engine.module.parameters() if p.numel() > 0}
    seen |= {p.ds_tensor.data_ptr() for p in engine.module.parameters() if getattr(p, "ds_tensor", None) is not None}
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.numel() > 0 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for master in group["params"]:
            add(master)
    # ZeRO-3 swaps its flat fp32 partitions into the wrapped optimizer only during step().
    for t in getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []:
        add(t)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    return total


def local_param_and_optimizer_bytes(engine) -> int:
    return sum(iter_local_param_bytes(engine)) + optimizer_state_bytes(engine)


# ---------------------------------------------------------------------------------------------
# ZeRO accessors and checkpoint calls for the EMA, the checkpoint manager and the export: every
# DeepSpeed call of the training side goes through this module.
# ---------------------------------------------------------------------------------------------
def local_fp32_partition(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of a ZeRO-3 parameter (the optimizer's; no gather)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


def full_fp32_param(param: nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of a ZeRO-3 parameter, assembled from its partitions (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def gathered_parameters(params: List[nn.Parameter], modifier_rank: Optional[int]) -> contextlib.AbstractContextManager:
    """ZeRO-3 parameters whole for a ``with`` block (a collective). ``modifier_rank``: the rank whose
    writes DeepSpeed broadcasts on exit, None for a read-only gather."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def initialize_partitioned(module: Optional[nn.Module]) -> int:
    """Run every ``initialize_weights()`` inside ``module`` on parameters ``zero.Init`` partitioned.

    Under ZeRO-3 every parameter is partitioned when its own module's ``__init__`` returns, so an
    initialisation applied after a layer is built (the UNet's zero-initialised output layers, the
    text transformer's N(0, 0.02) embeddings, the DiT's Xavier / adaLN-Zero rules) writes to empty
    local tensors and is lost: the network would start from PyTorch's default init instead. This
    gathers each such module's parameters whole (a collective, once at build time), applies its
    ``initialize_weights`` on every rank (the same RNG draws, so the ranks' random streams stay in
    step) and keeps rank 0's values, which DeepSpeed broadcasts. Returns how many modules it ran
    (0: nothing partitioned, or nothing to run)."""
    if module is None or not any(hasattr(p, "ds_id") for p in module.parameters()):
        return 0
    targets = [m for m in module.modules() if callable(getattr(m, "initialize_weights", None))]
    for target in targets:
        with gathered_parameters(list(target.parameters()), modifier_rank=0):
            target.initialize_weights()
    return len(targets)


def load_engine_checkpoint(engine, load_dir: str, tag: str, *, universal: bool):
    """``engine.load_checkpoint`` of ``<load_dir>/<tag>`` with module, optimizer and lr scheduler
    states; ``universal``: the files are a universal checkpoint (another world size). Returns the
    path DeepSpeed loaded (None: nothing found)."""
    # DeepSpeed reads `load_universal_checkpoint` from its (private) config at load time only, so it
    # is switched on just for this call.
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    scheduler = getattr(engine, "lr_scheduler", None)  # (test doubles of the engine have none)
    configured = list(scheduler.base_lrs) if scheduler is not None else None
    try:
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = previous
    if path is not None and configured is not None and list(scheduler.base_lrs) != configured:
        # The checkpoint's scheduler state brings the peak rate it was saved with; the schedule is
        # this configuration's over the restored step (a training stage, config/stages.py, sets
        # its own optim.lr). Unchanged settings never reach here, so a plain resume stays bitwise.
        scheduler.base_lrs = configured
        for group, base, rule in zip(scheduler.optimizer.param_groups, configured, scheduler.lr_lambdas):
            group["lr"] = base * rule(scheduler.last_epoch)  # LambdaLR's own formula
    return path


def universal_conversion_command(src: str, dst: str) -> List[str]:
    """The command that converts a DeepSpeed checkpoint folder to a universal one (run in a process
    of its own: the converter forks workers)."""
    import sys

    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
            "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1",
            "--inject_missing_state"]


def fp32_state_dict_from_zero_checkpoint(step_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """Full fp32 state dict consolidated from a ZeRO (1-3) checkpoint's shards, one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(step_dir, tag=tag))


__all__: List[str] = [
    "ZeroConfig", "DeepSpeedConfig", "OptimConfig", "BatchPlan", "build_ds_config",
    "model_init_context", "param_groups", "lr_multiplier", "initialize_engine", "autocast",
    "engine_stats", "step_status", "inner_optimizer", "adamw_kernel", "configure_device_math", "apply_memory_format",
    "to_memory_format", "local_param_and_optimizer_bytes", "peak_lr", "local_fp32_partition",
    "full_fp32_param", "gathered_parameters", "load_engine_checkpoint", "universal_conversion_command",
    "fp32_state_dict_from_zero_checkpoint",
]
