"""Rectified flow (ldm_scale/diffusion/flow.py): closed forms on Gaussian data, and the samplers
against diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_scale.diffusion import SamplerConfig, classifier_free, sample
from ldm_scale.diffusion.flow import (
    TIMESTEP_SCALE,
    flow_interpolate,
    flow_loss,
    flow_model_calls,
    flow_plan,
    flow_sample,
    sample_flow_timesteps,
    shift_time,
)
from ldm_scale.diffusion.objective import DiffusionConfig
from ldm_scale.diffusion.prediction import x0_and_eps

MU, SIGMA = 0.7, 0.4  # the data: x0 ~ N(MU, SIGMA^2) per coordinate


def optimal_velocity(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for Gaussian data (x_t ~ N((1-t) MU, (1-t)^2 SIGMA^2 + t^2)):
    the minimiser of the rectified-flow loss, in closed form."""
    t = (t_model / TIMESTEP_SCALE).double().view(-1, *([1] * (x.dim() - 1)))
    x = x.double()
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x - (1 - t) * MU
    e_x0 = MU + (1 - t) * SIGMA**2 / var * centred
    e_eps = t / var * centred
    return (e_eps - e_x0).float()


def test_euler_on_the_exact_velocity_reproduces_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 2, 2, generator=g)
    out = flow_sample(optimal_velocity, x_T, steps=400)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(SIGMA, abs=0.01)
    # The flow of a Gaussian is the monotone linear map x_1 -> MU + SIGMA x_1. Pointwise the error
    # falls as 1/S for Euler and 1/S^2 for Heun: doubling S halves / quarters it (float64 state).
    x = x_T[:2000].double()
    exact = MU + SIGMA * x

    def error(steps, order):
        got = flow_sample(lambda a, b: optimal_velocity(a, b).double(), x, steps=steps, order=order)
        return (got - exact).abs().max().item()

    e100, e200, e400 = error(100, 1), error(200, 1), error(400, 1)
    assert e400 < 0.01 and e100 / e200 == pytest.approx(2, rel=0.05) and e200 / e400 == pytest.approx(2, rel=0.05)
    h20, h40 = error(20, 2), error(40, 2)
    assert h40 < 0.003 and h20 / h40 == pytest.approx(4, rel=0.1)


