"""DDIM, PLMS and DDPM ancestral samplers: pure functions of a denoiser callable.

A denoiser is ``model_fn(x, t) -> prediction`` with ``t`` a ``LongTensor[B]`` of training
timesteps and the prediction in the network's native ``parameterization`` (eps / v / x0, see
``prediction.py``); conditioning and classifier-free guidance are bound into it beforehand
(``guidance.py``). All randomness comes from the explicit ``generator``. The sampler state stays in
the dtype of ``x_T`` (float32 recommended) whatever the network computes in; per-step coefficients
are computed in float64 from the schedule.

Timestep conventions (``sampling_timesteps``), with T training steps and S sampling steps:

* ``uniform``: t_i = i * (T // S) + 1, i = 0..S-1. This is CompVis' ``make_ddim_timesteps``
  ("uniform", which adds 1 so that the last step is t = 1 and the first is T - T/S + 1) and equals
  diffusers' ``timestep_spacing="leading", steps_offset=1``. CompVis takes ``range(0, T, T // S)``,
  which has one entry more than S when S does not divide T; we always take exactly S steps.
* ``quadratic``: t_i = floor((i * sqrt(0.8 T) / (S - 1))^2) + 1 (CompVis "quad"). Dense near
  t = 0; for large S the floor repeats small timesteps, and repeats are removed (a repeated DDIM
  step is the identity, a repeated PLMS step would corrupt its history), so fewer than S steps may run.
* ``trailing``: t_i = round(T - i T / S) - 1, ending the plan at t = T - 1 (Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2; diffusers "trailing").

Going down the plan, step i moves from abar_{t_i} to the next timestep's abar; the last step goes
to ``alphas_cumprod[0]`` (not 1), like CompVis and diffusers' ``set_alpha_to_one=False``, so DDIM
and PLMS return x at noise level 1 - abar_0 = beta_0 (~8.5e-4 for the LDM schedule) rather than the
predicted x_0. The DDPM sampler ends at abar = 1, i.e. at x_0 itself (Ho et al. Algorithm 2).

img2img (SDEdit, Meng et al. 2022) and inpainting are options of every sampler: with ``init_latent``
and ``strength`` s < 1 only the last floor(s S) steps run, starting from ``init_latent`` noised to
the first of them with ``x_T`` as the noise (diffusers' convention; CompVis' img2img script noises to
one DDIM step beyond the first step it runs). With ``inpaint_mask`` (1 = keep ``init_latent``,
0 = generate; latent resolution) the known region is re-noised to the current level and pasted in
before every step (CompVis ``p_sample_ddim`` ``mask``/``x0``), and pasted clean at the end.
Models trained with the mask concatenated to their input (9-channel inpainting) instead get a
``"concat"`` condition (``ldm_scale.sampling``) and run the plain samplers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ldm_scale.choices import Choice

from ldm_scale.diffusion.flow import flow_sample
from ldm_scale.diffusion.noise import randn_like
from ldm_scale.diffusion.prediction import check_parameterization, x0_and_eps
from ldm_scale.diffusion.sampling_loop import SamplingLoop, StepCallback
from ldm_scale.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplerName(Choice):
    """``sampler.name``: DDIM (Song et al. 2021), PLMS (Liu et al. 2022), ancestral DDPM for the
    diffusion parameterizations; Euler / Heun ODE steps for rectified flow."""

    ddim = "ddim"
    plms = "plms"
    ddpm = "ddpm"
    # Rectified-flow ODE samplers (diffusion/flow.py), for parameterization=flow models only.
    euler = "euler"
    heun = "heun"


class Spacing(Choice):
    """``sampler.spacing`` of the sampling timesteps: uniform (CompVis/SD, +1 offset) | quadratic |
    trailing (Lin et al. 2024; ends on the last training timestep)."""

    uniform = "uniform"
    quadratic = "quadratic"
    trailing = "trailing"


SAMPLERS = tuple(SamplerName.values())
FLOW_SAMPLERS = ("euler", "heun")
SPACINGS = tuple(Spacing.values())


@dataclass
class SamplerConfig:
    """How to sample an LDM (the ``sampler`` slice used by launch/sample.py and eval)."""

    name: SamplerName = "ddim"
    steps: int = 50  # ddpm: 0 or >= num_timesteps runs every training timestep
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 ~ DDPM posterior variance
    spacing: Spacing = "uniform"  # ddim/plms
    guidance_scale: float = 5.0  # 1.0 disables classifier-free guidance
    shift: float = 1.0  # euler/heun: SD3's time shift of the sampling grid (3.0 at 1024^2)

    def validate(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {SAMPLERS}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {SPACINGS}")
        if self.name != "ddpm" and self.steps < 1:
            raise ValueError(f"steps must be >= 1 for {self.name}, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.name == "plms" and self.eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {self.eta}")
        if self.shift <= 0:
            raise ValueError(f"sampler.shift must be > 0, got {self.shift}")

    def check_model(self, parameterization: str) -> None:
        """A flow model takes euler/heun, a diffusion model ddim/plms/ddpm: say which when not."""
        flow_model, flow_sampler = parameterization == "flow", self.name in FLOW_SAMPLERS
        if flow_model and not flow_sampler:
            raise ValueError(f"sampler.name={self.name} is a diffusion sampler but the model is a rectified-flow "
                             f"model (parameterization=flow): use sampler.name=euler or heun")
        if flow_sampler and not flow_model:
            raise ValueError(f"sampler.name={self.name} integrates a rectified flow but the model predicts "
                             f"{parameterization}: use sampler.name=ddim, plms or ddpm")


@dataclass(frozen=True)
class StepPlan:
    """Descending timesteps with the noise levels each step moves between."""

    timesteps: List[int]  # model timestep of step i
    alphas: List[float]  # abar at timesteps[i]
    alphas_prev: List[float]  # abar after step i

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def over(schedule: NoiseSchedule, timesteps: List[int], final_alpha: float) -> "StepPlan":
        """The plan visiting ``timesteps`` (descending): step i goes to the next one's abar, the last
        step to ``final_alpha``. abar is read in float64 (the per-step coefficients are float64)."""
        ac = schedule.alphas_cumprod.double().cpu()
        alphas = [float(ac[t]) for t in timesteps]
        return StepPlan(timesteps, alphas, alphas[1:] + [final_alpha])

    def last(self, n: int) -> "StepPlan":
        return StepPlan(self.timesteps[-n:], self.alphas[-n:], self.alphas_prev[-n:])


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """Ascending, distinct model timesteps of a DDIM/PLMS plan (conventions in the module docstring)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the training timesteps), got {steps}")
    if spacing == "uniform":
        ts = torch.arange(steps, dtype=torch.long) * (num_timesteps // steps) + 1
    elif spacing == "quadratic":
        ts = (torch.linspace(0, math.sqrt(num_timesteps * 0.8), steps, dtype=torch.float64) ** 2).long() + 1
    elif spacing == "trailing":
        ts = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)).long() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.unique(ts.clamp(0, num_timesteps - 1))


