"""What one training step computes, per task (``task: ldm | autoencoder`` in the config).

A task builds its parts (frozen modules outside DeepSpeed, trainable ones inside
``engine.model_init_context``), owns its engines, and exposes to the loop (``train/loop.py``):

- ``engines``: ``{name: DeepSpeedEngine}``, checkpointed by name;
- ``train_step(micro_batches, step) -> StepOutput``: one optimizer step over the accumulation
  micro-batches (forward, backward, engine step each). It returns device tensors only: metric
  (sum, count) pairs and this rank's health vector, judged by ``train/health.py`` in the loop;
- ``optimizer_stats() -> dict[str, float]``: lr, grad norm, loss scale;
- ``ema_module``: the module whose weights the CPU EMA tracks (or None);
- ``client_state() / load_client_state(d)``: task numbers that go into every checkpoint;
- ``log_images(step) -> list[(key, images[N,3,H,W], captions)]``: sample grids (every rank calls);
- optionally ``caption_tokenizer()``: a picklable tokenizer the loop hands the data workers, so
  batches arrive with ``tokens`` and the step never tokenises (None or absent: no captions).

The autoencoder task lives in ``train/autoencoder_task.py``; :func:`build_task` selects one.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ldm_scale import dist
from ldm_scale import storage as storage_lib
from ldm_scale.config import Config, ConfigError, EvalConfig, ModelConfig, Plan, TrainConfig
from ldm_scale.data import text_embeddings
from ldm_scale.data.buckets import make_buckets
from ldm_scale.data.device import unit_range
from ldm_scale.data.text_embeddings import PrecomputedText
from ldm_scale.diffusion import (
    DiffusionConfig,
    SamplerConfig,
    diffusion_loss,
    drop_conditions,
    latent_moments,
    scale_factor_from_moments,
)
from ldm_scale.diffusion.flow import flow_loss
from ldm_scale.diffusion.noise import PerSampleGenerators, initial_noise
from ldm_scale.images import letterbox
from ldm_scale.models.conditioners import HostConditioner, build_conditioner
from ldm_scale.models.ldm import LatentDiffusion, apply_denoiser
from ldm_scale.models.micro_conditioning import batch_micro, sampling_micro
from ldm_scale.models.registry import LDMSpec, build_denoiser, denoiser_inputs
from ldm_scale.storage import StorageConfig
from ldm_scale.train import compile as compile_lib
from ldm_scale.train import engine as ds_engine
from ldm_scale.train import health, precision
from ldm_scale.train.first_stage import build_first_stage, load_first_stage  # noqa: F401 - re-exported
from ldm_scale.train.health import LOSS_SCALE_KEY, StepOutput

log = logging.getLogger(__name__)


# Conditioners the paper trains jointly with the UNet (its text transformer, class embeddings).
JOINTLY_TRAINED_CONDITIONERS = ("text", "class")


class DiffusionTrainModule(nn.Module):
    """The module DeepSpeed wraps for task=ldm: the UNet and, when trained jointly, the conditioner.

    ``forward(z0, condition)`` returns the per-sample diffusion loss (Rombach et al. 2022, Eq. 2) and
    the timesteps drawn. ``condition`` is the raw condition when the conditioner is a submodule
    (trained jointly: it runs inside the engine, with gradients and ZeRO-3's gathers), else the frozen
    conditioner's output dict, which the task computes outside. The frozen first stage and a frozen
    conditioner are not held here at all: they are neither sharded, nor in the optimizer, nor
    re-saved with every checkpoint. State-dict keys (``unet.*``, ``cond_stage.*``) match
    :class:`LatentDiffusion`'s.
    """

    def __init__(self, unet: nn.Module, cond_stage: Optional[nn.Module], diffusion: DiffusionConfig):
        super().__init__()
        self.unet = unet
        if cond_stage is not None:
            self.cond_stage = cond_stage
        self.diffusion = diffusion
        self._schedule = diffusion.make_schedule()
        self._schedule_device: Optional[torch.device] = None

    @property
    def conditions_inside(self) -> bool:
        """Whether :meth:`forward` takes the raw condition (a jointly trained conditioner)."""
        return "cond_stage" in self._modules

    def schedule(self, device: torch.device):
        if self._schedule_device != device:
            self._schedule = self._schedule.to(device)
            self._schedule_device = device
        return self._schedule

    def forward(self, z0: torch.Tensor, condition: Any, t: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None,
                micro: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``t`` and ``noise`` are drawn when not given (training); the validation loss fixes both.
        ``micro``: SDXL's size / crop values [B, 6] for a micro-conditioned denoiser (never dropped
        with the condition: SDXL trains and samples with them always present)."""
        cond = self.cond_stage(condition) if self.conditions_inside else condition
        if micro is not None:
            cond = {**cond, "micro": micro}
        d = self.diffusion
        model_fn = functools.partial(apply_denoiser, self.unet, cond=cond)
        if d.is_flow:
            if t is not None and not t.is_floating_point():
                # Validation passes the same integer timesteps to every objective: k of T is t = k / T.
                t = t.float() / d.num_timesteps
            return flow_loss(model_fn, z0, timesteps=d.flow_timesteps, logit_mean=d.logit_mean,
                             logit_std=d.logit_std, shift=d.flow_shift, t=t, noise=noise)
        return diffusion_loss(model_fn, z0, self.schedule(z0.device),
                              parameterization=d.parameterization, weighting=d.weighting,
                              min_snr_gamma=d.min_snr_gamma, offset_noise=d.offset_noise, t=t, noise=noise)


def _raw_condition(batch: Dict[str, Any], conditioning: str) -> Any:
    if conditioning == "text":  # the precomputed encoder outputs, or tokens when the workers tokenised
        if "text_context" in batch:
            return batch["text_context"]
        return batch["tokens"] if "tokens" in batch else list(batch["caption"])
    if conditioning == "class":
        return batch["label"]
    return None


class LDMTask:
    """Latent diffusion training (Rombach et al. 2022, Sec. 3.2-3.3) on images or pre-encoded latents."""

    def __init__(self, plan: Plan, *, model: ModelConfig, diffusion: DiffusionConfig,
                 deepspeed: ds_engine.DeepSpeedConfig, optim: ds_engine.OptimConfig, train: TrainConfig,
                 eval_cfg: EvalConfig, conditioning: str, storage: StorageConfig, seed: int, device: torch.device,
                 total_steps: int, precomputed_text: Optional[PrecomputedText] = None,
                 bucket_sizes: Sequence[Tuple[int, int]] = ()):
        """The config slices the task reads (:func:`build_task` passes them from the run's config);
        ``plan`` is what ``validate()`` derived (the resolved spec, batch plan, sizes);
        ``precomputed_text``: the shards carry the frozen text encoder's outputs
        (``data.text_embeddings``); ``bucket_sizes``: the (width, height) of each aspect bucket the
        run trains on (``data.buckets``), one grid image each."""
        assert plan.spec is not None, "validate() resolves the LDM spec for task=ldm"
        spec: LDMSpec = plan.spec
        self.plan, self.spec, self.device = plan, spec, device
        self.diffusion, self.deepspeed, self.train_cfg, self.eval_cfg = diffusion, deepspeed, train, eval_cfg
        self.conditioning = conditioning
        self.bucket_sizes = list(bucket_sizes)
        self.ds_config = ds_engine.build_ds_config(deepspeed, plan.batch)

        # 1. Frozen parts, outside DeepSpeed (never sharded, never in the optimizer or checkpoints).
        #    The first stage keeps fp32 storage (it is exported and decodes samples) and computes
        #    under the run's autocast; a frozen text encoder is stored in the policy's frozen dtype
        #    (train/precision.py).
        first_stage = build_first_stage(model, spec, device, storage)
        joint = spec.cond_stage.kind in JOINTLY_TRAINED_CONDITIONERS
        frozen = precision.frozen_dtype(deepspeed.precision, deepspeed.frozen_precision, device)
        self.frozen_dtype, self.precomputed_text = frozen, precomputed_text
        if precomputed_text is not None:
            # The step reads the encoder's outputs from the shards: the encoder stays on the host
            # (fp32), only for prompt grids and in-training evaluation, and it must be the one that
            # wrote them (validate() compared the configuration; this compares the weights).
            host = build_conditioner(spec.cond_stage).float().eval()
            try:
                text_embeddings.check_weights(precomputed_text.record, host, precomputed_text.where)
            except text_embeddings.TextEmbeddingError as exc:  # exit 2 with the fix, as validate()'s problems
                raise ConfigError.of([str(exc)]) from None
            cond_stage = HostConditioner(host, device)
            log.info("text conditioning: precomputed %s outputs from %s (encoder on the host, not in the step)",
                     precomputed_text.record.get("arch"), precomputed_text.where)
        else:
            cond_stage = None if joint else build_conditioner(spec.cond_stage).to(device=device, dtype=frozen)

        # 2. Trainable parts; under ZeRO-3 partitioned as they are constructed. Same seed on every
        #    rank so ZeRO-1/2 replicas start equal (DeepSpeed also broadcasts rank 0's weights).
        torch.manual_seed(seed)
        with ds_engine.model_init_context(self.ds_config):
            unet = build_denoiser(spec)  # the UNet or DiT (named `unet` in every state dict)
            if joint:
                cond_stage = build_conditioner(spec.cond_stage)
        ds_engine.initialize_partitioned(unet)  # ZeRO-3: the post-construction init, on gathered shards
        ds_engine.initialize_partitioned(cond_stage if joint else None)
        unet.set_activation_checkpointing(model.activation_checkpointing)
        self.ldm = LatentDiffusion(unet, first_stage, cond_stage, spec.scale_factor, spec.parameterization)
        self.ldm.to(device)
        self.train_module = DiffusionTrainModule(
            unet, cond_stage if getattr(cond_stage, "trainable", False) else None, diffusion)
        # Compiled after activation checkpointing, before DeepSpeed wraps it (train/compile.py).
        compile_lib.log_compiled("trainable", compile_lib.apply_compile(
            self.train_module, train.compile, zero_stage=self.ds_config["zero_optimization"]["stage"]))
        compile_lib.log_compiled("frozen", compile_lib.apply_frozen_compile(first_stage, train.compile))

        # 3. The engine wraps only the trainable module (in channels_last first, when asked).
        ds_engine.configure_device_math(deepspeed)
        ds_engine.apply_memory_format(self.train_module, deepspeed)
        self.engine = ds_engine.initialize_engine(self.train_module, self.ds_config, optim, plan.batch,
                                                  total_steps)
        self.scale_factor_ready = model.scale_factor_mode == "spec"
        # Per-rank noise / dropout stream (the global torch RNG, saved in rng_rank<R>.pt by checkpoints).
        torch.manual_seed(seed + 7919 * (dist.get_dist_info().rank + 1))

    # ----------------------------------------------------------------------------- loop interface
    @property
    def engines(self) -> Dict[str, Any]:
        return {"model": self.engine}

    @property
    def ema_module(self) -> nn.Module:
        """The EMA tracks the UNet only, as CompVis' ``LitEma(self.model)`` (the diffusion wrapper)
        does: a jointly trained text encoder is sampled and exported with its raw weights, so keeping
        its average would cost CPU memory and update time (2.2 GB fp32 for the 1.45B model's
        543M-parameter transformer) for nothing. Names stay ``unet.*`` as in LatentDiffusion."""
        return nn.ModuleDict({"unet": self.train_module.unet})

    def client_state(self) -> Dict[str, Any]:
        return {"scale_factor": float(self.ldm.scale_factor), "scale_factor_ready": self.scale_factor_ready}

    def load_client_state(self, state: Dict[str, Any]) -> None:
        if "scale_factor" in state:
            self.ldm.scale_factor.fill_(float(state["scale_factor"]))
            self.scale_factor_ready = bool(state.get("scale_factor_ready", True))

    def optimizer_stats(self) -> Dict[str, float]:
        return ds_engine.engine_stats(self.engine)

    def caption_tokenizer(self) -> Optional[Callable[[List[str]], torch.Tensor]]:
        """The text encoder's tokenizer for the data workers (None: no captions to tokenise)."""
        if self.conditioning != "text" or self.precomputed_text is not None:
            return None
        return getattr(self.ldm.cond_stage, "caption_tokenizer", None)

    def _null_condition(self, raw: Any) -> Callable[[int], Any]:
        """The raw null condition of ``raw``'s kind, for condition dropout: the precomputed empty
        prompt's outputs, the empty prompt's tokens, or the conditioner's own."""
        if self.precomputed_text is not None:
            return self.precomputed_text.null
        if self.conditioning == "text" and isinstance(raw, torch.Tensor):
            return functools.partial(self.ldm.cond_stage.null_raw, tokens=True)
        return self.ldm.cond_stage.null_raw

    def _condition(self, raw: Any) -> Any:
        """What the engine's forward takes: the raw condition for a jointly trained conditioner,
        else the frozen conditioner's output dict (precomputed: the stored outputs, in the dtype the
        frozen encoder would have produced them in)."""
        if self.train_module.conditions_inside:
            return raw
        if self.precomputed_text is not None:
            return {"context": raw.to(self.frozen_dtype)}
        return self.ldm.condition(raw)

    def _autocast(self):
        return ds_engine.autocast(self.ds_config, self.device)

    @torch.no_grad()
    def _unscaled_latents(self, batch: Dict[str, Any]) -> torch.Tensor:
        if "latent_mean" in batch:  # pre-encoded shards: sample the stored posterior
            mean = batch["latent_mean"].to(self.device, non_blocking=True).float()
            logvar = batch["latent_logvar"].to(self.device, non_blocking=True).float()
            return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        images = unit_range(batch["image"].to(self.device, non_blocking=True))
        with self._autocast():
            return self.ldm.first_stage.encode_to_latent(images).float()

    def estimate_scale_factor(self, batch: Dict[str, Any]) -> float:
        """1/std of the first batch's latents over all ranks (paper Sec. 4.3.2), set on the model."""
        moments = latent_moments(self._unscaled_latents(batch)).to(self.device)
        dist.all_reduce_sum(moments)  # every rank's first batch, not rank 0's alone
        factor = scale_factor_from_moments(moments)
        self.ldm.scale_factor.fill_(factor)
        self.scale_factor_ready = True
        if dist.get_dist_info().is_main:
            log.info("latent scale factor %.5f = 1/std of %d first-batch latent values over all ranks",
                     factor, int(moments[0]))
        return factor

    def train_step(self, micro_batches: Sequence[Dict[str, Any]], step: int) -> StepOutput:
        """One optimizer step over the accumulation micro-batches: per micro-batch encode -> drop
        conditions -> diffusion loss -> backward -> engine step (DeepSpeed applies the update on the
        last one). Nothing here waits on the device: the metrics and the health vector stay there.

        A non-finite loss is *not* checked before backward (that would be one host sync and one
        collective per micro-batch): its non-finite gradients reach every rank through the gradient
        reduction, DeepSpeed's overflow check then skips the update on every rank alike, and
        :class:`~ldm_scale.train.health.StepHealth` counts the step as skipped.
        """
        self.engine.train()
        loss_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        buckets = self.train_cfg.timestep_buckets
        bucket_sum = torch.zeros(buckets, device=self.device)
        bucket_count = torch.zeros(buckets, device=self.device)
        width = math.ceil(self.diffusion.num_timesteps / buckets)
        for batch in micro_batches:
            if not self.scale_factor_ready:
                self.estimate_scale_factor(batch)
            z0 = ds_engine.to_memory_format(self._unscaled_latents(batch) * self.ldm.scale_factor, self.deepspeed)
            raw = _raw_condition(batch, self.conditioning)
            raw, _ = drop_conditions(raw, self.diffusion.cond_drop_prob, self._null_condition(raw))
            if isinstance(raw, torch.Tensor):
                raw = raw.to(self.device, non_blocking=True)
            micro = batch_micro(batch, self.device) if self.spec.micro_conditioned else None
            with self._autocast():
                # A frozen conditioner runs here, outside the engine; a joint one inside it.
                per_sample, t = self.engine(z0, self._condition(raw), micro=micro)
            per_sample = per_sample.float() * float(batch.get(LOSS_SCALE_KEY, 1.0))
            loss = per_sample.mean()
            self.engine.backward(loss)
            self.engine.step()
            detached = loss.detach()
            loss_sum += detached
            nonfinite += (~torch.isfinite(detached)).float()
            # Flow times t in [0, 1] fall in the bucket of the timestep k = floor(t T) they stand for.
            steps_t = (t * self.diffusion.num_timesteps).long() if t.is_floating_point() else t
            index = (steps_t // width).clamp(min=0, max=buckets - 1)
            bucket_sum.scatter_add_(0, index, per_sample.detach())
            bucket_count.scatter_add_(0, index, torch.ones_like(per_sample))
        applied, grad_norm, searching = ds_engine.step_status(self.engine, self.ds_config)
        n = len(micro_batches)
        metrics = {"loss": (loss_sum, health.device_scalar(n, self.device))}
        T = self.diffusion.num_timesteps
        for b in range(buckets):
            metrics[f"loss_by_t/{b * width}-{min((b + 1) * width, T) - 1}"] = (bucket_sum[b], bucket_count[b])
        return StepOutput(metrics, health.local_health(loss_sum, n, nonfinite, grad_norm, applied, searching))

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validation_latents(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Unscaled posterior *means* of a held-out batch (evaluation/val_loss.py): deterministic,
        unlike the training path's posterior sample."""
        if "latent_mean" in batch:
            return batch["latent_mean"].to(self.device).float()
        images = batch["image"].to(self.device)
        with self._autocast():
            return self.ldm.first_stage.encode_to_latent(images, deterministic=True).float()

    @torch.no_grad()
    def validation_loss(self, latents: torch.Tensor, batch: Dict[str, Any], t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """Per-sample diffusion loss (the training objective and weighting) at timesteps ``t`` with
        ``noise``, no condition dropout, the engine in eval mode (ZeRO-3 gathers as in training)."""
        z0 = ds_engine.to_memory_format(latents.to(self.device) * self.ldm.scale_factor, self.deepspeed)
        raw = _raw_condition(batch, self.conditioning)
        if isinstance(raw, torch.Tensor):
            raw = raw.to(self.device)
        micro = None
        if self.spec.micro_conditioned:
            # The held-out reader gives square centre crops without the loader's micro values: the
            # model is told "uncropped at this size", as at sampling.
            f = self.spec.first_stage.downsample_factor
            micro = batch_micro(batch, self.device) if "target_size" in batch else \
                sampling_micro(z0.shape[0], z0.shape[-2] * f, z0.shape[-1] * f, self.device)
        self.engine.eval()
        try:
            with self._autocast():
                per_sample, _ = self.engine(z0, self._condition(raw), t=t.to(self.device),
                                            noise=ds_engine.to_memory_format(noise.to(self.device), self.deepspeed),
                                            micro=micro)
        finally:
            self.engine.train()
        return per_sample.float()

    def train_flops_per_sample(self) -> float:
        """FLOPs of one training sample through the trained networks (UNet forward + backward, and
        the jointly trained conditioner's forward + backward), counted once on ``meta`` tensors."""
        from ldm_scale.logging import count_flops

        spec, h = self.spec, self.plan.latent_size
        with torch.device("meta"):
            unet = build_denoiser(spec)
        unet.set_activation_checkpointing(False)  # count model FLOPs, not recomputation
        x, t, kwargs = denoiser_inputs(spec, h, requires_grad=True)

        def step() -> None:
            unet(x, t, **kwargs).float().pow(2).mean().backward()

        total = count_flops(step)
        if "cond_stage" in self.train_module._modules and spec.cond_stage.kind == "text":
            with torch.device("meta"):
                text = build_conditioner(spec.cond_stage)
            tokens = torch.zeros(1, spec.cond_stage.text.max_length, dtype=torch.long, device="meta")
            total += count_flops(lambda: text.encode_tokens(tokens).float().pow(2).mean().backward())
        return total

    def export(self, url: str, *, ema, config: Dict[str, Any], step: int) -> None:
        """Write the single-file exported checkpoint (``train/export.py``; collective under ZeRO-3)."""
        from ldm_scale.train.export import export_ldm

        export_ldm(url, self.ldm, ema, self.spec, config=config, step=step)

    # ----------------------------------------------------------------------------- sampling
    def _eval_conditions(self) -> Tuple[List[Any], List[str]]:
        ev = self.eval_cfg
        if self.conditioning == "text":
            return list(ev.prompts), list(ev.prompts)
        if self.conditioning == "class":
            labels = list(ev.class_labels) or list(range(8))
            return labels, [f"class {c}" for c in labels]
        return [None] * ev.num_unconditional, [""] * ev.num_unconditional

    @torch.no_grad()
    def generate(self, conditions: Sequence[Any], *, seed: int, sampler: SamplerConfig,
                 batch_size: int = 16, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """Images [N,3,H,W] in [-1,1] for ``conditions`` (prompts / labels / None), split over ranks;
        at the training size unless ``height`` / ``width`` are given.

        ``sampling.generate`` on the live model, seeded by the one rule of ``diffusion/noise.py``
        (sample i from (seed, i)): the same prompt and seed give the same image here, in
        ``launch/sample.py`` and in ``eval/fid.py``, whatever the world size. Every rank must call
        this (under ZeRO-3 the forward passes gather shards collectively): each rank gets an equal,
        padded share of the work; all ranks receive the full result.
        """
        from ldm_scale.sampling import LoadedModel
        from ldm_scale.sampling import generate as sample_images

        info = dist.get_dist_info()
        n = len(conditions)
        share = math.ceil(n / info.world_size)
        mine = [min(i, n - 1) for i in range(info.rank * share, (info.rank + 1) * share)]
        was_training = self.train_module.training
        self.train_module.eval()
        live = LoadedModel(model=self.ldm, spec=self.spec, schedule=self.train_module.schedule(self.device),
                           step=None, used_ema=False)
        height, width = height or self.plan.image_size, width or self.plan.image_size
        f = self.spec.first_stage.downsample_factor
        out: List[torch.Tensor] = []
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            out.append(sample_images(
                live, self._batch_raw([conditions[i] for i in idx]), len(idx), sampler, height=height, width=width,
                generator=PerSampleGenerators(seed, idx), precision=self.deepspeed.precision,
                x_T=initial_noise((self.plan.latent_channels, height // f, width // f), idx, seed, self.device)).cpu())
        self.train_module.train(was_training)
        local = torch.cat(out) if out else torch.zeros(0, 3, height, width)
        gathered = dist.all_gather_object(local)
        return torch.cat(gathered)[:n]

    def model_sampler(self, sampler: SamplerConfig, precision: str, *, step: int):
        """The live model as ``eval/fid.py``'s :class:`ModelSampler` (evaluation/in_training.py): the
        same ``sampling.generate`` call the offline sampler makes on a loaded export, with whatever
        weights are in the model now (the loop swaps the EMA in around it)."""
        from ldm_scale.evaluation.model_sampler import ModelSampler
        from ldm_scale.sampling import LoadedModel
        from ldm_scale.sampling import generate as sample_images

        live = LoadedModel(model=self.ldm, spec=self.spec, schedule=self.train_module.schedule(self.device),
                           step=step, used_ema=False)
        size = self.plan.image_size

        def sample_batch(x_T: torch.Tensor, raw: Any, generator) -> torch.Tensor:
            if isinstance(raw, torch.Tensor):
                raw = raw.to(self.device)
            was_training = self.train_module.training
            self.train_module.eval()
            try:
                return sample_images(live, raw, len(x_T), sampler, height=size, width=size, generator=generator,
                                     precision=precision, x_T=x_T)
            finally:
                self.train_module.train(was_training)

        latent = (self.plan.latent_channels, self.plan.latent_size, self.plan.latent_size)
        return ModelSampler(sample_batch, latent, size, self.conditioning,
                            {"step": step, "flavour": self.spec.name, "weights": "live", "precision": precision})

    def _batch_raw(self, items: List[Any]) -> Any:
        if self.conditioning == "text":
            return list(items)
        if self.conditioning == "class":
            return torch.tensor(items, dtype=torch.long, device=self.device)
        return None

    def log_images(self, step: int) -> List[Tuple[str, torch.Tensor, List[str]]]:
        conditions, captions = self._eval_conditions()
        if not conditions:
            return []
        images = self.generate(conditions, seed=self.eval_cfg.seed, sampler=self.eval_cfg.sampler)
        grids = [("samples", images, captions)]
        if self.bucket_sizes:
            # One image per aspect bucket: the first condition and seed at every size trained on.
            tiles = [self.generate(conditions[:1], seed=self.eval_cfg.seed, sampler=self.eval_cfg.sampler,
                                   height=h, width=w) for w, h in self.bucket_sizes]
            grids.append(("buckets", letterbox(tiles), [f"{w}x{h}: {captions[0]}" for w, h in self.bucket_sizes]))
        return grids


def build_task(cfg: Config, plan: Plan, *, device: torch.device, total_steps: int):
    """The task ``cfg.task`` names, built with its engines (see the module docstring)."""
    if cfg.task == "ldm":
        precomputed = None
        if cfg.data.text_embeddings:
            shard_storage = storage_lib.resolve(cfg.data.storage, cfg.storage, key="data.storage")
            precomputed = PrecomputedText.load(cfg.data.urls, shard_storage)
        buckets = cfg.data.buckets
        sizes = make_buckets(cfg.data.resolution, buckets.step, buckets.max_aspect) if buckets.enabled else []
        return LDMTask(plan, model=cfg.model, diffusion=cfg.diffusion, deepspeed=cfg.deepspeed, optim=cfg.optim,
                       train=cfg.train, eval_cfg=cfg.eval, conditioning=cfg.data.conditioning, storage=cfg.storage,
                       seed=cfg.seed, device=device, total_steps=total_steps, precomputed_text=precomputed,
                       bucket_sizes=sizes)
    if cfg.task == "autoencoder":
        from ldm_scale.train.autoencoder_task import build_autoencoder_task

        return build_autoencoder_task(cfg, plan, device=device, total_steps=total_steps)
    raise ValueError(f"task={cfg.task!r}: expected 'ldm' or 'autoencoder'")


__all__ = ["LDMTask", "DiffusionTrainModule", "build_task", "load_first_stage", "build_first_stage"]
