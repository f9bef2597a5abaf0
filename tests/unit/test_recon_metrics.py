"""Reconstruction metrics against known values and an independent SSIM implementation (torchmetrics)."""
import math

import pytest
import torch

from ldm_scale.evaluation.fid import fid_from_features
from ldm_scale.evaluation.recon import ReconMetrics, psnr, ssim, to_unit_range
from ldm_scale.losses import PerceptualConfig, build_lpips


def _images(seed, n=3, size=24):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size, size, generator=g)
    # smooth structure plus noise, so SSIM is neither ~0 nor ~1
    smooth = torch.nn.functional.avg_pool2d(base, 5, stride=1, padding=2)
    return smooth, (smooth + 0.08 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def lpips_net():
    return build_lpips(PerceptualConfig(net="alex", backbone_weights="random"))


def test_identical_images_psnr_inf_ssim_one_lpips_zero(lpips_net):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = ReconMetrics(lpips_net=lpips_net)
    m.update(x, x.clone())
    out = m.compute()
    assert out["psnr"] == math.inf and out["psnr_identical_images"] == 2
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert out["lpips"] == pytest.approx(0.0, abs=1e-7)


def test_psnr_hand_computed():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)
    b[1] = 0.01
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert psnr(a * 255, b * 255, data_range=255.0)[0].item() == pytest.approx(20.0)
    # [-1, 1] -> [0, 1] with clipping of decoder overshoot
    assert torch.equal(to_unit_range(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])),
                       torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_ssim_matches_torchmetrics():
    """torchmetrics reflect-pads and averages the SSIM map over the whole image; Wang et al.'s
    reference (and scikit-image) average only where the window fits. Both agree on that region."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    for seed in range(3):
        a, b = _images(seed)
        ours = ssim(a, b)
        _, full_map = tm_ssim(b.double(), a.double(), data_range=1.0, gaussian_kernel=True, sigma=1.5,
                              kernel_size=11, k1=0.01, k2=0.03, return_full_image=True)
        valid = full_map[..., 5:-5, 5:-5].flatten(1).mean(dim=1)
        assert torch.allclose(ours, valid, atol=1e-10)
        assert 0.1 < ours.mean().item() < 0.95


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 15))


def _projection_features(images):
    # A fixed, cheap extractor: channel means and stds of 2x2 pooled blocks (24 features).
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)
    return torch.cat([pooled, pooled.square()], dim=1)


def test_accumulator_over_batches_equals_one_pass():
    a, b = _images(7, n=40, size=16)
    x, y = a * 2 - 1, b * 2 - 1
    latents = torch.randn(40, 4, 4, 4) * 3 + 0.5
    streamed = ReconMetrics(extract_features=_projection_features, feature_dim=24)
    for i in range(0, 40, 16):
        streamed.update(x[i:i + 16], y[i:i + 16], latents[i:i + 16])
    out = streamed.compute()
    assert out["num_images"] == 40
    assert out["psnr"] == pytest.approx(psnr(a, b).mean().item(), rel=1e-9)
    assert out["ssim"] == pytest.approx(ssim(a, b).mean().item(), rel=1e-9)
    assert out["latent_std"] == pytest.approx(latents.double().std().item(), rel=1e-9)
    assert out["scale_factor"] == pytest.approx(1 / latents.double().std().item(), rel=1e-9)
    expected_fid = fid_from_features(_projection_features(x), _projection_features(y), warn=False)
    assert out["rfid"] == pytest.approx(expected_fid, rel=1e-6, abs=1e-9)
    assert "lpips" not in out

    same = ReconMetrics(extract_features=_projection_features, feature_dim=24)
    same.update(x, x.clone())
    assert same.compute()["rfid"] == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(RuntimeError, match="after compute"):
        same.update(x, x)
    with pytest.raises(ValueError, match="no images"):
        ReconMetrics().compute()


def test_recon_eval_counts_every_image_whatever_the_batch_size(tmp_path):
    """21 images (shards of 8, 8, 5) at batch 8 over 2 workers: N = 21 (no partial batch dropped) and
    the metrics equal those of batch 1 in one process."""
    from ldm_scale.data.synthetic import write_synthetic_dataset
    from ldm_scale.evaluation.config import ExtractorConfig
    from ldm_scale.evaluation.recon import ReconEvalConfig, run_recon_eval
    from tests.fixtures.exports import write_autoencoder_export

    write_synthetic_dataset(str(tmp_path / "val"), num_samples=21, samples_per_shard=8, seed=5, labels="text")
    ckpt = str(write_autoencoder_export(tmp_path / "kl_tiny.pt"))

    def run(batch_size, num_workers):
        cfg = ReconEvalConfig(ckpt=ckpt, data=str(tmp_path / "val" / "{00000..00002}.tar"), batch_size=batch_size,
                              num_workers=num_workers, lpips=PerceptualConfig(net="alex", backbone_weights="random"),
                              extractor=ExtractorConfig(name="random-inception", input_size=75))
        return run_recon_eval(cfg)

    batched, single = run(8, 2), run(1, 0)
    for record in (batched, single):
        assert record["metrics"]["num_images"] == 21 and record["data"]["images_planned"] == 21
        assert record["data"]["dropped"] == {}
    a, b = batched["metrics"], single["metrics"]
    for key in ("psnr", "ssim", "lpips", "latent_std"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a["rfid"] == pytest.approx(b["rfid"], rel=1e-3)
