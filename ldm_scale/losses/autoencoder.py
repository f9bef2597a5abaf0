"""The first-stage autoencoder objective of Rombach et al. 2022 (Sec. 3.1 and App. G), which follows
VQGAN (Esser et al. 2021, Eq. 4-7):

    L_G = NLL(x, x~; logvar) + w_reg * L_reg + lambda * f(step) * L_adv
    L_D = d_loss(D(x), D(x~))        (only from step `disc_start` on)

- Reconstruction: per-pixel ``r = pixel_weight * |x - x~| + perceptual_weight * LPIPS(x, x~)``
  (LPIPS is one number per image, broadcast over its pixels, as in the reference implementation).
- NLL of a Laplace-like likelihood with one learned scalar log-variance (the "logvar" of the
  reference code): ``nll = r / exp(logvar) + logvar``, summed over pixels and averaged over the
  batch (``nll_reduction=sum``, KL models) or averaged over everything (``mean``, VQ models, where
  the logvar is usually not learned). The reference code created ``logvar`` as a parameter of the
  loss module but never gave it to an optimiser; here it lives in the generator's module so it is
  trained (``learn_logvar``).
- Regulariser: ``kl_weight * KL(q(z|x) || N(0, I))`` (summed over latent dims, mean over batch) for
  KL models; ``codebook_weight * (codebook + beta * commitment)`` for VQ models (van den Oord et al.
  2017, Eq. 3; the quantiser returns the combined term).
- Adversarial: ``L_adv = -E[D(x~)]`` with the adaptive weight of Esser et al. 2021, Eq. 7:
  ``lambda = ||grad_{G_L} NLL|| / (||grad_{G_L} L_adv|| + 1e-4)``, clamped to [0, max], detached,
  times ``disc_weight``, where ``G_L`` is the decoder's last layer; ``f(step) = disc_factor`` for
  ``step >= disc_start`` and 0 before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from ldm_scale.choices import Choice

from .discriminator import D_LOSSES, DiscriminatorConfig, generator_adversarial_loss
from .perceptual import PerceptualConfig


class NllReduction(Choice):
    """``nll_reduction``: summed over pixels and averaged over the batch (KL) | averaged over all (VQ)."""

    sum = "sum"
    mean = "mean"


class DiscLoss(Choice):
    """``disc_loss``: the discriminator's loss (``losses/discriminator.py``'s D_LOSSES)."""

    hinge = "hinge"
    vanilla = "vanilla"


@dataclass
class AutoencoderLossConfig:
    """Weights and schedule of the autoencoder objective. Defaults are the paper's KL settings."""

    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    nll_reduction: NllReduction = "sum"
    learn_logvar: bool = True
    logvar_init: float = 0.0
    kl_weight: float = 1.0e-6
    codebook_weight: float = 1.0
    disc_start: int = 50001  # first optimizer step (0-based) whose losses include the GAN terms
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: DiscLoss = "hinge"
    adaptive_weight_max: float = 1.0e4
    # The discriminator's learning rate relative to the generator's (1.0 in the paper).
    disc_lr_ratio: float = 1.0

    def check(self) -> None:
        """Raise a ValueError naming the field for settings that cannot work."""
        if self.nll_reduction not in ("sum", "mean"):
            raise ValueError(f"loss.nll_reduction={self.nll_reduction!r}: choose 'sum' or 'mean'")
        if self.disc_loss not in D_LOSSES:
            raise ValueError(f"loss.disc_loss={self.disc_loss!r}: choose one of {sorted(D_LOSSES)}")
        for name in ("pixel_weight", "perceptual_weight", "kl_weight", "codebook_weight",
                     "disc_weight", "disc_factor", "adaptive_weight_max", "disc_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self, name)}: must be >= 0")
        if self.disc_start < 0:
            raise ValueError(f"loss.disc_start={self.disc_start}: must be >= 0")


def gan_active(step: int, disc_start: int) -> bool:
    """Whether the update at 0-based optimizer step ``step`` includes the GAN terms."""
    return step >= disc_start


def reconstruction_error(inputs: torch.Tensor, recon: torch.Tensor, perceptual: Optional[torch.Tensor],
                         pixel_weight: float, perceptual_weight: float) -> torch.Tensor:
    """Per-pixel reconstruction error ``[B, C, H, W]``; ``perceptual`` is LPIPS ``[B, 1, 1, 1]``."""
    rec = pixel_weight * (inputs - recon).abs()
    if perceptual is not None:
        rec = rec + perceptual_weight * perceptual
    return rec


