"""Schedules, parameterizations, the training objective, condition dropout and the latent scale factor."""
import math

import pytest
import torch

from ldm_scale.diffusion import (
    DiffusionConfig,
    diffusion_loss,
    drop_conditions,
    latent_moments,
    loss_weight,
    make_schedule,
    prediction_target,
    q_sample,
    scale_factor_from_moments,
    x0_and_eps,
)


def test_ldm_schedule_matches_published_numbers():
    s = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    assert s.betas.dtype == torch.float64
    # Stable Diffusion / LDM: beta linear in sqrt from 0.00085 to 0.012 -> abar_T = 0.0046601
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0046601, abs=1e-6)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.012, abs=1e-12)
    assert s.betas[500].item() == pytest.approx((0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2)
    assert torch.allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0].item() == 1.0
    # Ho et al. Eq. 7 posterior variance and the DDPM "clipped" log at t = 0.
    t = 10
    ab, ab_prev = s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
    assert s.posterior_variance[t].item() == pytest.approx((s.betas[t] * (1 - ab_prev) / (1 - ab)).item())
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    assert torch.allclose(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))


def test_linear_and_cosine_schedules():
    lin = make_schedule("linear", 1000, 1e-4, 0.02)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert lin.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # Ho et al.'s schedule
    cos = make_schedule("cosine", 1000)
    assert bool((cos.alphas_cumprod[1:] < cos.alphas_cumprod[:-1]).all())
    # Nichol & Dhariwal Eq. 17 at t = T/2: abar = cos^2(((0.5 + s) / (1 + s)) pi / 2)
    expected = math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert cos.alphas_cumprod[499].item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_schedule("sqrt")


def test_schedule_cast_once():
    s = make_schedule().to("cpu", torch.float32)
    assert s.alphas_cumprod.dtype == torch.float32 and s.num_timesteps == 1000
    x = torch.zeros(3, 4, 2, 2)
    g = s.gather("sqrt_alphas_cumprod", torch.tensor([0, 1, 999]), x)
    assert g.shape == (3, 1, 1, 1)


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_parameterization_conversions_are_exact(param):
    torch.manual_seed(0)
    x0, eps = torch.randn(8, 4, 3, 3, dtype=torch.float64), torch.randn(8, 4, 3, 3, dtype=torch.float64)
    abar = torch.rand(8, 1, 1, 1, dtype=torch.float64) * 0.98 + 0.01
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = prediction_target(param, x0, eps, abar)
    x0_rec, eps_rec = x0_and_eps(pred, x_t, abar, param)
    torch.testing.assert_close(x0_rec, x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(eps_rec, eps, atol=1e-12, rtol=0)


def test_v_definition():
    x0, eps, abar = torch.tensor([0.3]), torch.tensor([-1.2]), 0.64
    assert prediction_target("v", x0, eps, abar).item() == pytest.approx(0.8 * -1.2 - 0.6 * 0.3)


def test_q_sample_marginal():
    s = make_schedule()
    x0 = torch.full((4, 1), 2.0)
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.ones(4, 1)
    out = q_sample(x0, t, noise, s)
    ab = s.alphas_cumprod[t].float()
    torch.testing.assert_close(out[:, 0], 2 * ab.sqrt() + (1 - ab).sqrt())


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_diffusion_loss_zero_for_oracle_and_per_sample(param):
    s = make_schedule()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 4, 4, generator=g)
    noise = torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])

    def oracle(x_t, tt):
        return prediction_target(param, x0, noise, s.gather("alphas_cumprod", tt, x0))

    loss, t_out = diffusion_loss(oracle, x0, s, parameterization=param, t=t, noise=noise)
    assert loss.shape == (6,) and torch.equal(t_out, t)
    assert float(loss.max()) < 1e-10
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    loss, _ = diffusion_loss(zero, x0, s, parameterization=param, t=t, noise=noise)
    target = prediction_target(param, x0, noise, s.gather("alphas_cumprod", t, x0))
    torch.testing.assert_close(loss, target.pow(2).flatten(1).mean(1))


