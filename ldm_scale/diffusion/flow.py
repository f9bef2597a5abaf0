"""Rectified flow: the objective and ODE samplers of SD3 (Esser et al. 2024) and SiT (Ma et al. 2024).

Forward process, with t in [0, 1] (t = 1 is pure noise, as SD3 and diffusers write it):

    x_t = (1 - t) x_0 + t eps,        velocity  v = dx_t/dt = eps - x_0.

The network (``diffusion.parameterization=flow``) regresses v with a plain MSE (Liu et al. 2023,
Eq. 1; SD3 Eq. 3 with the rectified-flow weighting w_t = 1 in the v-space). The network's timestep
input is 1000 t (SD3's and diffusers' convention), so the UNet and DiT sinusoidal embeddings see the
same range as for the diffusion objectives.

Training timesteps (``diffusion.flow_timesteps``): ``uniform`` t ~ U(0, 1), or ``logit_normal``
t = sigmoid(m + s n), n ~ N(0, 1) (SD3 Sec. 3.1, Eq. 19; its best setting and default m = 0, s = 1).
Either may be **shifted** towards noise, t' = a t / (1 + (a - 1) t) (SD3 Sec. 5.3.2, Eq. 23: a
resolution of m pixels trained after n uses a = sqrt(m / n); SD3 uses a = 3 at 1024^2).

Sampling integrates dx/dt = v(x, t) from t = 1 to t = 0 on the grid t_i = shift(1 - i / S),
i = 0..S (Euler: one call per step; Heun: the trapezoidal correction, two calls per step except the
last, which ends at t = 0 where Heun's second evaluation is not defined and takes the Euler step,
as Karras et al. 2022 Algorithm 1 and diffusers' FlowMatchHeunDiscreteScheduler do). The grid
reaches t = 0 exactly, so the sampler returns the model's clean estimate; diffusers' default grid
instead stops its linspace at 1/1000 before its final jump to 0 (pass ``sigmas`` to it to get ours).
Classifier-free guidance is bound into ``model_fn`` as for the other samplers (``guidance.py``):
v is affine in the network output, so guiding v is guiding the implied x_0 and eps.

img2img and inpainting follow the diffusion samplers' rules (``sampling_loop.SamplingLoop``) with the
flow's interpolation as the noising rule: strength s runs the last floor(s S) steps from
(1 - t) x_init + t x_T at the first of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ldm_scale.choices import Choice
from ldm_scale.diffusion.noise import randn_like
from ldm_scale.diffusion.sampling_loop import SamplingLoop, StepCallback

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TIMESTEP_SCALE = 1000.0  # network timestep = 1000 t (SD3 / diffusers)


class FlowTimesteps(Choice):
    """``diffusion.flow_timesteps``: how training draws t."""

    uniform = "uniform"
    logit_normal = "logit_normal"


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's resolution shift t' = a t / (1 + (a - 1) t) (identity for a = 1; maps 0 -> 0, 1 -> 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps, with ``t`` a float or a [B] tensor broadcast over the sample."""
    if isinstance(t, torch.Tensor):
        t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x_0 (constant along each straight path)."""
    return noise - x0


def flow_x0(velocity: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """The clean estimate x_0 = x_t - t v implied by a velocity at time t."""
    return x_t - t * velocity


def sample_flow_timesteps(batch: int, kind: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                          shift: float = 1.0, generator: Optional[torch.Generator] = None,
                          device: Optional[torch.device] = None) -> torch.Tensor:
    """Training times t [B] in (0, 1) float32, drawn from ``generator`` (on its device)."""
    draw_device = generator.device if generator is not None else device
    kind = FlowTimesteps(kind).value
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device)
    else:
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=draw_device))
    return shift_time(t, shift)


def flow_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    *,
    timesteps: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: Optional[torch.Generator] = None,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow MSE per sample: returns ``(loss[B] float32, t[B] float32 in [0, 1])``.

    ``model_fn(x_t, 1000 t)`` returns the velocity (conditioning bound). ``t`` and ``noise`` may be
    given (validation, tests); otherwise drawn from ``generator`` (the global RNG when None). The
    squared error is taken in float32 whatever the network computes in.
    """
    if t is None:
        t = sample_flow_timesteps(x0.shape[0], timesteps, logit_mean=logit_mean, logit_std=logit_std, shift=shift,
                                  generator=generator, device=x0.device)
    t = t.to(device=x0.device, dtype=torch.float32)
    if noise is None:
        noise = randn_like(x0, generator)
    x_t = flow_interpolate(x0, noise, t)
    target = flow_velocity_target(x0, noise)
    prediction = model_fn(x_t, t * TIMESTEP_SCALE)
    if prediction.shape != target.shape:
        raise ValueError(f"the network returned shape {tuple(prediction.shape)}, expected {tuple(target.shape)}: "
                         "its out_channels must equal the latent channels")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1), t


