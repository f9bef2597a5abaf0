"""CMMD (evaluation/cmmd.py) against a direct numpy transcription of the paper's definition, and
density/coverage (evaluation/precision_recall.py) against the authors' own ``prdc`` package, on
fixed inputs; plus the up-front refusal of CMMD without CLIP embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_scale.evaluation.cmmd import cmmd
from ldm_scale.evaluation.config import ExtractorConfig, FIDEvalConfig, MetricsConfig
from ldm_scale.evaluation.precision_recall import density_coverage


def _paper_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Jayasumana et al. 2024, Sec. 4, written out: normalised embeddings, Gaussian RBF kernel,
    means over all pairs of the three kernel matrices."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * sigma ** 2))

    return scale * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_cmmd_matches_the_definition_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    y = (rng.normal(size=(250, 64)) + 0.3).astype(np.float32)
    expected = _paper_cmmd(x.astype(np.float64), y.astype(np.float64))
    assert expected > 0
    assert cmmd(x, y, block=64) == pytest.approx(expected, rel=1e-10)
    assert cmmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)
    assert cmmd(x, 5.0 * y) == pytest.approx(expected, rel=1e-8)  # normalised first (5y rounds in float32)
    assert abs(cmmd(x, x)) < 1e-9
    assert cmmd(x, y, sigma=1.0) == pytest.approx(_paper_cmmd(x.astype(np.float64), y.astype(np.float64), sigma=1.0),
                                                  rel=1e-10)
    with pytest.raises(ValueError, match="dimensions differ"):
        cmmd(x, y[:, :32])


@pytest.mark.parametrize("seed", [0, 1])
def test_density_and_coverage_equal_the_authors_prdc(seed):
    prdc = pytest.importorskip("prdc", reason="the authors' package, a dev dependency")
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(400, 32))
    fake = rng.normal(size=(350, 32)) * 1.2 + 0.2
    theirs = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    ours = density_coverage(real, fake, k=5, batch_size=128, dtype=torch.float64)
    assert ours["density"] == pytest.approx(theirs["density"], rel=1e-12)
    assert ours["coverage"] == pytest.approx(theirs["coverage"], rel=1e-12)
    # The default float32 distances agree to within a boundary case or two.
    fast = density_coverage(real.astype(np.float32), fake.astype(np.float32), k=5)
    assert fast["density"] == pytest.approx(theirs["density"], abs=2 / (5 * 350))
    assert fast["coverage"] == pytest.approx(theirs["coverage"], abs=2 / 400)


def test_cmmd_without_clip_embeddings_is_refused_before_any_work():
    cfg = FIDEvalConfig(ckpt="x.pt", n_samples=10, metrics=MetricsConfig(cmmd=True),
                        extractor=ExtractorConfig(name="inception"))
    with pytest.raises(ValueError, match="metrics.cmmd=true needs CLIP embeddings"):
        cfg.check()
    # (IS needs Inception logits: refused with a CLIP extractor too, as metrics=cmmd sets it)
    FIDEvalConfig(ckpt="x.pt", n_samples=10, metrics=MetricsConfig(cmmd=True, kid=False, inception_score=False),
                  extractor=ExtractorConfig(name="clip:ViT-L-14-336@openai")).check()


def test_compute_metrics_reports_cmmd_and_density_coverage_from_the_stored_reference_features():
    from ldm_scale.evaluation.evaluate import compute_metrics

    rng = np.random.default_rng(3)
    ref, gen = rng.normal(size=(60, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    cfg = FIDEvalConfig(ckpt="x.pt", n_samples=50, extractor=ExtractorConfig(name="clip:ViT-B-32"),
                        metrics=MetricsConfig(fid=False, inception_score=False, precision_recall=False, cmmd=True,
                                              density_coverage=True, dc_k=4))
    notes: list = []
    out = compute_metrics(cfg, {"pool": gen}, {"features": ref, "n": 60}, notes)
    assert out["cmmd"] == pytest.approx(_paper_cmmd(ref.astype(np.float64), gen.astype(np.float64)), rel=1e-10)
    assert out["density"] == pytest.approx(density_coverage(ref, gen, k=4)["density"])
    assert out["coverage"] == pytest.approx(density_coverage(ref, gen, k=4)["coverage"])
