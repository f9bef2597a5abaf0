"""The latent diffusion model container (Rombach et al. 2022, Sec. 3.2-3.3).

``LatentDiffusion`` only holds the parts and the latent scaling; the diffusion maths (schedules,
objective, samplers) are pure functions in ``ldm_scale.diffusion`` that call
``apply_model`` as their denoiser.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from ldm_scale.diffusion.prediction import PARAMETERIZATIONS

from .unet import UNetModel


class LatentDiffusion(nn.Module):
    """unet epsilon_theta, frozen first stage (E, D), condition encoder tau_theta, scale factor.

    Latents seen by the UNet are ``scale_factor * E(x)`` (the paper rescales the KL latents to
    unit variance, Sec. 4.3.2 / Appendix D.1; CompVis ``scale_by_std``). The first stage is frozen
    (``requires_grad=False``) and stays in eval mode even when the container is put in train mode.
    """

    def __init__(self, unet: UNetModel, first_stage: nn.Module, cond_stage: nn.Module,
                 scale_factor: float = 1.0, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.unet = unet
        self.first_stage = first_stage
        self.cond_stage = cond_stage
        self.parameterization = parameterization
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        for p in self.first_stage.parameters():
            p.requires_grad_(False)
        if not getattr(cond_stage, "trainable", False):
            for p in self.cond_stage.parameters():
                p.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.first_stage.eval()
        if not getattr(self.cond_stage, "trainable", False):
            self.cond_stage.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """UNet parameters, plus the condition encoder's when it is trained jointly."""
        return (p for p in self.parameters() if p.requires_grad)

    @property
    def latent_channels(self) -> int:
        return self.first_stage.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.first_stage.downsample_factor

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint the UNet blocks (and a trainable text transformer's blocks)."""
        self.unet.set_activation_checkpointing(enabled)
        if getattr(self.cond_stage, "trainable", False) and hasattr(self.cond_stage, "set_activation_checkpointing"):
            self.cond_stage.set_activation_checkpointing(enabled)

    def _first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> float32 scaled latents ``scale_factor * z`` (z a posterior sample
        for KL, the pre-quantisation latent for VQ), whatever the first stage's dtype."""
        z = self.first_stage.encode_to_latent(x.to(self._first_stage_dtype()), generator)
        return z.float() * self.scale_factor.float()

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (VQ first stages quantise inside the decoder)."""
        z = z.float() / self.scale_factor.float()
        return self.first_stage.decode_from_latent(z.to(self._first_stage_dtype()))

    def condition(self, raw: Any) -> Dict[str, torch.Tensor]:
        """Raw condition (list[str] / LongTensor[B] / None / tensor) -> UNet kwargs."""
        return self.cond_stage(raw)

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser: UNet prediction for noisy latents ``x_t`` at timesteps ``t`` under ``cond``
        (the dict from :meth:`condition`). A ``concat`` entry is concatenated along channels."""
        return apply_denoiser(self.unet, x_t, t, cond)


def apply_denoiser(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``unet``'s prediction under the condition dict of a conditioner (``context`` / ``y`` as UNet
    keywords, ``concat`` concatenated to ``x_t`` along channels)."""
    unknown = set(cond) - {"context", "y", "concat", "micro"}
    if unknown:
        raise ValueError(f"unknown condition keys {sorted(unknown)}; expected context / y / concat / micro")
    if "concat" in cond:
        x_t = torch.cat([x_t, cond["concat"].to(x_t.dtype)], dim=1)
    if "micro" in cond:  # SDXL's size / crop conditioning (models/micro_conditioning.py); only then passed,
        # so denoisers without the keyword (reference ports in tests) stay callable
        return unet(x_t, t, context=cond.get("context"), y=cond.get("y"), micro=cond["micro"])
    return unet(x_t, t, context=cond.get("context"), y=cond.get("y"))