def test_loss_is_the_velocity_mse_and_the_optimal_field_minimises_it():
    g = torch.Generator().manual_seed(1)
    x0 = MU + SIGMA * torch.randn(4096, 1, 2, 2, generator=g)
    t = torch.rand(4096, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss, t_used = flow_loss(model, x0, t=t, noise=noise)
    torch.testing.assert_close(seen["t"], t * 1000)
    torch.testing.assert_close(seen["x"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, (noise - x0).pow(2).flatten(1).mean(1))
    best = flow_loss(optimal_velocity, x0, t=t, noise=noise)[0].mean()
    worse = flow_loss(lambda x, tt: optimal_velocity(x, tt) * 1.1, x0, t=t, noise=noise)[0].mean()
    assert best < worse < loss.mean()
    assert torch.equal(t_used, t)


def test_timestep_sampling_uniform_logit_normal_and_shift():
    g = torch.Generator().manual_seed(2)
    t = sample_flow_timesteps(200000, "logit_normal", logit_mean=0.5, logit_std=0.8, generator=g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)
    u = sample_flow_timesteps(200000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.005)
    shifted = sample_flow_timesteps(200000, "uniform", shift=3.0, generator=torch.Generator().manual_seed(3))
    plain = sample_flow_timesteps(200000, "uniform", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    # SD3 Eq. 23: the shift keeps 0 and 1 and moves mass towards noise; median of shift-3 uniform = 0.75.
    assert shift_time(0.0, 3.0) == 0 and shift_time(1.0, 3.0) == 1 and shift_time(0.5, 3.0) == 0.75
    with pytest.raises(ValueError):
        sample_flow_timesteps(4, "cosine")


def _toy_velocity(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
    t = (t_model / 1000).view(-1, 1, 1, 1)
    return torch.tanh(x) * (1 + t) - 0.3 * x * t + 0.1


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_equals_diffusers_flow_match_euler(shift):
    steps = 12
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # Our grid shift(1 - i/S): diffusers shifts the sigmas it is given and appends 0.
    sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(_toy_velocity(ref, t.expand(3)), t, ref).prev_sample
    torch.testing.assert_close(torch.tensor(flow_plan(steps, shift).times, dtype=torch.float32), sched.sigmas)
    got = flow_sample(_toy_velocity, x, steps=steps, shift=shift)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_equals_diffusers_flow_match_heun(shift):
    steps = 8
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    sched = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    # Put our grid in diffusers' Heun layout (its set_timesteps builds the same from its own grid,
    # which ends at shift(1/1000) instead of 1/S: every interior time twice, 0 at the end).
    sigmas = torch.tensor(flow_plan(steps, shift).times, dtype=torch.float32)
    sched.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    timesteps = sigmas[:-1] * 1000
    sched.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    ref, calls = x.clone(), 0
    for t in sched.timesteps:
        ref = sched.step(_toy_velocity(ref, t.expand(3)), t, ref).prev_sample
        calls += 1
    counted = []
    got = flow_sample(lambda a, b: counted.append(1) or _toy_velocity(a, b), x, steps=steps, shift=shift, order=2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(counted) == flow_model_calls(steps, 2) == 2 * steps - 1 == calls  # last step: Euler


def test_img2img_strength_starts_on_the_flow_path_and_inpainting_keeps_the_known_region():
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    init = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    plan = flow_plan(10)
    # A zero velocity leaves the start state as it is: x_start = (1 - t_k) init + t_k x_T for the
    # first of the last floor(0.3 * 10) = 3 steps, t_k = 0.3.
    out = flow_sample(lambda x, t: torch.zeros_like(x), x_T, steps=10, init_latent=init, strength=0.3)
    torch.testing.assert_close(out, flow_interpolate(init, x_T, plan.times[7]))
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    out = flow_sample(_toy_velocity, x_T, steps=6, init_latent=init, inpaint_mask=mask,
                      generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out[..., :2], init[..., :2], rtol=0, atol=0)


def test_guided_flow_sampling_and_the_sampler_model_pairing():
    cond, uncond = {"y": torch.tensor([1, 2])}, {"y": torch.tensor([0, 0])}

    def model(x, t, c):
        return _toy_velocity(x, t) + c["y"].view(-1, 1, 1, 1).float()

    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    cfg = SamplerConfig(name="euler", steps=5, guidance_scale=3.0)
    got = sample(classifier_free(model, cond, uncond, 3.0), x_T, None, cfg, parameterization="flow")
    want = flow_sample(lambda x, t: _toy_velocity(x, t) + 3.0 * cond["y"].view(-1, 1, 1, 1).float(), x_T, steps=5)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="rectified-flow model.*use sampler.name=euler or heun"):
        sample(model, x_T, None, SamplerConfig(name="ddim"), parameterization="flow")
    with pytest.raises(ValueError, match="predicts eps: use sampler.name=ddim"):
        sample(model, x_T, None, SamplerConfig(name="heun"), parameterization="eps")
    with pytest.raises(ValueError, match="not a noise-schedule"):
        x0_and_eps(x_T, x_T, 0.5, "flow")


def test_flow_config_refuses_what_it_does_not_define():
    DiffusionConfig(parameterization="flow", flow_timesteps="uniform", flow_shift=3.0).validate()
    with pytest.raises(ValueError, match="weighting=simple"):
        DiffusionConfig(parameterization="flow", weighting="min_snr").validate()
    with pytest.raises(ValueError, match="offset_noise"):
        DiffusionConfig(parameterization="flow", offset_noise=0.1).validate()
    assert math.isclose(flow_plan(4, 3.0).times[2], 0.75)
