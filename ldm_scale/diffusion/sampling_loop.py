"""The loop every sampler runs around its own update: img2img (the plan's last floor(strength S)
steps from the init latent noised to the first of them), inpainting (the known region re-noised to
the current level and pasted in before every step, and pasted clean at the end) and the ``on_step``
report. Shared by the diffusion samplers (``samplers.py``, VP noising) and the rectified-flow ones
(``flow.py``, which pass their interpolation as the noising rule); conventions in ``samplers.py``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch

from ldm_scale.diffusion.noise import randn_like
from ldm_scale.diffusion.prediction import check_parameterization

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


# One sampler's update at step i of its plan: (i, x_t, t, abar_t, abar_prev) -> (x_prev, x0_pred).
StepFn = Callable[[int, torch.Tensor, int, float, float], Tuple[torch.Tensor, torch.Tensor]]


class SamplingLoop:
    """The loop every sampler runs around its own update (conventions in the module docstring): the
    plan's last floor(strength S) steps (img2img), the start state, known-region pasting before every
    step and at the end (inpainting), and the ``on_step`` report after every step."""

    def __init__(self, plan: Any, x_T: torch.Tensor, parameterization: Optional[str],
                 init_latent: Optional[torch.Tensor], strength: float, mask: Optional[torch.Tensor],
                 generator: Optional[torch.Generator],
                 noised: Optional[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = None):
        """``plan``: a ``samplers.StepPlan`` or anything with its fields (``timesteps``, ``alphas`` =
        each step's start level, ``alphas_prev`` = its end level, ``len``, ``last(n)``).
        ``noised(x0, noise, level)`` takes a clean latent to a plan level: by default the VP rule
        sqrt(abar) x0 + sqrt(1 - abar) noise; the flow samplers pass their interpolation (with
        ``parameterization=None``: they have their own)."""
        if parameterization is not None:
            check_parameterization(parameterization)
        self.noised = noised or _vp_noised
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if (strength < 1.0 or mask is not None) and init_latent is None:
            raise ValueError("strength < 1 and inpaint_mask need init_latent (the encoded init image)")
        if init_latent is not None and init_latent.shape != x_T.shape:
            raise ValueError(f"init_latent shape {tuple(init_latent.shape)} != x_T shape {tuple(x_T.shape)}")
        n = int(len(plan) * strength)
        if n < 1:
            raise ValueError(f"strength {strength} x {len(plan)} steps leaves no denoising step; raise either")
        self.plan = plan.last(n) if n < len(plan) else plan
        self.init = None if init_latent is None else init_latent.to(x_T.dtype)
        self.mask = None if mask is None else mask.to(device=x_T.device, dtype=x_T.dtype)
        self.generator = generator
        if strength < 1.0:
            self.x_start = self.noised(self.init, x_T, self.plan.alphas[0])
        else:
            self.x_start = x_T

    def run(self, step: StepFn, on_step: Optional[StepCallback]) -> torch.Tensor:
        x, n = self.x_start, len(self.plan)
        for i, (t, a, a_prev) in enumerate(zip(self.plan.timesteps, self.plan.alphas, self.plan.alphas_prev)):
            x = self._paste(x, a)
            x, x0 = step(i, x, t, a, a_prev)
            if on_step is not None:
                on_step(i, n, x, x0)
        return x if self.mask is None else self.mask * self.init + (1 - self.mask) * x

    def _paste(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.mask is None:
            return x
        known = self.noised(self.init, randn_like(x, self.generator), alpha)
        return self.mask * known + (1 - self.mask) * x


def _vp_noised(x0: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """q(x_t | x_0) at abar = ``alpha`` with the given noise (objective.q_sample for one level)."""
    return math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * noise
