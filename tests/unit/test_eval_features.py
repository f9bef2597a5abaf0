"""Feature extractors: the real FID-Inception loading path (local file, torch hub cache, s3 URL,
hash check with a known digest and a tampered file, eval/fid.py's up-front check, offline error)
exercised with a randomly initialised network of the exact architecture, checked against
torch-fidelity's independent implementation; resize conventions; CLIP."""
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_scale import storage
from ldm_scale.evaluation import inception as inc
from ldm_scale.evaluation.features import extract_features, get_extractor
from ldm_scale.evaluation.preprocess import quantize_to_uint8, resize_for_extractor


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A randomly initialised FID-Inception saved like pt_inception-2015-12-05-*.pth (a state dict)."""
    path = tmp_path_factory.mktemp("weights") / inc.FID_WEIGHTS_FILENAME
    torch.save(inc.random_fid_inception(seed=123).state_dict(), path)
    return str(path), inc.sha256_of_file(str(path))


def _images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


SHA256_OF_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2, example B.1


def test_hash_check_accepts_the_right_file_and_refuses_a_tampered_one(tmp_path):
    good = tmp_path / "abc.bin"
    good.write_bytes(b"abc")
    assert inc.check_sha256(str(good), SHA256_OF_ABC) == SHA256_OF_ABC
    assert inc.check_sha256(str(good), SHA256_OF_ABC[:8].upper()) == SHA256_OF_ABC  # a file-name prefix will do
    tampered = tmp_path / "abd.bin"
    tampered.write_bytes(b"abd")
    actual = hashlib.sha256(b"abd").hexdigest()
    with pytest.raises(inc.WeightsHashError) as err:
        inc.check_sha256(str(tampered), SHA256_OF_ABC, source=f"extractor.weights={tampered}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"extractor.weights={tampered} has SHA-256 {actual}, ")
    assert f"extractor.sha256 expects {SHA256_OF_ABC}" in message and inc.FID_WEIGHTS_URL in message
    assert (err.value.expected, err.value.actual) == (SHA256_OF_ABC, actual) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="at least 8 hex digits"):
        inc.check_sha256(str(good), "ba78")


def test_pinned_weights_are_documented_where_users_look():
    # One fact, two places: the digest and URL the loader checks are the ones docs/evaluation.md
    # tells users to verify with sha256sum, and the pin extractor.sha256 (default: unset) falls back to.
    from ldm_scale.evaluation.config import ExtractorConfig

    docs = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    assert f"{inc.FID_WEIGHTS_SHA256}  {inc.FID_WEIGHTS_FILENAME}" in docs  # the sha256sum -c line
    assert inc.FID_WEIGHTS_URL in docs and ExtractorConfig().sha256 is None
    assert inc.FID_WEIGHTS.sha256 == inc.FID_WEIGHTS_SHA256 and inc.FID_WEIGHTS.url == inc.FID_WEIGHTS_URL
    assert re.fullmatch(r"[0-9a-f]{64}", inc.FID_WEIGHTS_SHA256)
    assert inc.FID_WEIGHTS_SHA256[:8] in inc.FID_WEIGHTS_FILENAME  # torch.hub's check_hash convention


def test_entry_point_checks_the_weights_before_reading_the_checkpoint(weights_file, tmp_path, monkeypatch):
    from ldm_scale.evaluation.config import ExtractorConfig
    from ldm_scale.evaluation.features import check_extractor_weights
    from tests.fixtures.torchrun import run_python

    path, sha = weights_file
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    assert check_extractor_weights(ExtractorConfig(name="inception", weights=path, sha256=sha)) == path
    assert check_extractor_weights(ExtractorConfig(name="random-inception", weights=path)) is None
    monkeypatch.setenv(inc.WEIGHTS_ENV_VAR, path)
    with pytest.raises(inc.WeightsHashError, match=f"\\${inc.WEIGHTS_ENV_VAR}={re.escape(path)} has SHA-256 {sha}"):
        check_extractor_weights(ExtractorConfig(name="auto"))  # the pinned digest: not this random network
    # eval/fid.py: one line, exit 2, before the (missing) checkpoint is even looked at.
    result = run_python(["eval/fid.py", f"ckpt={tmp_path / 'no_such_export.pt'}", f"ref={tmp_path / 'ref.npz'}",
                         "extractor.name=inception", f"extractor.weights={path}"], timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"eval/fid.py: error: extractor.weights={path} has SHA-256 {sha}, but "
                               f"extractor.sha256 expects {inc.FID_WEIGHTS_SHA256}")
    assert "no_such_export" not in lines[0]


def test_real_loader_matches_torch_fidelity_implementation(weights_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path, sha = weights_file
    ours = get_extractor("inception", weights=path, sha256=sha, resize="tf_bilinear")
    assert ours.name == "inception-v3-fid" and ours.comparable_to_published
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=path)
    images = _images(3, 64)  # torch-fidelity resizes with TF1 bilinear inside: tf_bilinear must match
    got = ours(images)
    pool, logits = theirs(images)
    torch.testing.assert_close(got["pool"], pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-4)
    assert got["spatial"].shape == (3, inc.SPATIAL_DIM)


def test_wrong_hash_is_refused(weights_file):
    path, _ = weights_file
    with pytest.raises(inc.WeightsHashError, match="SHA-256"):
        get_extractor("inception", weights=path)  # the pinned hash of the real file


def test_weights_found_in_torch_hub_cache(weights_file, tmp_path, monkeypatch):
    path, sha = weights_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    target = inc.hub_checkpoint_dir() / inc.FID_WEIGHTS_FILENAME
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    extractor = get_extractor("inception", sha256=sha, allow_download=False)
    direct = inc.random_fid_inception(seed=123)
    x = resize_for_extractor(_images(1, 299), 299)
    torch.testing.assert_close(extractor(_images(1, 299))["pool"], direct(x)["pool"])


def test_weights_fetched_from_object_storage(weights_file, s3_server, tmp_path, monkeypatch):
    path, sha = weights_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = s3_server.url("models/" + inc.FID_WEIGHTS_FILENAME)
    storage.put_file(path, url)
    extractor = get_extractor("inception", weights=url, sha256=sha)
    assert (inc.hub_checkpoint_dir() / inc.FID_WEIGHTS_FILENAME).is_file()
    assert extractor.name == "inception-v3-fid"


def test_offline_without_weights_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        get_extractor("inception", allow_download=False)
    message = str(err.value)
    assert str(inc.hub_checkpoint_dir() / inc.FID_WEIGHTS_FILENAME) in message
    assert inc.FID_WEIGHTS_URL in message and "random-inception" in message
    with pytest.raises(FileNotFoundError, match="not found at"):
        get_extractor("inception", weights=str(tmp_path / "missing.pth"))


def test_random_inception_is_seeded_and_labelled():
    a, b = get_extractor("random-inception", seed=0), get_extractor("random-inception-seed1")
    assert a.name == "random-inception-seed0 (NOT comparable to published FID)"
    assert b.name.startswith("random-inception-seed1") and not a.comparable_to_published
    images = _images(2, 32, seed=1)
    fa, fb = a(images)["pool"], b(images)["pool"]
    torch.testing.assert_close(fa, a(images)["pool"])
    assert not torch.allclose(fa, fb)
    # Informative features: different images give different features at a sane scale.
    assert torch.isfinite(fa).all() and (fa[0] - fa[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("inceptoin")


def test_float_images_are_quantised_like_saved_pngs():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    q = quantize_to_uint8(x)[0, 0].flatten().tolist()
    assert q == [0, 0, 128, 255, 255, 255]  # 127.5 rounds half to even -> 128


def test_resize_conventions():
    img = _images(2, 64, seed=3)
    assert torch.equal(resize_for_extractor(img, 64, "tf_bilinear"), img.float())  # no resampling at size
    torch_mode = resize_for_extractor(img, 299, "torch_bilinear")
    torch.testing.assert_close(torch_mode, F.interpolate(img.float(), size=(299, 299), mode="bilinear",
                                                         align_corners=False))
    from PIL import Image

    pil = resize_for_extractor(img, 299, "pil_bicubic")
    ref = np.asarray(Image.fromarray(img[1, 2].numpy().astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_allclose(pil[1, 2].numpy(), ref, rtol=1e-6)
    tf_mode = resize_for_extractor(img, 299, "tf_bilinear")
    # The three rules really differ (which is why the choice is recorded with every result).
    assert (pil - tf_mode).abs().mean() > 0.5 and (torch_mode - tf_mode).abs().mean() > 0.5
    with pytest.raises(ValueError, match="unknown resize"):
        resize_for_extractor(img, 299, "lanczos")


def test_clip_extractor_random_weights_and_text():
    from ldm_scale.evaluation.clip_score import clip_score

    clip = get_extractor("clip:ViT-S-32", seed=0)
    assert clip.name.startswith("clip:ViT-S-32@random-seed0") and "NOT comparable" in clip.name
    feats = extract_features(clip, _images(3, 48, seed=4).float() / 127.5 - 1.0, batch_size=2)
    text = clip.encode_text(["a red circle", "a blue square", "a green triangle"])
    assert feats["pool"].shape == text.shape == (3, clip.feature_dims["pool"])
    assert 0.0 <= clip_score(feats["embedding"], text) <= 100.0
