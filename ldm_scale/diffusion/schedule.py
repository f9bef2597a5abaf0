"""Noise schedules of the discrete-time forward process q(x_t | x_0) (Ho et al. 2020, Sec. 2).

All terms are derived in float64 from ``betas`` once, so that 1 - alphas_cumprod near t = 0
(~1e-3) and sqrt(1 / alphas_cumprod - 1) near t = T (~15) carry no float32 round-off into the
samplers; ``NoiseSchedule.to`` casts everything once for the device.

Schedule kinds (``make_schedule``):

* ``"scaled_linear"``: the LDM schedule (Rombach et al. 2022; Stable Diffusion): linear in
  sqrt(beta), ``beta_t = (sqrt(b0) + t/(T-1) (sqrt(b1) - sqrt(b0)))^2``, defaults 0.00085 -> 0.012
  over 1000 steps, giving alphas_cumprod[-1] = 0.004660. CompVis' configs call this ``"linear"``
  and diffusers calls it ``"scaled_linear"``; we use the diffusers name so that a CompVis config
  ported by copy-paste cannot silently select the DDPM schedule below.
* ``"linear"``: the DDPM schedule (Ho et al. 2020), linear in beta (1e-4 -> 0.02 in the paper).
* ``"cosine"``: Nichol & Dhariwal 2021, Eq. 17, offset s = 0.008, betas clipped at 0.999.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ldm_scale.choices import Choice

class ScheduleKind(Choice):
    """The beta schedule (``diffusion.schedule``)."""

    scaled_linear = "scaled_linear"
    linear = "linear"
    cosine = "cosine"


SCHEDULE_KINDS = tuple(ScheduleKind.values())


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep terms of the forward process, indexed by t in [0, T).

    ``alphas_cumprod[t]`` is alpha-bar_t of Ho et al. (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps);
    ``alphas_cumprod_prev[t]`` is abar_{t-1} with abar_{-1} = 1. The posterior q(x_{t-1} | x_t, x_0)
    terms follow Ho et al. Eq. 6-7 (``posterior_log_variance_clipped`` repeats index 1 at t = 0,
    where the true variance is 0, as in the DDPM reference code).
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    snr: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1); check linear_start / linear_end")
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            # The variance is 0 at t = 0; the log is clipped to the t = 1 value (DDPM reference code).
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            snr=ac / (1.0 - ac),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> "NoiseSchedule":
        """Cast every term once (default float32) and move it to ``device``."""
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``self.<name>[t]`` shaped [B, 1, ..., 1] to broadcast against ``like`` [B, ...]."""
        values = getattr(self, name).to(t.device)[t.long()]
        return values.to(like.dtype).reshape(t.shape[0], *([1] * (like.ndim - 1)))


def make_schedule(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> NoiseSchedule:
    """Build a float64 ``NoiseSchedule`` (see the module docstring for the kinds)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "scaled_linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    elif kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + cosine_s
        f = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(min=0.0, max=0.999)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
    return NoiseSchedule.from_betas(betas)
