"""Reference statistics: ADM-compatible file format, computation over shards, resume after a crash."""
import io

import numpy as np
import pytest

from ldm_scale import storage
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.evaluation.features import extract_features, get_extractor
from ldm_scale.evaluation.fid import GaussianStats, gaussian_stats
from ldm_scale.evaluation.preprocess import nchw_uint8
from ldm_scale.evaluation.reference import ReferenceStats, load_reference, reference_from_shards, save_reference

SHARDS = "{00000..00005}.tar"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(str(root), num_samples=48, samples_per_shard=8, labels="text")
    return root


@pytest.fixture(scope="module")
def extractor():
    return get_extractor("random-inception", input_size=75)  # the smallest Inception input: fast on CPU


@pytest.fixture(scope="module")
def reference(data_dir, extractor):
    url = reference_from_shards([str(data_dir / SHARDS)], extractor, n_samples=40, keep_images=40, resolution=32,
                                conditioning="text", batch_size=8, num_workers=1, checkpoint_every=1)
    return url, load_reference(url)


def test_reference_is_stored_next_to_the_data_keyed_by_what_changes_it(reference, data_dir):
    url, ref = reference
    assert url == str(data_dir / "reference_stats" / "random-inception-seed0-75px-pil_bicubic_32px_n40_text.npz")
    assert ref.pool.n == 40 and ref.images.shape == (40, 32, 32, 3) and ref.images.dtype == np.uint8
    assert len(ref.captions) == 40 and all(isinstance(c, str) and c for c in ref.captions)
    assert ref.extractor_name.startswith("random-inception-seed0-75px") and ref.resize == "pil_bicubic"
    assert not storage.exists(url + ".partial")  # resume state removed once the file is written
    # ADM's evaluator reads these keys.
    with np.load(url) as f:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(f.files)


def test_statistics_are_those_of_the_stored_images(reference, extractor):
    _, ref = reference
    feats = extract_features(extractor, nchw_uint8(ref.images), batch_size=20)
    np.testing.assert_allclose(ref.features, feats["pool"].numpy(), rtol=1e-5, atol=1e-6)
    direct = gaussian_stats(ref.features)
    np.testing.assert_allclose(ref.pool.mu, direct.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.pool.sigma, direct.sigma, rtol=1e-4, atol=1e-9)
    assert ref.pool.mu.dtype == np.float64 and ref.spatial.n == 40


def test_crashed_computation_resumes_to_the_same_file(reference, data_dir, extractor, tmp_path):
    class CrashingExtractor(type(extractor)):
        """The same extractor, failing on its 4th batch (as a killed job would)."""

        calls = 0

        def forward(self, images):
            CrashingExtractor.calls += 1
            if CrashingExtractor.calls == 4:
                raise RuntimeError("node lost")
            return super().forward(images)

    crashing = CrashingExtractor(extractor.net, extractor.name, False, extractor.resize, extractor.input_size)
    out = str(tmp_path / "ref.npz")
    kw = dict(n_samples=40, keep_images=40, resolution=32, conditioning="text", batch_size=8, num_workers=1,
              checkpoint_every=1, out_url=out)
    with pytest.raises(RuntimeError, match="node lost"):
        reference_from_shards([str(data_dir / SHARDS)], crashing, **kw)
    assert storage.exists(out + ".partial/rank0.pt") and not storage.exists(out)
    reference_from_shards([str(data_dir / SHARDS)], crashing, **kw)
    assert CrashingExtractor.calls == 5 + 1  # 3 before the crash + the crash + 2 after it (5 batches in all)
    _, expected = reference
    got = load_reference(out)
    np.testing.assert_array_equal(got.images, expected.images)
    np.testing.assert_allclose(got.pool.sigma, expected.pool.sigma, rtol=1e-12, atol=1e-15)
    assert got.captions == expected.captions


def test_adm_reference_batch_is_read_as_fid_inception_statistics(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), mu=rng.normal(size=4),
             sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = load_reference(str(path))
    assert ref.extractor_name == "inception-v3-fid" and ref.resize == "tf_bilinear"
    assert ref.pool.dim == 4 and ref.spatial.dim == 3 and ref.images.shape == (5, 8, 8, 3)
    assert ref.features is None and ref.captions is None


def test_round_trip_through_object_storage(s3_server):
    ref = ReferenceStats(pool=GaussianStats(np.arange(3.0), np.eye(3), 10), labels=np.array([1, 2]),
                         features=np.ones((2, 3), dtype=np.float32), meta={"extractor": {"name": "x", "resize": "y"}})
    url = s3_server.url("ref/stats.npz")
    save_reference(ref, url)
    back = load_reference(url)
    np.testing.assert_array_equal(back.pool.mu, ref.pool.mu)
    np.testing.assert_array_equal(back.labels, [1, 2])
    assert back.pool.n == 10 and back.meta["format"] == "ldm_scale/reference-v1" and back.spatial is None
    assert np.load(io.BytesIO(storage.read_bytes(url)))["mu"].dtype == np.float64
