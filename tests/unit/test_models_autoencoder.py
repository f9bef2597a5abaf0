"""KL / VQ autoencoders, posterior and quantiser (tiny configs, CPU)."""

import math

import pytest
import torch

from ldm_scale.models import (
    AUTOENCODERS,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    VQModel,
    build_autoencoder,
)
from ldm_scale.models.quantize import VectorQuantizer, codebook_statistics


@pytest.mark.parametrize("name", ["kl_tiny", "vq_tiny"])
def test_tiny_round_trip_shapes(name):
    torch.manual_seed(0)
    ae = build_autoencoder(name)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode_to_latent(x, generator=torch.Generator().manual_seed(0))
    f = AUTOENCODERS[name].downsample_factor
    assert ae.downsample_factor == f == 4
    assert z.shape == (2, ae.latent_channels, 32 // f, 32 // f)
    assert ae.decode_from_latent(z).shape == x.shape
    assert ae.get_last_layer() is ae.decoder.conv_out.weight
    if isinstance(ae, AutoencoderKL):
        recon, posterior = ae(x)
        assert recon.shape == x.shape and posterior.kl().shape == (2,)
        # sample(generator) is reproducible; mode() is the mean.
        post = ae.encode(x)
        torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)),
                                   post.sample(torch.Generator().manual_seed(3)))
        assert torch.equal(post.mode(), post.mean)
    else:
        recon, loss, info = ae(x)
        assert recon.shape == x.shape and loss.ndim == 0
        assert set(info) >= {"perplexity", "usage", "indices"}
        h = ae.encode_prequant(x)
        # decode_prequant absorbs the quantiser; force_not_quantize skips it.
        torch.testing.assert_close(ae.decode_prequant(h), ae.decode(ae.quantize(h)[0]))
        assert not torch.allclose(ae.decode_prequant(h, force_not_quantize=True), ae.decode_prequant(h))


@pytest.mark.parametrize("name", ["kl_f4", "kl_f8", "kl_f16", "kl_f32", "vq_f4", "vq_f8"])
def test_big_autoencoders_on_meta(name):
    cfg = AUTOENCODERS[name]
    ae = build_autoencoder(name, device="meta")
    assert all(p.is_meta for p in ae.parameters())
    x = torch.empty(1, 3, 256, 256, device="meta")
    z = ae.encode_to_latent(x)
    f = cfg.downsample_factor
    assert f == int(name.split("_f")[1])
    assert z.shape == (1, cfg.latent_channels, 256 // f, 256 // f)
    assert ae.decode_from_latent(z).shape == x.shape


def test_kl_f8_parameter_count_matches_stable_diffusion_vae():
    # The SD v1 VAE (= CompVis kl-f8) has 83,653,863 parameters.
    ae = build_autoencoder("kl_f8", device="meta")
    assert sum(p.numel() for p in ae.parameters()) == 83_653_863


def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 8, 4, 4, generator=g)
    post = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    closed = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), closed)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)),
                               atol=1e-4, rtol=1e-5)
    other = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 4, generator=g))
    p2 = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(q, p2).sum(dim=(1, 2, 3)),
                               atol=1e-4, rtol=1e-4)
    x = torch.randn(3, 4, 4, 4, generator=g)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)), atol=1e-4, rtol=1e-5)
    assert math.isclose(float(DiagonalGaussianDistribution(torch.zeros(1, 2, 1, 1)).kl()), 0.0)


def test_posterior_sample_statistics():
    params = torch.cat([torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), math.log(0.25))], dim=1)
    s = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.01 and abs(s.std().item() - 0.5) < 0.01


def test_vq_straight_through_gradients_reach_encoder_and_codebook():
    torch.manual_seed(0)
    vq = build_autoencoder("vq_tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, emb_loss, _ = vq(x)
    ((recon - x).pow(2).mean() + emb_loss).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0  # through the codebook loss
    assert vq.quant_conv.weight.grad.abs().sum() > 0


def test_quantiser_beta_placement_and_straight_through_value():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.1, 0.2], [0.9, 1.3]]).t().reshape(1, 2, 1, 2)  # two positions
    for legacy in (True, False):
        q = VectorQuantizer(2, 2, beta=0.25, legacy_beta=legacy)
        with torch.no_grad():
            q.embedding.weight.copy_(codebook)
        z_in = z.clone().requires_grad_(True)
        z_q, loss, info = q(z_in)
        torch.testing.assert_close(z_q.detach(), torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2))
        assert info["indices"].tolist() == [[[0, 1]]]
        mse = (z - z_q.detach()).pow(2).mean()
        # Both terms have the same value; beta weighs one of them: loss = (1 + beta) * mse.
        torch.testing.assert_close(loss, 1.25 * mse)
        loss.backward()
        # d loss / d z comes from the commitment term only: weight 1 (legacy) or beta (corrected).
        weight = 1.0 if legacy else 0.25
        torch.testing.assert_close(z_in.grad, weight * 2 * (z - z_q.detach()) / z.numel())


def test_codebook_perplexity_and_usage():
    # 4 codes used uniformly out of 8 -> perplexity 4, usage 0.5.
    perplexity, usage = codebook_statistics(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    assert math.isclose(perplexity.item(), 4.0, rel_tol=1e-5) and usage.item() == 0.5
    perplexity, usage = codebook_statistics(torch.zeros(10, dtype=torch.long), 16)
    assert math.isclose(perplexity.item(), 1.0, rel_tol=1e-5) and usage.item() == 1 / 16
    # p = (1/2, 1/4, 1/4): exp(H) = 2^(3/2).
    perplexity, _ = codebook_statistics(torch.tensor([0, 0, 1, 2]), 3)
    assert math.isclose(perplexity.item(), 2 ** 1.5, rel_tol=1e-5)


def test_config_errors_are_clear():
    from ldm_scale.models import AutoencoderConfig, EncoderDecoderConfig, VQConfig

    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(AutoencoderConfig(ddconfig=EncoderDecoderConfig(double_z=False, ch=32, ch_mult=[1])))
    with pytest.raises(ValueError, match="double_z"):
        VQModel(VQConfig(ddconfig=EncoderDecoderConfig(double_z=True, ch=32, ch_mult=[1])))
    with pytest.raises(ValueError, match="multiple of 32"):
        build_autoencoder(AutoencoderConfig(ddconfig=EncoderDecoderConfig(ch=16, ch_mult=[1])))
