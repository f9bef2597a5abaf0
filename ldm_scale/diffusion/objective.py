"""The denoising training objective (Ho et al. 2020, Eq. 14; Rombach et al. 2022, Eq. 2/3).

``diffusion_loss`` draws t ~ U{0..T-1} and eps ~ N(0, I), forms x_t with ``q_sample``, asks the
denoiser for its native prediction and returns one loss per sample (plus the t used) so the
trainer can reduce it and log it by timestep bucket. ``drop_conditions`` implements the condition
dropout that classifier-free guidance needs (Ho & Salimans 2022, Algorithm 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ldm_scale.diffusion.flow import FlowTimesteps
from ldm_scale.diffusion.noise import randn_like, with_offset_noise
from ldm_scale.choices import Choice
from ldm_scale.diffusion.prediction import Parameterization, check_parameterization, prediction_target
from ldm_scale.diffusion.schedule import NoiseSchedule, ScheduleKind, make_schedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
class Weighting(Choice):
    """``diffusion.weighting``: simple (unweighted MSE) | min_snr (Hang et al. 2023)."""

    simple = "simple"
    min_snr = "min_snr"


WEIGHTINGS = tuple(Weighting.values())


@dataclass
class DiffusionConfig:
    """Forward process and training objective of an LDM (the ``diffusion`` slice of the config)."""

    schedule: ScheduleKind = "scaled_linear"  # scaled_linear (LDM) | linear (DDPM) | cosine
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    parameterization: Parameterization = "eps"  # what the UNet predicts
    weighting: Weighting = "simple"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0  # 0 disables; ~0.1 is typical (Guttenberg 2023)
    cond_drop_prob: float = 0.1  # per-sample probability of the empty prompt / null class
    # parameterization=flow (rectified flow, diffusion/flow.py): how training draws t in [0, 1], and
    # SD3's time shift (1 = none). The schedule fields above are not used by it.
    flow_timesteps: FlowTimesteps = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0

    @property
    def is_flow(self) -> bool:
        return self.parameterization == "flow"

    def validate(self) -> None:
        check_parameterization(self.parameterization)
        FlowTimesteps(self.flow_timesteps)
        if self.is_flow and self.weighting != "simple":
            raise ValueError(f"diffusion.weighting={self.weighting} is defined for the noise-schedule "
                             "parameterizations; rectified flow (parameterization=flow) trains the plain velocity "
                             "MSE: set diffusion.weighting=simple (shape t with diffusion.flow_timesteps instead)")
        if self.is_flow and self.offset_noise:
            raise ValueError("diffusion.offset_noise is not defined for parameterization=flow: set it to 0")
        if self.logit_std <= 0 or self.flow_shift <= 0:
            raise ValueError(f"diffusion.logit_std and diffusion.flow_shift must be > 0, got "
                             f"{self.logit_std} and {self.flow_shift}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown diffusion.weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.weighting == "min_snr" and self.min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"diffusion.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.offset_noise < 0:
            raise ValueError(f"diffusion.offset_noise must be >= 0, got {self.offset_noise}")

    def make_schedule(self) -> NoiseSchedule:
        return make_schedule(self.schedule, self.num_timesteps, self.linear_start, self.linear_end)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, Eq. 4) with given noise."""
    return (schedule.gather("sqrt_alphas_cumprod", t, x0) * x0
            + schedule.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)


def loss_weight(snr: torch.Tensor, parameterization: str, weighting: str, min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight of the MSE in the network's own output space.

    ``simple``: 1 (Ho et al.'s L_simple in whichever space the network predicts).
    ``min_snr``: Min-SNR-gamma (Hang et al. 2023, Eq. 8): the x0-space weight min(SNR, gamma)
    expressed for the network's target, i.e. divided by SNR for eps and by SNR + 1 for v
    (since ||eps error||^2 = SNR ||x0 error||^2 and ||v error||^2 = (SNR + 1) ||x0 error||^2).
    """
    if weighting == "simple":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    clipped = snr.clamp(max=min_snr_gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "v":
        return clipped / (snr + 1.0)
    if parameterization == "x0":
        return clipped
    check_parameterization(parameterization)
    raise ValueError(f"min_snr weighting is not defined for parameterization={parameterization}")


def diffusion_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    generator: Optional[torch.Generator] = None,
    parameterization: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    offset_noise: float = 0.0,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted denoising MSE per sample: returns ``(loss[B] float32, t[B])``.

    ``model_fn(x_t, t)`` returns the native prediction (conditioning already bound). ``t`` and
    ``noise`` may be given (tests, importance sampling); otherwise they are drawn from ``generator``.
    The squared error is taken in float32 whatever the autocast dtype of the network.
    """
    batch = x0.shape[0]
    if t is None:
        draw_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=draw_device)
    t = t.to(device=x0.device, dtype=torch.long)
    if noise is None:
        noise = with_offset_noise(randn_like(x0, generator), offset_noise, generator)
    x_t = q_sample(x0, t, noise, schedule)
    abar = schedule.gather("alphas_cumprod", t, x0)
    target = prediction_target(parameterization, x0, noise, abar)
    prediction = model_fn(x_t, t)
    if prediction.shape != target.shape:
        raise ValueError(f"denoiser returned shape {tuple(prediction.shape)}, expected {tuple(target.shape)}: "
                         "the UNet out_channels must equal the latent channels")
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    snr = schedule.snr.to(x0.device)[t].float()
    return loss_weight(snr, parameterization, weighting, min_snr_gamma) * mse, t


def drop_conditions(
    raw: Any, p: float, null_raw: Callable[[int], Any], generator: Optional[torch.Generator] = None
) -> Tuple[Any, torch.Tensor]:
    """Replace each sample's raw condition by the null condition with probability ``p``.

    ``raw`` is a ``list[str]`` of captions (dropped -> the empty prompt ``null_raw`` gives), a
    ``LongTensor[B]`` of class labels (dropped -> the null class), a ``LongTensor[B, L]`` of caption
    tokens (dropped -> the empty prompt's tokens) or ``None`` (unconditional: returned
    unchanged). Returns ``(raw_after_dropout, dropped[B] bool)``. Dropout happens on the raw condition,
    before the text encoder, so the model learns exactly the embedding used as the unconditional
    branch at sampling time.
    """
    if raw is None:
        return None, torch.zeros(0, dtype=torch.bool)
    batch = len(raw)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    dropped = (torch.rand(batch, generator=generator, device=draw_device) < p).cpu()
    if not bool(dropped.any()):
        return raw, dropped
    null = null_raw(batch)
    if isinstance(raw, torch.Tensor):
        # Labels [B] or tokens [B, L]: one mask row per sample. non_blocking: a blocking copy to a
        # CUDA device waits for its stream (a host sync per micro-batch); from pageable memory the
        # bytes are staged at once, so the CPU mask may go away.
        mask = dropped.to(raw.device, non_blocking=True).view(-1, *([1] * (raw.dim() - 1)))
        null = null.to(raw.device, raw.dtype, non_blocking=True) if isinstance(null, torch.Tensor) \
            else torch.full((), null, device=raw.device, dtype=raw.dtype)
        return torch.where(mask, null, raw), dropped
    if isinstance(raw, (list, tuple)):
        return [n if d else r for r, n, d in zip(raw, null, dropped.tolist())], dropped
    raise TypeError(f"raw conditions must be list[str], a LongTensor or None, got {type(raw).__name__}")