# --------------------------------------------------------------------------------------------
# Samplers

@dataclass(frozen=True)
class FlowPlan:
    """Descending times t_0 = 1 > ... > t_S = 0 (shifted); step i integrates t_i -> t_{i+1}."""

    times: List[float]

    def __len__(self) -> int:
        return len(self.times) - 1

    def last(self, n: int) -> "FlowPlan":
        return FlowPlan(self.times[-(n + 1):])


def flow_plan(steps: int, shift: float = 1.0) -> FlowPlan:
    """S Euler/Heun steps on t_i = shift(1 - i / S) (float64 arithmetic, Python floats)."""
    if steps < 1:
        raise ValueError(f"flow samplers need steps >= 1, got {steps}")
    return FlowPlan([float(shift_time(1.0 - i / steps, shift)) for i in range(steps + 1)])


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    t_batch = torch.full((x.shape[0],), t * TIMESTEP_SCALE, dtype=torch.float32, device=x.device)
    return model_fn(x, t_batch).to(x.dtype)


@torch.no_grad()
def flow_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    *,
    steps: int = 28,
    shift: float = 1.0,
    order: int = 1,
    generator: Optional[torch.Generator] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    inpaint_mask: Optional[torch.Tensor] = None,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Integrate the flow ODE from noise ``x_T`` (t = 1) to t = 0: ``order`` 1 = Euler, 2 = Heun.

    ``on_step(i, n, x, x0_pred)`` after each step. ``generator`` is only used for inpainting's
    re-noising of the known region. The state stays in x_T's dtype (float32 recommended).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
    plan = flow_plan(steps, shift)
    # The loop's plan interface: timesteps (unused here), start level and next level of each step.
    loop = SamplingLoop(_LoopPlan(plan), x_T, None, init_latent, strength, inpaint_mask, generator,
                         noised=flow_interpolate)

    def step(i: int, x: torch.Tensor, _t: int, t: float, t_next: float) -> Tuple[torch.Tensor, torch.Tensor]:
        v = _velocity(model_fn, x, t)
        x0 = flow_x0(v, x, t)
        x_next = x + (t_next - t) * v
        if order == 2 and t_next > 0:
            v_next = _velocity(model_fn, x_next, t_next)
            x_next = x + (t_next - t) * (v + v_next) / 2
        return x_next, x0

    return loop.run(step, on_step)


@dataclass(frozen=True)
class _LoopPlan:
    """A :class:`FlowPlan` seen through the fields ``sampling_loop.SamplingLoop`` reads: ``alphas`` holds
    each step's start time and ``alphas_prev`` its end time (the loop only passes them through and
    hands the start level to the noising rule)."""

    flow: FlowPlan

    @property
    def timesteps(self) -> List[float]:
        return [t * TIMESTEP_SCALE for t in self.flow.times[:-1]]

    @property
    def alphas(self) -> List[float]:
        return self.flow.times[:-1]

    @property
    def alphas_prev(self) -> List[float]:
        return self.flow.times[1:]

    def __len__(self) -> int:
        return len(self.flow)

    def last(self, n: int) -> "_LoopPlan":
        return _LoopPlan(self.flow.last(n))


def flow_model_calls(steps: int, order: int) -> int:
    """Denoiser calls of :func:`flow_sample`: S (Euler) or 2 S - 1 (Heun: no correction at t = 0)."""
    return steps if order == 1 else 2 * steps - 1


__all__ = ["FlowTimesteps", "TIMESTEP_SCALE", "shift_time", "flow_interpolate", "flow_velocity_target", "flow_x0",
           "sample_flow_timesteps", "flow_loss", "FlowPlan", "flow_plan", "flow_sample", "flow_model_calls"]