def ddim_plan(schedule: NoiseSchedule, steps: int, spacing: str = "uniform") -> StepPlan:
    """DDIM/PLMS plan: each step goes to the next lower plan timestep, the last to abar_0."""
    ts = sampling_timesteps(schedule.num_timesteps, steps, spacing).tolist()[::-1]
    return StepPlan.over(schedule, ts, float(schedule.alphas_cumprod[0]))


def ddpm_plan(schedule: NoiseSchedule, steps: Optional[int] = None) -> StepPlan:
    """Ancestral plan over every training timestep T-1..0, or S respaced ones i * (T // S).

    Respacing follows diffusers' DDPMScheduler ("leading"): step i uses the effective
    beta = 1 - abar_t / abar_prev between consecutive plan timesteps; the last step goes to abar = 1.
    """
    T = schedule.num_timesteps
    if not steps or steps >= T:
        ts = list(range(T - 1, -1, -1))
    else:
        ts = (torch.arange(steps, dtype=torch.long) * (T // steps)).tolist()[::-1]
    return StepPlan.over(schedule, ts, 1.0)


def ddim_update(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float,
                eta: float = 0.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One DDIM step abar=a -> a_prev (Song et al. 2021, Eq. 12 with sigma from Eq. 16).

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev).
    """
    # eta = 0 skips the square root: inversion calls this with a_prev < a.
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) if eta > 0 else 0.0
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise for the DDIM step")
        out = out + sigma * noise
    return out


def _predict(model_fn: ModelFn, x: torch.Tensor, t: int, alpha: float,
             parameterization: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from one denoiser call at plan timestep ``t`` (noise level ``alpha``), in x's dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return x0_and_eps(model_fn(x, t_batch).to(x.dtype), x, alpha, parameterization)


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    parameterization: str = "eps",
    generator: Optional[torch.Generator] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    inpaint_mask: Optional[torch.Tensor] = None,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for eta = 0; one model call per step.

    ``on_step(i, n, x, x0_pred)`` is called after each step. Noise for eta > 0 is drawn once per step.
    """
    def ddim_step(i: int, x: torch.Tensor, t: int, a: float, a_prev: float) -> Tuple[torch.Tensor, torch.Tensor]:
        x0, eps = _predict(model_fn, x, t, a, parameterization)
        noise = randn_like(x, generator) if eta > 0 else None
        return ddim_update(x, x0, eps, a, a_prev, eta, noise), x0

    loop = SamplingLoop(ddim_plan(schedule, steps, spacing), x_T, parameterization, init_latent, strength,
                         inpaint_mask, generator)
    return loop.run(ddim_step, on_step)


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    parameterization: str = "eps",
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion: run the eta = 0 update upwards in noise level.

    Maps a sample at abar_0 (what ``ddim_sample`` returns) back to the x_T that ``ddim_sample``
    with the same plan maps to it, up to the O(1/S) error of evaluating the model at the start
    rather than the end of each step (Song et al. 2021, Sec. 5.4; Dhariwal & Nichol 2021, App. F).
    """
    check_parameterization(parameterization)
    plan = ddim_plan(schedule, steps, spacing)
    x = x0
    timesteps_prev = plan.timesteps[1:] + [0]  # the timestep whose abar is alphas_prev[i]
    n = len(plan)
    for k, i in enumerate(range(n - 1, -1, -1)):
        a, a_prev, t_prev = plan.alphas[i], plan.alphas_prev[i], timesteps_prev[i]
        x0_pred, eps = _predict(model_fn, x, t_prev, a_prev, parameterization)
        x = ddim_update(x, x0_pred, eps, a_prev, a)
        if on_step is not None:
            on_step(k, n, x, x0_pred)
    return x


@torch.no_grad()
def plms_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    parameterization: str = "eps",
    generator: Optional[torch.Generator] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    inpaint_mask: Optional[torch.Tensor] = None,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM, Eq. 12 with the DDIM transfer of Eq. 9).

    eps' is the 4th-order Adams-Bashforth combination of the current and up to three previous eps
    (2nd and 3rd order while the history fills); the first step uses the pseudo improved Euler
    average of eps at x_t and at its DDIM-predicted successor (one extra model call), as CompVis'
    ``PLMSSampler`` and diffusers' ``PNDMScheduler(skip_prk_steps=True)`` do. S steps cost S + 1 calls.
    ``generator`` is only used for inpainting re-noising.
    """
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    loop = SamplingLoop(ddim_plan(schedule, steps, spacing), x_T, parameterization, init_latent, strength,
                         inpaint_mask, generator)
    plan = loop.plan
    history: List[torch.Tensor] = []  # eps of the previous (up to) three steps, oldest first

    def plms_step(i: int, x: torch.Tensor, t: int, a: float, a_prev: float) -> Tuple[torch.Tensor, torch.Tensor]:
        nonlocal history
        eps = _predict(model_fn, x, t, a, parameterization)[1]
        if not history:
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x_next = ddim_update(x, x0, eps, a, a_prev)
            j = min(i + 1, len(plan) - 1)
            a_next = plan.alphas[j] if j > i else a
            eps_next = _predict(model_fn, x_next, plan.timesteps[j], a_next, parameterization)[1]
            eps_prime = (eps + eps_next) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x0 = (x - math.sqrt(1 - a) * eps_prime) / math.sqrt(a)
        history = (history + [eps])[-3:]
        return ddim_update(x, x0, eps_prime, a, a_prev), x0

    return loop.run(plms_step, on_step)


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: Optional[int] = None,
    parameterization: str = "eps",
    generator: Optional[torch.Generator] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    inpaint_mask: Optional[torch.Tensor] = None,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Ancestral sampling from p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x0_pred) (Ho et al. 2020, Algorithm 2,
    posterior of Eq. 6-7 with the "fixed small" variance beta-tilde), all T steps unless ``steps`` respaces.

    Noise is drawn at every step whose timestep is > 0 (none at the final t = 0 step).
    """
    def ddpm_step(i: int, x: torch.Tensor, t: int, a: float, a_prev: float) -> Tuple[torch.Tensor, torch.Tensor]:
        x0, _ = _predict(model_fn, x, t, a, parameterization)
        beta = 1 - a / a_prev
        coef_x0 = math.sqrt(a_prev) * beta / (1 - a)
        coef_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        x_mean = coef_x0 * x0 + coef_xt * x
        if t == 0:
            return x_mean, x0
        variance = max((1 - a_prev) / (1 - a) * beta, 1e-20)
        return x_mean + math.sqrt(variance) * randn_like(x, generator), x0

    loop = SamplingLoop(ddpm_plan(schedule, steps), x_T, parameterization, init_latent, strength, inpaint_mask,
                         generator)
    return loop.run(ddpm_step, on_step)


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    cfg: SamplerConfig,
    *,
    parameterization: str = "eps",
    generator: Optional[torch.Generator] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    inpaint_mask: Optional[torch.Tensor] = None,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Dispatch to the sampler ``cfg.name`` names (guidance is already bound into ``model_fn``).
    ``schedule`` is not read by the flow samplers."""
    cfg.validate()
    cfg.check_model(parameterization)
    if cfg.name in FLOW_SAMPLERS:
        return flow_sample(model_fn, x_T, steps=cfg.steps, shift=cfg.shift, order=1 if cfg.name == "euler" else 2,
                           generator=generator, init_latent=init_latent, strength=strength,
                           inpaint_mask=inpaint_mask, on_step=on_step)
    common = dict(parameterization=parameterization, generator=generator, init_latent=init_latent,
                  strength=strength, inpaint_mask=inpaint_mask, on_step=on_step)
    if cfg.name == "ddim":
        return ddim_sample(model_fn, x_T, schedule, steps=cfg.steps, eta=cfg.eta, spacing=cfg.spacing, **common)
    if cfg.name == "plms":
        return plms_sample(model_fn, x_T, schedule, steps=cfg.steps, spacing=cfg.spacing, **common)
    return ddpm_sample(model_fn, x_T, schedule, steps=cfg.steps or None, **common)


def num_sampling_steps(cfg: SamplerConfig, schedule: NoiseSchedule, strength: float = 1.0) -> int:
    """Steps (``on_step`` calls) ``sample`` will run: the progress-bar unit. Denoiser calls are the
    same, plus one for PLMS (and each call is one 2B forward under guidance)."""
    if cfg.name in FLOW_SAMPLERS:
        return max(int(cfg.steps * strength), 1)
    if cfg.name == "ddpm":
        plan = ddpm_plan(schedule, cfg.steps or None)
    else:
        plan = ddim_plan(schedule, cfg.steps, cfg.spacing)
    return max(int(len(plan) * strength), 1)