def reduce_per_image(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """``sum``: sum over all but the batch dim, mean over the batch; ``mean``: mean over all."""
    if reduction == "sum":
        return x.sum() / x.shape[0]
    return x.mean()


def gaussian_nll(rec: torch.Tensor, logvar: torch.Tensor, reduction: str) -> torch.Tensor:
    """``rec / exp(logvar) + logvar`` reduced per ``reduction``; ``logvar`` is a scalar tensor."""
    return reduce_per_image(rec * torch.exp(-logvar) + logvar, reduction)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float, max_weight: float = 1.0e4, eps: float = 1.0e-4) -> torch.Tensor:
    """Esser et al. 2021, Eq. 7: balance the adversarial gradient against the reconstruction gradient
    at the decoder's last layer. Returns a detached scalar.

    Uses ``autograd.grad`` (not ``.backward``): it must not accumulate into ``.grad`` nor fire the
    optimiser's post-accumulate hooks (ZeRO's gradient reduction). The graph is retained for the
    real backward that follows.
    """
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.norm(nll_grad.float()) / (torch.norm(g_grad.float()) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


class LearnedLogVariance(nn.Module):
    """The NLL's scalar log-variance. A module so it can sit in the generator's optimiser (and its
    checkpoint) next to the autoencoder; frozen (a buffer) when ``learn`` is False.

    Stored with shape ``[1]``, not as a 0-d tensor: DeepSpeed broadcasts parameters as byte views,
    which 0-d tensors do not allow."""

    def __init__(self, init: float, learn: bool):
        super().__init__()
        value = torch.tensor([float(init)])
        if learn:
            self.logvar = nn.Parameter(value)
        else:
            self.register_buffer("logvar", value)

    def forward(self) -> torch.Tensor:
        """The log-variance as a 0-d tensor."""
        return self.logvar[0]


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives. Holds the frozen LPIPS network (built by the caller
    with ``build_lpips`` and passed in; ``None`` when ``perceptual_weight`` is 0) and no trainable
    state: the log-variance belongs to the generator, the discriminator to its own optimiser."""

    def __init__(self, cfg: AutoencoderLossConfig, perceptual: Optional[nn.Module]):
        super().__init__()
        cfg.check()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 needs an LPIPS network (build_lpips(cfg.perceptual))")
        self.cfg = cfg
        self.perceptual = perceptual
        self.d_loss_fn = D_LOSSES[cfg.disc_loss]

    def perceptual_distance(self, inputs: torch.Tensor, recon: torch.Tensor) -> Optional[torch.Tensor]:
        if self.perceptual is None or self.cfg.perceptual_weight == 0:
            return None
        # LPIPS runs in its own (fp32) dtype: a bf16/fp16 engine hands us half-precision images.
        dtype = next(self.perceptual.parameters()).dtype
        return self.perceptual(inputs.to(dtype), recon.to(dtype)).to(recon.dtype)

    def generator_loss(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        *,
        logvar: torch.Tensor,
        step: int,
        kl: Optional[torch.Tensor] = None,
        codebook_loss: Optional[torch.Tensor] = None,
        logits_fake: Optional[torch.Tensor] = None,
        last_layer: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total generator loss and detached terms for logging.

        ``kl``: per-sample KL ``[B]`` (KL models) or ``codebook_loss``: scalar (VQ models), exactly
        one. ``logits_fake = D(recon)`` and ``last_layer`` are needed once ``gan_active(step)``; the
        caller skips the discriminator forward before that.
        """
        cfg = self.cfg
        if (kl is None) == (codebook_loss is None):
            raise ValueError("generator_loss needs exactly one of kl= (KL model) or codebook_loss= (VQ model)")
        p_dist = self.perceptual_distance(inputs, recon)
        rec = reconstruction_error(inputs, recon, p_dist, cfg.pixel_weight, cfg.perceptual_weight)
        nll_loss = gaussian_nll(rec, logvar, cfg.nll_reduction)
        if kl is not None:
            reg_name, reg_value = "kl_loss", kl.sum() / kl.shape[0]
            reg = cfg.kl_weight * reg_value
        else:
            reg_name, reg_value = "codebook_loss", codebook_loss.mean()
            reg = cfg.codebook_weight * reg_value
        loss = nll_loss + reg

        zero = torch.zeros((), device=recon.device)
        g_loss, d_weight, factor = zero, zero, 0.0
        if gan_active(step, cfg.disc_start) and cfg.disc_factor > 0:
            if logits_fake is None or last_layer is None:
                raise ValueError(f"step {step} >= disc_start={cfg.disc_start}: generator_loss needs "
                                 "logits_fake=D(recon) and last_layer=decoder.get_last_layer()")
            g_loss = generator_adversarial_loss(logits_fake)
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer, cfg.disc_weight, cfg.adaptive_weight_max)
            factor = cfg.disc_factor
            loss = loss + d_weight * factor * g_loss

        logs = {
            "loss": loss, "nll_loss": nll_loss, "rec_loss": (inputs - recon).abs().mean(),
            # clone: the log-variance is a view of a parameter the optimizer updates in place
            "logvar": logvar.detach().clone(), reg_name: reg_value, "g_loss": g_loss, "d_weight": d_weight,
            "disc_factor": torch.tensor(factor),
        }
        if p_dist is not None:
            logs["p_loss"] = p_dist.mean()
        return loss, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor
                           ) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``disc_factor * d_loss(D(x), D(x~.detach()))``; the caller only steps it once GAN is active."""
        loss = self.cfg.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().float() for k, v in logs.items()}
