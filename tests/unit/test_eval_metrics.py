"""Known answers for FID / IS / precision-recall / KID / CLIP score, and agreement with scipy,
torchmetrics and torch-fidelity fed the same features."""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm_scale.evaluation.clip_score import clip_score
from ldm_scale.evaluation.fid import StreamingMoments, fid_from_features, frechet_distance, gaussian_stats
from ldm_scale.evaluation.inception_score import inception_score
from ldm_scale.evaluation.kid import kernel_inception_distance
from ldm_scale.evaluation.precision_recall import knn_radii, precision_recall


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing * scale + shift


def _scipy_fid(f1, f2):
    """Independent reference: np.cov + scipy.linalg.sqrtm, as in the original TTUR / pytorch-fid code."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- FID
def test_fid_of_a_set_with_itself_is_zero():
    f = _features(500, 32, 0)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_closed_form_commuting_covariances():
    rng = np.random.default_rng(2)
    d = 24
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.0, 4, size=d), rng.uniform(0.05, 4, size=d)
    a[:3] = 0.0  # singular covariance: the robust square root must still be exact
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    # sqrt is not Lipschitz at 0: eigenvalues that round to ~1e-16 cost ~1e-8 absolute.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_scales_with_c_squared_and_is_rotation_invariant():
    f1, f2 = _features(400, 20, 3), _features(400, 20, 4, shift=0.3)
    base = fid_from_features(f1, f2)
    assert fid_from_features(2.5 * f1, 2.5 * f2) == pytest.approx(2.5 ** 2 * base, rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(20, 20)))
    assert fid_from_features(f1 @ q, f2 @ q) == pytest.approx(base, rel=1e-9)


def test_fid_matches_scipy_torchmetrics_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    f1, f2 = _features(3000, 64, 6), _features(2500, 64, 7, shift=0.2, scale=1.3)
    ours = fid_from_features(f1, f2)
    assert ours == pytest.approx(_scipy_fid(f1, f2), rel=1e-6)

    class FeaturesAsImages(torch.nn.Module):
        num_features = 64

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=FeaturesAsImages())
    metric.update(torch.from_numpy(f1), real=True)
    metric.update(torch.from_numpy(f2), real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)

    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(f1)),
                                  fid_features_to_statistics(torch.from_numpy(f2)), verbose=False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)


def test_streaming_moments_merge_equals_one_pass():
    f = _features(1000, 12, 8, shift=1e3)  # large mean: the pairwise update avoids cancellation
    direct = gaussian_stats(f)
    parts = [StreamingMoments(12).update(f[i:i + 137]) for i in range(0, 1000, 137)]
    merged = StreamingMoments(12)
    for p in parts:
        merged.merge(p)
    restored = StreamingMoments.from_state_dict(merged.state_dict()).stats()
    np.testing.assert_allclose(restored.mu, direct.mu, rtol=1e-12)
    np.testing.assert_allclose(restored.sigma, direct.sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(direct.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_warns_when_n_below_feature_dim():
    f = _features(10, 32, 9)
    with pytest.warns(UserWarning, match="rank < 32"):
        fid_from_features(f, f + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid_from_features(_features(64, 32, 9), _features(64, 32, 10))


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- Inception Score
def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(torch.zeros(1000, 1008))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_spread_logits_is_number_of_classes():
    classes, n = 10, 1000  # each split of 100 holds every class 10 times
    logits = torch.full((n, classes), -1e4, dtype=torch.float64)
    logits[torch.arange(n), torch.arange(n) % classes] = 0.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(11).normal(scale=3.0, size=(2000, 1008)))
    mean, std = inception_score(logits, splits=10)
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-6)


def test_inception_score_shuffle_is_torch_fidelitys_default():
    """Samples sorted by class make consecutive splits see one class each (IS ~1 per split); the
    shuffle option reproduces torch-fidelity's default (shuffle=True, rng_seed=2020) exactly."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    n, classes = 2000, 10
    logits = torch.full((n, classes), -8.0, dtype=torch.float64)
    logits[torch.arange(n), torch.arange(n) * classes // n] = 8.0  # class blocks, in order
    ordered, _ = inception_score(logits, splits=10)
    shuffled, shuffled_std = inception_score(logits, splits=10, shuffle=True)
    ref = isc_features_to_metric(logits, splits=10)  # torch-fidelity's defaults
    assert shuffled == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert shuffled_std == pytest.approx(ref["inception_score_std"], rel=1e-9)
    assert ordered == pytest.approx(1.0, abs=0.01) and shuffled > 9.0


# ---------------------------------------------------------------- precision / recall
def test_precision_recall_identical_disjoint_collapsed():
    real = _features(600, 16, 12)
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}
    far = _features(600, 16, 13, shift=1e3)
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    collapsed = np.repeat(real[:1], 600, axis=0)  # mode collapse onto one real sample
    pr = precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] <= 1.0 / 600


def test_precision_recall_blocked_equals_unblocked_and_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _features(700, 24, 14), _features(500, 24, 15, shift=0.4, scale=1.2)
    full = precision_recall(real, fake, batch_size=10_000)
    blocked = precision_recall(real, fake, batch_size=64)
    assert full == blocked
    assert 0.0 < full["precision"] < 1.0 and 0.0 < full["recall"] < 1.0
    p, r = calculate_precision_recall_full(torch.from_numpy(fake).float(), torch.from_numpy(real).float(),
                                           neighborhood=3)
    # Ties at the ball boundary may flip with the distance formula; allow one point of difference.
    assert abs(full["precision"] - p) <= 1 / 500 and abs(full["recall"] - r) <= 1 / 700


def test_knn_radii_against_brute_force():
    x = _features(300, 8, 16)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]
    got = knn_radii(x, 3, batch_size=50, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- KID, CLIP score
def test_kid_matches_torch_fidelity_on_full_sets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = _features(300, 32, 17), _features(300, 32, 18, shift=0.3)
    # One subset of the whole set is a permutation of it; MMD^2 is permutation invariant.
    mean, _ = kernel_inception_distance(real, fake, num_subsets=1, subset_size=300)
    ref = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=1,
                                 kid_subset_size=300, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                 kid_kernel="poly", verbose=False, rng_seed=0)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6)
    # Unbiased estimator: two samples of one distribution give a value centred on 0.
    rng = np.random.default_rng(19)
    same, spread = kernel_inception_distance(rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32)),
                                             num_subsets=20, subset_size=300)
    assert abs(same) < spread and spread < 0.1 * mean


def test_kid_refuses_subsets_larger_than_a_set():
    """Shrinking the subsets to the whole sets made every subset the same set (std ~1e-16): say so."""
    real, fake = _features(300, 32, 17), _features(120, 32, 18)
    with pytest.raises(ValueError, match=r"KID subsets of 200 samples need at least that many in each set, have "
                                         r"300 reference and 120 generated: set metrics.kid_subset_size<=120"):
        kernel_inception_distance(real, fake, num_subsets=5, subset_size=200)
    mean, std = kernel_inception_distance(real, fake, num_subsets=5, subset_size=100)
    assert std > 1e-6  # distinct subsets, a real spread


def test_clip_score_known_answers():
    emb = torch.randn(8, 16)
    assert clip_score(emb, 3 * emb) == pytest.approx(100.0)
    assert clip_score(emb, -emb) == pytest.approx(0.0)
