"""The generator objective on the real tiny KL / VQ autoencoders (no DeepSpeed): gradients reach the
codebook, the log-variance and the decoder, never the discriminator's weights; the adaptive
weight computed inside the module's forward equals a direct autograd computation."""
import pytest
import torch

from ldm_scale.losses import (AutoencoderLoss, AutoencoderLossConfig, DiscriminatorConfig, LearnedLogVariance,
                              PatchDiscriminator)
from ldm_scale.models.registry import AUTOENCODERS, FirstStageConfig, build_autoencoder
from ldm_scale.train.autoencoder_task import AutoencoderGenerator, DiscriminatorWithLoss, check_autoencoder_plan


def _generator(kind: str, learn_logvar: bool = True) -> AutoencoderGenerator:
    torch.manual_seed(0)
    return AutoencoderGenerator(build_autoencoder(AUTOENCODERS[f"{kind}_tiny"]),
                                LearnedLogVariance(0.0, learn=learn_logvar), kind)


def _disc() -> PatchDiscriminator:
    return PatchDiscriminator(DiscriminatorConfig(num_layers=2, base_channels=8))


def test_vq_codebook_receives_gradients_and_reports_usage():
    gen = _generator("vq", learn_logvar=False)
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, nll_reduction="mean", learn_logvar=False, disc_start=10)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs, recon = gen(x, step=0, objective=AutoencoderLoss(cfg, None), discriminator=None)
    loss.backward()
    codebook = gen.autoencoder.quantize.embedding.weight
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    assert gen.autoencoder.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through to the encoder
    assert logs["codebook_loss"] > 0 and 1.0 <= logs["perplexity"] <= 256
    assert 0 < logs["codebook_usage"] <= 1
    assert not recon.requires_grad


def test_kl_generator_trains_logvar_and_not_the_discriminator():
    gen, disc = _generator("kl"), _disc()
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs, _ = gen(x, step=0, objective=AutoencoderLoss(cfg, None), discriminator=disc)
    loss.backward()
    assert gen.loss_logvar.logvar.grad.abs().item() > 0
    assert gen.autoencoder.get_last_layer().grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again after the forward
    assert logs["d_weight"] > 0 and logs["kl_loss"] > 0


def test_adaptive_weight_inside_forward_matches_direct_autograd():
    gen, disc = _generator("kl"), _disc()
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.5, adaptive_weight_max=1e12)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(5)
    _, logs, _ = gen(x, step=0, objective=AutoencoderLoss(cfg, None), discriminator=disc)

    torch.manual_seed(5)  # the same posterior sample
    recon, posterior = gen.autoencoder(x)
    last = gen.autoencoder.get_last_layer()
    nll = (x - recon).abs().sum() / 2  # logvar = 0
    g = -disc(recon).mean()
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last)[0]
    expected = 0.5 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert logs["d_weight"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_discriminator_module_scores_real_and_fake_separately():
    d = DiscriminatorWithLoss(_disc())
    cfg = AutoencoderLossConfig(perceptual_weight=0.0)
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32).requires_grad_(True)
    loss, logs = d(real, fake, objective=AutoencoderLoss(cfg, None))
    loss.backward()
    assert fake.grad is None  # the reconstruction is detached: D's loss never reaches the generator
    assert all(p.grad is not None for p in d.parameters())
    assert set(logs) == {"disc_loss", "logits_real", "logits_fake"}


def test_plan_check_refuses_zero3_with_the_reason():
    fs = AUTOENCODERS["kl_tiny"]
    with pytest.raises(ValueError, match="stage=3.*autograd.grad.*last-layer.*partitions"):
        check_autoencoder_plan(fs, AutoencoderLossConfig(), zero_stage=3)
    check_autoencoder_plan(fs, AutoencoderLossConfig(), zero_stage=2, image_size=32)
    with pytest.raises(ValueError, match="not divisible"):
        check_autoencoder_plan(fs, AutoencoderLossConfig(), zero_stage=2, image_size=30)
    with pytest.raises(ValueError, match="kind"):
        check_autoencoder_plan(FirstStageConfig(kind="gan"), AutoencoderLossConfig(), zero_stage=1)


def test_config_validate_refuses_zero3_for_autoencoders():
    from ldm_scale import config as config_lib

    cfg = config_lib.to_object(config_lib.compose(
        ["experiment=autoencoder_tiny", "deepspeed=zero3", "data.urls=['/data/{00000..00007}.tar']"]))
    with pytest.raises(config_lib.ConfigError, match="zero.stage=3.*last-layer weight"):
        config_lib.validate(cfg, world_size=2)
    cfg.deepspeed.zero.stage = 2
    assert config_lib.validate(cfg, world_size=2).autoencoder.kind == "kl"
