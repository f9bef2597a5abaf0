"""Reference statistics: ADM-compatible file format, computation over shards (every image once, N in
the file name and meta), resume after a crash."""
import io
import shutil

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


# ------------------------------------------------------------------ no image silently dropped
ODD = 21  # 8 + 8 + 5: not a multiple of any batch size used below


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    write_synthetic_dataset(str(root), num_samples=ODD, samples_per_shard=8, labels="text", seed=3)
    return root


def _odd_reference(odd_dir, extractor, tmp_path, name, **kw):
    kw = dict(dict(n_samples=50000, keep_images=ODD, resolution=32, conditioning="text", batch_size=8,
                   num_workers=2, checkpoint_every=1), **kw)
    url = reference_from_shards([str(odd_dir / "{00000..00002}.tar")], extractor,
                                out_url=None if name is None else str(tmp_path / name), **kw)
    return url, load_reference(url)


def test_every_image_counts_and_names_the_file(odd_dir, extractor, tmp_path):
    # Batch 8 over 2 workers: one reads shards of 5 + 8 images (a batch across the shard boundary,
    # then a partial one of 5), the other 8.
    url, ref = _odd_reference(odd_dir, extractor, tmp_path, None)
    assert url == str(odd_dir / "reference_stats" / "random-inception-seed0-75px-pil_bicubic_32px_n21_text.npz")
    assert ref.pool.n == ref.spatial.n == ODD and ref.meta["n"] == ODD and ref.meta["n_planned"] == ODD
    assert ref.meta["n_requested"] == 50000 and ref.meta["dropped"] == {} and len(ref.images) == ODD
    # The same statistics one image at a time, in one process.
    _, single = _odd_reference(odd_dir, extractor, tmp_path, "single.npz", batch_size=1, num_workers=0)
    assert single.pool.n == ODD
    np.testing.assert_array_equal(single.images, ref.images)  # the same images in the same (planned) order
    assert single.captions == ref.captions
    np.testing.assert_allclose(ref.features, single.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.pool.mu, single.pool.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.pool.sigma, single.pool.sigma, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.spatial.sigma, single.spatial.sigma, rtol=1e-4, atol=1e-6)
    # ...and equal to the features of the stored images computed directly.
    feats = extract_features(extractor, nchw_uint8(single.images), batch_size=1)
    np.testing.assert_allclose(single.features, feats["pool"].numpy(), rtol=1e-5, atol=1e-6)
    # Fewer than the set: exactly n_samples, whatever the batch size (a partial shard is taken).
    url13, ref13 = _odd_reference(odd_dir, extractor, tmp_path, None, n_samples=13, keep_images=5, batch_size=4)
    assert url13.endswith("_n13_text.npz") and ref13.pool.n == 13 and len(ref13.images) == 5


def test_a_dropped_image_is_counted_and_the_file_named_for_what_went_in(odd_dir, extractor, tmp_path):
    from collections import Counter

    from ldm_scale.data.shard_writer import tar_bytes
    from ldm_scale.data.tar_stream import iter_tar_samples

    data = tmp_path / "damaged"
    shutil.copytree(odd_dir, data, ignore=shutil.ignore_patterns("reference_stats"))
    samples = [{k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
               for raw in iter_tar_samples(str(data / "00002.tar"), 2, Counter())]
    samples[1]["jpg"] = b"\xff\xd8 not a jpeg"
    (data / "00002.tar").write_bytes(tar_bytes(samples))
    url = reference_from_shards([str(data / "{00000..00002}.tar")], extractor, n_samples=50000, keep_images=ODD,
                                resolution=32, conditioning="text", batch_size=8, num_workers=0)
    ref = load_reference(url)
    assert url.endswith("_n20_text.npz") and ref.pool.n == 20 and len(ref.images) == 20
    assert ref.meta["n_planned"] == ODD and ref.meta["dropped"] == {"skip/decode_error": 1}
