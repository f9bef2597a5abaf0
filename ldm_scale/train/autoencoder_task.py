"""What one training step of a first-stage autoencoder computes (Rombach et al. 2022, Sec. 3.1).

Two optimisers, as in the paper's adversarial training: a **generator** engine (the autoencoder
plus the NLL's learned log-variance) and a **discriminator** engine (the PatchGAN). Each is a
DeepSpeed engine with its own optimizer state, lr schedule and checkpoint files.

One micro-batch:
  1. generator engine forward -> reconstruction (+ posterior KL or VQ codebook loss) and, if the
     GAN is active (optimizer step >= ``disc_start``), the discriminator's logits on the
     reconstruction with the discriminator's parameters frozen (gradients reach the decoder, not
     the discriminator, and do not fire its ZeRO hooks) and the adaptive weight at the decoder's
     last layer; the forward returns the generator loss;
  2. generator backward + step;
  3. if the GAN is active: discriminator engine forward on the input and on the detached
     reconstruction -> discriminator loss, backward + step. Before ``disc_start`` the
     discriminator engine is never called, so its weights and optimizer state stay at their
     initial values.

ZeRO-3 is refused: the adaptive weight needs ``autograd.grad`` of two losses w.r.t. the decoder's
last-layer weight, and ZeRO-3 partitions that parameter across ranks (each rank holds a flat shard
and the gathered weight is released after its use), so the gradient norm of one rank is not the
norm the formula needs. ZeRO-1 and ZeRO-2 keep full parameters on every rank.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ldm_scale import dist
from ldm_scale.losses import (AutoencoderLoss, AutoencoderLossConfig, LearnedLogVariance, PatchDiscriminator, build_lpips,
                              gan_active)
from ldm_scale.models.registry import FirstStageConfig, build_autoencoder
from ldm_scale.data.device import unit_range
from ldm_scale.train import compile as compile_lib
from ldm_scale.train import engine as ds_engine
from ldm_scale.train import health
from ldm_scale.train.compile import CompileMode
from ldm_scale.train.health import LOSS_SCALE_KEY, StepOutput
from ldm_scale.train.engine import BatchPlan, DeepSpeedConfig, OptimConfig

from ldm_scale.config import check_autoencoder_plan  # noqa: F401 - re-exported: the task runs it first thing

if TYPE_CHECKING:
    from ldm_scale.config import Config, Plan

log = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` of a module's parameters (gradients still flow to its inputs)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AutoencoderGenerator(nn.Module):
    """The generator engine's module: the autoencoder and the NLL log-variance (trained together,
    checkpointed together). ``forward`` returns the generator loss itself.

    Why the loss is computed inside ``forward``: a DeepSpeed engine hooks the tensors its forward
    returns, and any autograd pass through them (including the ``autograd.grad`` of the adaptive
    weight) would start the engine's backward bookkeeping and gradient reduction. Inside forward
    the graph has no such hooks yet, so the adaptive weight is a plain local computation.
    """

    def __init__(self, autoencoder: nn.Module, logvar: LearnedLogVariance, kind: str):
        super().__init__()
        if kind not in ("kl", "vq"):
            raise ValueError(f"first stage kind {kind!r}: expected 'kl' or 'vq'")
        self.autoencoder = autoencoder
        self.loss_logvar = logvar
        self.kind = kind

    def forward(self, x: torch.Tensor, *, step: int, objective: AutoencoderLoss,
                discriminator: Optional[nn.Module]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """-> (generator loss, detached loss terms, detached reconstruction).

        ``discriminator`` (the bare PatchGAN, not its engine) is needed from ``disc_start`` on; its
        parameters are frozen while it scores the reconstruction.
        """
        extra: Dict[str, torch.Tensor] = {}
        if self.kind == "kl":
            recon, posterior = self.autoencoder(x, sample_posterior=True)
            reg = {"kl": posterior.kl().float()}
        else:
            recon, emb_loss, info = self.autoencoder(x)
            reg = {"codebook_loss": emb_loss.float()}
            extra = {"perplexity": info["perplexity"].detach().float(),
                     "codebook_usage": info["usage"].detach().float()}
        recon = recon.float()
        logits_fake, last_layer = None, None
        if discriminator is not None and gan_active(step, objective.cfg.disc_start):
            # Gradients reach the decoder through D but not D's own weights: those belong to the
            # discriminator engine, whose ZeRO gradient hooks must not fire in this backward.
            with frozen(discriminator):
                logits_fake = discriminator(recon).float()
            last_layer = self.autoencoder.get_last_layer()
        loss, logs = objective.generator_loss(x.float(), recon, logvar=self.loss_logvar().float(), step=step,
                                              logits_fake=logits_fake, last_layer=last_layer, **reg)
        logs.update(extra)
        return loss, logs, recon.detach()


class DiscriminatorWithLoss(nn.Module):
    """The discriminator engine's module: the PatchGAN (``net``) scoring real and reconstructed
    images in two separate passes (so batch-norm statistics are not mixed), returning its loss."""

    def __init__(self, net: PatchDiscriminator):
        super().__init__()
        self.net = net

    def forward(self, real: torch.Tensor, fake: torch.Tensor, *, objective: AutoencoderLoss
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return objective.discriminator_loss(self.net(real).float(), self.net(fake.detach()).float())


def explain_lr(optim: OptimConfig, plan: BatchPlan, num_nodes: int) -> str:
    """One log line that makes the learning-rate scaling explicit.

    CompVis scaled ``base_learning_rate`` by ``accumulate_grad_batches * ngpu * batch_size`` with
    ``ngpu`` the GPUs *of one node*, so multi-node runs silently trained with a smaller lr than the
    formula suggests. Here the factor is the true global batch.
    """
    lr = ds_engine.peak_lr(optim, plan)
    if not optim.scale_lr:
        return f"learning rate {lr:.4g} (optim.scale_lr=false: not scaled by the batch)"
    per_node = max(plan.world_size // max(num_nodes, 1), 1)
    compvis = optim.lr * plan.micro_batch_size * plan.gradient_accumulation_steps * per_node
    return (f"learning rate {lr:.4g} = base {optim.lr:.4g} x global batch {plan.global_batch_size} "
            f"(micro {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x world "
            f"{plan.world_size} over {num_nodes} node(s)) / reference batch {optim.lr_reference_batch}; "
            f"CompVis' formula (GPUs of one node only) would give {compvis:.4g}")


class AutoencoderTask:
    """The loop's task for ``task: autoencoder`` (interface in ``train/tasks.py``): two engines, one
    optimizer step of each per ``train_step``. Parts are built by the caller and passed in: ``perceptual`` is the
    frozen LPIPS network (``losses.build_lpips``) or None when ``perceptual_weight`` is 0."""

    def __init__(self, first_stage: FirstStageConfig, loss_cfg: AutoencoderLossConfig, *,
                 perceptual: Optional[nn.Module], ds_config: Dict[str, Any], optim: OptimConfig,
                 plan: BatchPlan, total_steps: int, device: torch.device, seed: int = 0,
                 num_log_images: int = 8, ds: Optional[DeepSpeedConfig] = None,
                 compile_mode: CompileMode = CompileMode.off):
        check_autoencoder_plan(first_stage, loss_cfg, ds_config["zero_optimization"]["stage"])
        self.kind = first_stage.kind
        self.first_stage_cfg = first_stage
        self.cfg = loss_cfg
        self.device = device
        self.ds_config = ds_config
        self.num_log_images = num_log_images
        self._log_inputs: Optional[torch.Tensor] = None
        # 1. Frozen parts (LPIPS) outside DeepSpeed.
        self.loss = AutoencoderLoss(loss_cfg, perceptual.to(device) if perceptual is not None else None)

        # 2. Trainable parts, same seed on every rank so ZeRO-1/2 replicas start equal.
        torch.manual_seed(seed)
        generator = AutoencoderGenerator(
            build_autoencoder(first_stage), LearnedLogVariance(loss_cfg.logvar_init, loss_cfg.learn_logvar),
            first_stage.kind)
        discriminator = DiscriminatorWithLoss(PatchDiscriminator(loss_cfg.discriminator))
        # The generator's conv stacks compiled before DeepSpeed wraps them (train/compile.py).
        compile_lib.log_compiled("generator", compile_lib.apply_compile(generator, compile_mode))

        # 3. Two engines. Same Adam settings (the paper); the discriminator's lr x disc_lr_ratio.
        disc_optim = replace(copy.deepcopy(optim), lr=optim.lr * loss_cfg.disc_lr_ratio)
        self.ds = ds or DeepSpeedConfig()
        ds_engine.configure_device_math(self.ds)
        ds_engine.apply_memory_format(generator, self.ds)
        ds_engine.apply_memory_format(discriminator, self.ds)
        self.generator = ds_engine.initialize_engine(generator.to(device), ds_config, optim, plan, total_steps)
        self.discriminator = ds_engine.initialize_engine(discriminator.to(device), ds_config, disc_optim, plan,
                                                         total_steps)
        log.info("autoencoder (%s): %s", first_stage.kind,
                 explain_lr(optim, plan, dist.get_dist_info().num_nodes))
        log.info("discriminator: lr x %g, GAN terms from optimizer step %d, %s loss, adaptive weight x %g",
                 loss_cfg.disc_lr_ratio, loss_cfg.disc_start, loss_cfg.disc_loss, loss_cfg.disc_weight)
        # Per-rank stream for posterior sampling (the global RNG, saved in rng_rank<R>.pt).
        torch.manual_seed(seed + 7919 * (dist.get_dist_info().rank + 1))

    # ----------------------------------------------------------------------------- loop interface
    @property
    def engines(self) -> Dict[str, Any]:
        """Both engines, checkpointed by name (each with its own optimizer and scheduler state)."""
        return {"generator": self.generator, "discriminator": self.discriminator}

    @property
    def autoencoder(self) -> nn.Module:
        return self.generator.module.autoencoder

    @property
    def ema_module(self) -> nn.Module:
        """The EMA (optional for autoencoders: ``ema.enabled``) tracks the autoencoder's weights."""
        return self.autoencoder

    def client_state(self) -> Dict[str, Any]:
        return {"first_stage_kind": self.kind,
                "discriminator_steps": int(self.discriminator.global_steps)}

    def load_client_state(self, state: Dict[str, Any]) -> None:
        kind = state.get("first_stage_kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"checkpoint holds a {kind!r} autoencoder but this run trains a {self.kind!r} one")

    def _autocast(self) -> contextlib.AbstractContextManager:
        return ds_engine.autocast(self.ds_config, self.device)

    def train_step(self, micro_batches: Sequence[Dict[str, Any]], step: int) -> StepOutput:
        """One optimizer step of both engines over the accumulation micro-batches; returns the
        loss terms and the generator's health vector on the device (no host sync).

        ``step`` is the loop's count of healthy steps (it switches the GAN terms on). As for the
        LDM, a non-finite loss is not checked before backward: DeepSpeed's overflow check skips the
        update on every rank, and the loop's step-health rule counts it. A skipped discriminator
        update alone is reported as ``disc_skipped`` and does not make the step unhealthy.
        """
        self.generator.train()
        self.discriminator.train()
        gan_on = gan_active(step, self.cfg.disc_start) and self.cfg.disc_factor > 0
        one = torch.ones((), device=self.device)
        sums: Dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        for batch in micro_batches:
            x = ds_engine.to_memory_format(unit_range(batch["image"].to(self.device, non_blocking=True)), self.ds)
            if self._log_inputs is None:  # a fixed set of images for the reconstruction grids
                self._log_inputs = x[: self.num_log_images].detach().cpu()
            with self._autocast():
                loss, logs, recon = self.generator(x, step=step, objective=self.loss,
                                                   discriminator=self.discriminator.module.net if gan_on else None)
            loss = loss * float(batch.get(LOSS_SCALE_KEY, 1.0))
            self.generator.backward(loss)
            self.generator.step()
            detached = loss.detach().float()
            loss_sum += detached
            nonfinite += (~torch.isfinite(detached)).float()
            if gan_on:
                with self._autocast():
                    d_loss, d_logs = self.discriminator(x, recon, objective=self.loss)
                self.discriminator.backward(d_loss)
                self.discriminator.step()
                logs.update(d_logs)
            for key, value in logs.items():
                value = health.device_scalar(value, self.device)
                sums[key] = sums[key] + value if key in sums else value
        n = health.device_scalar(len(micro_batches), self.device)
        metrics = {key: (value, n) for key, value in sums.items()}
        if gan_on:
            disc_applied = bool(self.discriminator.was_step_applied())
            metrics["disc_skipped"] = (one * (0.0 if disc_applied else 1.0), one)
        applied, grad_norm, searching = ds_engine.step_status(self.generator, self.ds_config)
        return StepOutput(metrics, health.local_health(loss_sum, len(micro_batches), nonfinite, grad_norm, applied,
                                                       searching))

    def optimizer_stats(self) -> Dict[str, float]:
        """lr, grad norm, loss scale of both engines: the generator's unprefixed (as for every task),
        the discriminator's under ``discriminator/``."""
        stats = ds_engine.engine_stats(self.generator)
        if self.discriminator.global_steps > 0:  # nothing to report before its first update
            for key, value in ds_engine.engine_stats(self.discriminator).items():
                stats[f"discriminator/{key}"] = value
        return stats

    def train_flops_per_sample(self) -> float:
        """Model FLOPs of one training sample once the GAN is on, counted on ``meta`` tensors:
        autoencoder forward + backward, LPIPS trunk on input and reconstruction (+ backward to the
        reconstruction), discriminator on the reconstruction (+ backward to it) in the generator
        step, and on input and reconstruction (+ backward to its weights) in its own step."""
        from ldm_scale.logging import count_flops

        size = self.first_stage_cfg.kl.ddconfig.resolution if self.kind == "kl" else \
            self.first_stage_cfg.vq.ddconfig.resolution
        with torch.device("meta"):
            autoencoder = build_autoencoder(self.first_stage_cfg)
            disc = PatchDiscriminator(self.cfg.discriminator)
        x = torch.empty(1, 3, size, size, device="meta")

        def generator() -> None:
            out = autoencoder(x)[0]
            (out.float().mean() + disc(out).mean()).backward()

        def discriminator() -> None:
            (disc(x).mean() + disc(x).mean()).backward()

        total = count_flops(generator) + count_flops(discriminator)
        if self.loss.perceptual is not None:
            import torchvision

            with torch.device("meta"):
                trunk = torchvision.models.vgg16().features[:30] if self.cfg.perceptual.net == "vgg" else \
                    torchvision.models.alexnet().features[:12]
            trunk.requires_grad_(False)
            y = torch.empty(1, 3, size, size, device="meta", requires_grad=True)
            # two images forward, backward to one of them
            total += count_flops(lambda: (trunk(x).mean() + trunk(y).mean()).backward())
        return total

    def export(self, url: str, *, ema, config: Dict[str, Any], step: int) -> None:
        """Write the single-file exported autoencoder (``ldm_scale/autoencoder-v1``, ``train/export.py``)."""
        from ldm_scale.train.export import export_autoencoder

        export_autoencoder(url, self.autoencoder, ema, self.first_stage_cfg, config=config, step=step)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions (posterior mode for KL models) in [-1, 1]."""
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        x = images.to(self.device)
        with self._autocast():
            if self.kind == "kl":
                recon, _ = self.autoencoder(x, sample_posterior=False)
            else:
                recon, _, _ = self.autoencoder(x)
        self.autoencoder.train(was_training)
        return recon.float().clamp(-1, 1)

    def log_images(self, step: int) -> List[Tuple[str, torch.Tensor, List[str]]]:
        """Input | reconstruction pairs, side by side in one image each, from the first batch this
        rank saw (fixed across steps, so the grids show progress). Every rank calls this."""
        if self._log_inputs is None:
            return []
        inputs = self._log_inputs
        recon = self.reconstruct(inputs).cpu()
        pairs = torch.cat([inputs.float().clamp(-1, 1), recon], dim=3)  # [N, 3, H, 2W]
        return [("reconstructions", pairs, ["each pair: input (left), reconstruction (right)"])]


def build_autoencoder_task(cfg: "Config", plan: "Plan", *, device: torch.device, total_steps: int) -> AutoencoderTask:
    """The loop's entry point for ``task: autoencoder`` (called by ``train.tasks.build_task``)."""
    assert plan.autoencoder is not None, "validate() resolves the first stage for task=autoencoder"
    loss_cfg = cfg.autoencoder_loss
    perceptual = build_lpips(loss_cfg.perceptual) if loss_cfg.perceptual_weight > 0 else None
    return AutoencoderTask(plan.autoencoder, loss_cfg, perceptual=perceptual,
                           ds_config=ds_engine.build_ds_config(cfg.deepspeed, plan.batch), optim=cfg.optim,
                           plan=plan.batch, total_steps=total_steps, device=device, seed=cfg.seed,
                           ds=cfg.deepspeed, compile_mode=cfg.train.compile)
