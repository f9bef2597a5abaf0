"""Pure diffusion maths: schedules, training objective, samplers, guidance (torch only, no I/O)."""
from ldm_scale.diffusion.guidance import bind_condition, classifier_free
from ldm_scale.diffusion.latent_scale import latent_moments, scale_factor_from_moments
from ldm_scale.diffusion.objective import (
    DiffusionConfig,
    diffusion_loss,
    drop_conditions,
    loss_weight,
    q_sample,
)
from ldm_scale.diffusion.prediction import (
    PARAMETERIZATIONS,
    prediction_target,
    to_eps,
    x0_and_eps,
)
from ldm_scale.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    SamplerConfig,
    ddim_invert,
    ddim_plan,
    ddim_sample,
    ddpm_plan,
    ddpm_sample,
    num_sampling_steps,
    plms_sample,
    sample,
    sampling_timesteps,
)
from ldm_scale.diffusion.schedule import SCHEDULE_KINDS, NoiseSchedule, make_schedule

__all__ = [
    "NoiseSchedule", "make_schedule", "SCHEDULE_KINDS",
    "PARAMETERIZATIONS", "x0_and_eps", "prediction_target", "to_eps",
    "DiffusionConfig", "q_sample", "diffusion_loss", "loss_weight", "drop_conditions",
    "latent_moments", "scale_factor_from_moments",
    "SamplerConfig", "SAMPLERS", "SPACINGS", "sampling_timesteps", "ddim_plan", "ddpm_plan",
    "ddim_sample", "ddim_invert", "plms_sample", "ddpm_sample", "sample", "num_sampling_steps",
    "bind_condition", "classifier_free",
]
