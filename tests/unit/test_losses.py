"""Autoencoder loss terms against hand-computed values, the adaptive weight against a direct autograd
computation, the GAN switch at disc_start, the learned log-variance, and LPIPS weight loading."""
import logging
import math

import pytest
import torch
from torch import nn

from ldm_scale.losses import (AutoencoderLoss, AutoencoderLossConfig, DiscriminatorConfig, LearnedLogVariance,
                              PatchDiscriminator, PerceptualConfig, adaptive_weight, build_lpips, gan_active,
                              gaussian_nll, hinge_d_loss, reconstruction_error, vanilla_d_loss)
from ldm_scale.losses.discriminator import generator_adversarial_loss


class ConstantPerceptual(nn.Module):
    """Stands in for LPIPS where a test wants a known perceptual distance per image."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.tensor(values))
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, a, b):
        return self.values.view(-1, 1, 1, 1).to(a.dtype) + 0.0 * (a - b).mean()


def test_hinge_and_vanilla_d_loss_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.0 / 3)


def test_reconstruction_and_nll_hand_computed():
    x = torch.tensor([[[[0.0, 1.0], [0.5, -1.0]]]])  # [1, 1, 2, 2]
    y = torch.tensor([[[[0.5, 1.0], [0.0, 0.0]]]])
    p = torch.tensor([0.25]).view(1, 1, 1, 1)
    rec = reconstruction_error(x, y, p, pixel_weight=2.0, perceptual_weight=4.0)
    # 2 * |x - y| = [1, 0, 1, 2]; + 4 * 0.25 = [2, 1, 2, 3]
    assert torch.allclose(rec.flatten(), torch.tensor([2.0, 1.0, 2.0, 3.0]))
    logvar = torch.tensor(math.log(2.0))
    # sum over pixels of rec/2 + log 2, one image
    assert gaussian_nll(rec, logvar, "sum").item() == pytest.approx(8.0 / 2 + 4 * math.log(2.0))
    assert gaussian_nll(rec, logvar, "mean").item() == pytest.approx((8.0 / 2 + 4 * math.log(2.0)) / 4)
    two = torch.cat([rec, 3 * rec])  # batch of 2: the sum reduction averages over images
    assert gaussian_nll(two, torch.tensor(0.0), "sum").item() == pytest.approx((8.0 + 24.0) / 2)


def test_generator_loss_kl_hand_computed_before_disc_start():
    cfg = AutoencoderLossConfig(kl_weight=0.1, perceptual_weight=0.5, disc_start=10)
    loss_fn = AutoencoderLoss(cfg, ConstantPerceptual([0.2, 0.4]))
    x = torch.zeros(2, 1, 1, 2)
    y = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(2, 1, 1, 2)
    kl = torch.tensor([3.0, 5.0])
    loss, logs = loss_fn.generator_loss(x, y, logvar=torch.tensor(0.0), step=9, kl=kl)
    # per-pixel rec: image 0 [1 + .1, 1 + .1], image 1 [.5 + .2, 0 + .2]; sum / 2 images
    nll = (2.2 + 0.9) / 2
    assert logs["nll_loss"].item() == pytest.approx(nll)
    assert logs["kl_loss"].item() == pytest.approx(4.0)
    assert loss.item() == pytest.approx(nll + 0.1 * 4.0)
    assert logs["d_weight"].item() == 0.0 and logs["g_loss"].item() == 0.0
    assert logs["p_loss"].item() == pytest.approx(0.3)


def test_generator_loss_vq_uses_codebook_term():
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, nll_reduction="mean", learn_logvar=False,
                                codebook_weight=2.0, disc_start=0, disc_factor=0.0)
    loss_fn = AutoencoderLoss(cfg, None)
    x, y = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    loss, logs = loss_fn.generator_loss(x, y, logvar=torch.tensor(0.0), step=5, codebook_loss=torch.tensor(0.3))
    assert loss.item() == pytest.approx(0.5 + 2.0 * 0.3)
    assert logs["codebook_loss"].item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="exactly one"):
        loss_fn.generator_loss(x, y, logvar=torch.tensor(0.0), step=0)


def _tiny_decoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 3, padding=1))


def test_adaptive_weight_matches_direct_autograd():
    decoder = _tiny_decoder()
    disc = PatchDiscriminator(DiscriminatorConfig(num_layers=2, base_channels=8, norm="none"))
    z = torch.randn(2, 2, 16, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = decoder[-1].weight

    recon = decoder(z)
    nll = (x - recon).abs().sum() / 2
    g = -disc(recon).mean()
    weight = adaptive_weight(nll, g, last, disc_weight=0.5, max_weight=1e9)

    # Independent computation: two separate backward passes into .grad.
    recon = decoder(z)
    ((x - recon).abs().sum() / 2).backward()
    nll_grad = last.grad.clone()
    last.grad = None
    (-disc(decoder(z)).mean()).backward()
    expected = 0.5 * nll_grad.norm() / (last.grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad

    # Clamped at max_weight (times disc_weight)
    recon = decoder(z)
    tiny_g = -1e-9 * disc(recon).mean()
    clamped = adaptive_weight((x - recon).abs().sum(), tiny_g, last, disc_weight=0.5, max_weight=10.0)
    assert clamped.item() == pytest.approx(5.0)


def test_adaptive_weight_does_not_touch_grad_or_hooks():
    decoder = _tiny_decoder()
    last = decoder[-1].weight
    fired = []
    last.register_post_accumulate_grad_hook(lambda p: fired.append(1))  # what ZeRO 1/2 hooks on
    recon = decoder(torch.randn(1, 2, 8, 8))
    adaptive_weight(recon.square().sum(), recon.sum(), last, disc_weight=1.0)
    assert last.grad is None and fired == []


def test_gan_switches_on_exactly_at_disc_start():
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=3, disc_weight=0.5)
    loss_fn = AutoencoderLoss(cfg, None)
    decoder = _tiny_decoder()
    disc = PatchDiscriminator(DiscriminatorConfig(num_layers=2, base_channels=8, norm="none"))
    z, x = torch.randn(2, 2, 16, 16), torch.rand(2, 3, 16, 16)
    kl = torch.ones(2)
    assert [gan_active(s, 3) for s in range(5)] == [False, False, False, True, True]

    recon = decoder(z)
    loss, logs = loss_fn.generator_loss(x, recon, logvar=torch.tensor(0.0), step=2, kl=kl)
    assert logs["d_weight"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    base = loss.item()

    with pytest.raises(ValueError, match="logits_fake"):
        loss_fn.generator_loss(x, recon, logvar=torch.tensor(0.0), step=3, kl=kl)
    logits = disc(recon)
    loss, logs = loss_fn.generator_loss(x, recon, logvar=torch.tensor(0.0), step=3, kl=kl,
                                        logits_fake=logits, last_layer=decoder[-1].weight)
    assert logs["d_weight"].item() > 0 and logs["disc_factor"].item() == 1.0
    expected = base + logs["d_weight"].item() * (-logits.mean().item())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_learned_logvar_receives_gradient_and_moves():
    logvar = LearnedLogVariance(0.0, learn=True)
    opt = torch.optim.Adam(logvar.parameters(), lr=0.1)
    rec = torch.full((1, 1, 4, 4), 0.1)  # small errors: the NLL optimum is logvar = log(0.1)
    for _ in range(5):
        opt.zero_grad()
        gaussian_nll(rec, logvar(), "sum").backward()
        opt.step()
    assert logvar.logvar.item() < -0.4
    frozen = LearnedLogVariance(1.5, learn=False)
    assert list(frozen.parameters()) == [] and frozen().item() == 1.5
    assert "logvar" in frozen.state_dict()


def test_patch_discriminator_shapes_and_config_errors():
    d = PatchDiscriminator(DiscriminatorConfig(num_layers=3, base_channels=64))
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # pix2pix's 70x70 PatchGAN map
    d2 = PatchDiscriminator(DiscriminatorConfig(num_layers=2, base_channels=8))
    assert d2(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(DiscriminatorConfig(norm="layer"))
    with pytest.raises(ValueError, match="disc_loss"):
        AutoencoderLoss(AutoencoderLossConfig(disc_loss="wgan"), None)
    with pytest.raises(ValueError, match="LPIPS"):
        AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=1.0), None)


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(PerceptualConfig(net="vgg", backbone_weights="random"))


def test_lpips_random_trunk_logs_warning_and_is_frozen(random_lpips, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_scale.losses.perceptual"):
        build_lpips(PerceptualConfig(net="alex", backbone_weights="random"))
    assert "RANDOMLY INITIALISED" in caplog.text
    assert all(not p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.net.training  # dropout in the heads stays off
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(random_lpips(x, x), torch.zeros(2, 1, 1, 1))
    y = x.clone().requires_grad_(True)
    d = random_lpips(x, (y + 0.3).clamp(-1, 1))
    d.sum().backward()
    assert (d > 0).all() and y.grad.abs().sum() > 0


def test_lpips_random_trunk_is_seeded_and_leaves_the_global_rng_alone(random_lpips):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_lpips(PerceptualConfig(net="vgg", backbone_weights="random"))
    assert torch.equal(torch.rand(3), expected)  # the global stream did not move
    for a, b in zip(random_lpips.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # same network in every process / after a restart


def test_lpips_heads_come_from_the_package(random_lpips):
    import os

    import lpips
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu")
    assert torch.equal(random_lpips.net.lin0.model[1].weight, shipped["lin0.model.1.weight"])


def test_lpips_trunk_loads_from_a_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    net = build_lpips(PerceptualConfig(net="alex", backbone_weights=str(path)))
    assert torch.equal(getattr(net.net.net.slice1, "0").weight, features[0].weight)
    assert torch.equal(getattr(net.net.net.slice5, "10").weight, features[10].weight)

    torch.save({"features.0.weight": features[0].weight}, path)
    with pytest.raises(KeyError, match="features.0.bias"):
        build_lpips(PerceptualConfig(net="alex", backbone_weights=str(path)))
    with pytest.raises(ValueError, match="perceptual.net"):
        build_lpips(PerceptualConfig(net="resnet", backbone_weights="random"))