def test_diffusion_loss_draws_from_generator_and_min_snr():
    s = make_schedule()
    x0 = torch.randn(16, 4, 2, 2)
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    a = diffusion_loss(zero, x0, s, generator=torch.Generator().manual_seed(5))
    b = diffusion_loss(zero, x0, s, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[1].min()) >= 0 and int(a[1].max()) < 1000
    simple, t = diffusion_loss(zero, x0, s, generator=torch.Generator().manual_seed(5), parameterization="v")
    weighted, _ = diffusion_loss(zero, x0, s, generator=torch.Generator().manual_seed(5), parameterization="v",
                                 weighting="min_snr", min_snr_gamma=5.0)
    snr = s.snr[t].float()
    torch.testing.assert_close(weighted, simple * snr.clamp(max=5.0) / (snr + 1))


def test_min_snr_weights_are_the_x0_space_weight():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    clipped = snr.clamp(max=5.0)
    # weight_param * ||param error||^2 must equal min(snr, 5) * ||x0 error||^2
    torch.testing.assert_close(loss_weight(snr, "eps", "min_snr") * snr, clipped)
    torch.testing.assert_close(loss_weight(snr, "v", "min_snr") * (snr + 1), clipped)
    torch.testing.assert_close(loss_weight(snr, "x0", "min_snr"), clipped)
    torch.testing.assert_close(loss_weight(snr, "v", "simple"), torch.ones(4))


def test_offset_noise_shifts_channel_means():
    s = make_schedule()
    x0 = torch.zeros(256, 4, 8, 8)
    seen = {}

    def capture(x_t, t):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    t = torch.full((256,), 999)
    diffusion_loss(capture, x0, s, generator=torch.Generator().manual_seed(0), t=t, offset_noise=0.5)
    channel_means = seen["x_t"].mean(dim=(2, 3)) / s.sqrt_one_minus_alphas_cumprod[999].item()
    # per-channel mean has variance 1/64 (plain noise) + 0.25 (offset)
    assert channel_means.var().item() == pytest.approx(1 / 64 + 0.25, rel=0.15)


def test_drop_conditions_captions_and_labels():
    captions = [f"caption {i}" for i in range(2000)]
    out, dropped = drop_conditions(captions, 0.1, lambda n: [""] * n, torch.Generator().manual_seed(1))
    assert 0.08 < dropped.float().mean().item() < 0.12
    assert all((o == "") == d for o, d in zip(out, dropped.tolist()))
    assert all(o == c for o, c, d in zip(out, captions, dropped.tolist()) if not d)
    labels = torch.arange(1000) % 7
    out, dropped = drop_conditions(labels, 0.5, lambda n: torch.full((n,), 1000), torch.Generator().manual_seed(2))
    assert torch.equal(out[dropped], torch.full((int(dropped.sum()),), 1000))
    assert torch.equal(out[~dropped], labels[~dropped])
    assert drop_conditions(None, 0.1, lambda n: None)[0] is None
    assert drop_conditions(["a", "b"], 0.0, lambda n: [""] * n)[0] == ["a", "b"]


def test_scale_factor_from_moments_summed_over_ranks():
    z = torch.randn(8, 4, 16, 16) * 5.4 + 0.3
    # two "ranks" each hold half the first batch; the trainer sums their moments
    moments = latent_moments(z[:4]) + latent_moments(z[4:])
    factor = scale_factor_from_moments(moments)
    assert factor == pytest.approx(1.0 / z.flatten().double().std().item(), rel=1e-9)
    with pytest.raises(ValueError, match="constant"):
        scale_factor_from_moments(latent_moments(torch.ones(10)))


def test_diffusion_config_validation():
    DiffusionConfig().validate()
    with pytest.raises(ValueError, match="parameterization"):
        DiffusionConfig(parameterization="score").validate()
    with pytest.raises(ValueError, match="weighting"):
        DiffusionConfig(weighting="p2").validate()
    assert DiffusionConfig().make_schedule().num_timesteps == 1000
