"""The DINOv2 extractor (FD-DINOv2): the network and weight conversion against Hugging Face's
independent port of DINOv2, the position-embedding rule of Meta's hub model against a numpy
bicubic written from its definition, and the weights-file rules (local path, hub cache, pinned or
recorded digest, offline error). Meta's own code is checked by benchmarks/check_dinov2_reference.py
(RESULTS.md: equal to ~1e-6 for all four architectures)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ldm_scale.evaluation import dinov2 as dino
from ldm_scale.evaluation.config import ExtractorConfig, FIDEvalConfig, compose_fid_config
from ldm_scale.evaluation.features import check_extractor_weights, extract_features, get_extractor
from ldm_scale.evaluation.weights import WeightsHashError
from tests.fixtures.dinov2_weights import meta_layout_state


def hf_state(timm_state: dict, depth: int) -> dict:
    """timm/Meta names -> Hugging Face Dinov2Model names (q/k/v split from the fused qkv)."""
    out = {"embeddings.cls_token": timm_state["cls_token"], "embeddings.position_embeddings": timm_state["pos_embed"],
           "embeddings.mask_token": torch.zeros(1, timm_state["cls_token"].shape[-1]),
           "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
           "layernorm.weight": timm_state["norm.weight"], "layernorm.bias": timm_state["norm.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_state[b + f"attn.qkv.{kind}"].chunk(3)
            out.update({h + f"attention.q_proj.{kind}": q, h + f"attention.k_proj.{kind}": k,
                        h + f"attention.v_proj.{kind}": v,
                        h + f"attention.o_proj.{kind}": timm_state[b + f"attn.proj.{kind}"]})
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[h + f"{n}.{kind}"] = timm_state[b + f"{n}.{kind}"]
        out[h + "layer_scale1.lambda1"] = timm_state[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = timm_state[b + "ls2.gamma"]
    return out


def test_network_and_conversion_equal_hugging_faces_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    converted = dino.to_timm_state(meta_layout_state())
    ours = dino.build_network("vits14").eval()
    ours.load_state_dict(converted, strict=True)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=14,
                       layer_norm_eps=1e-6, mlp_ratio=4)
    theirs = Dinov2Model(cfg).eval()
    theirs.load_state_dict(hf_state(converted, 12), strict=True)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(x)
        b = theirs(pixel_values=x).pooler_output  # final LayerNorm, CLS token
    assert a.shape == (3, 384)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert a.std() > 0.1  # not a degenerate network


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def _bicubic_by_definition(grid: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Separable cubic convolution (Keys, a = -0.75) with the source coordinate
    (i + 0.5) / scale - 0.5 and clamped borders: bicubic interpolation by a given scale factor."""
    m = grid.shape[0]
    w = np.zeros((out, m))
    for i in range(out):
        src = (i + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for j in range(base - 1, base + 3):
            w[i, min(max(j, 0), m - 1)] += _cubic(src - j)
    return np.einsum("im,mnd,jn->ijd", w, grid, w)


def test_position_embedding_is_resampled_by_the_hub_models_rule():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    got = dino.resample_pos_embed(pos, 16)
    want = _bicubic_by_definition(pos[0, 1:].reshape(37, 37, 8).double().numpy(), 16, (16 + 0.1) / 37)
    assert got.shape == (1, 257, 8)
    assert torch.equal(got[:, :1], pos[:, :1])
    np.testing.assert_allclose(got[0, 1:].reshape(16, 16, 8).numpy(), want, rtol=1e-4, atol=1e-5)
    # the offset matters: by output size alone (timm's / HF's rule) the grid differs
    by_size = _bicubic_by_definition(pos[0, 1:].reshape(37, 37, 8).double().numpy(), 16, 16 / 37)
    assert np.abs(by_size - want).max() > 1e-3


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(meta_layout_state(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_weights_load_from_a_path_and_the_digest_is_recorded(weights_file):
    path, digest = weights_file
    ext = get_extractor("dinov2:vits14", weights=str(path))
    info = ext.describe()
    assert info["name"] == "dinov2:vits14" and info["comparable_to_published"] is True
    assert info["weights_sha256"] == digest and info["frechet_label"] == "FD-DINOv2"
    assert info["feature_dims"] == {"pool": 384} and info["input_size"] == 224
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    feats = extract_features(ext, images, batch_size=2)["pool"]
    # the extractor is the converted network on dgm-eval's normalised 224-px input
    net = dino.build_network("vits14").eval()
    net.load_state_dict(dino.to_timm_state(torch.load(path, weights_only=True)))
    from ldm_scale.evaluation.preprocess import resize_for_extractor

    x = resize_for_extractor(images, 224, "pil_bicubic") / 255.0
    x = (x - torch.tensor(dino.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(dino.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(feats, net(x), rtol=1e-4, atol=1e-5)


def test_a_pinned_digest_is_enforced_up_front_and_the_hub_cache_is_searched(weights_file, tmp_path, monkeypatch):
    path, digest = weights_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / path.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    assert check_extractor_weights(ExtractorConfig(name="dinov2:vits14")) == str(cached)
    assert check_extractor_weights(ExtractorConfig(name="dinov2:vits14", sha256=digest[:12])) == str(cached)
    with pytest.raises(WeightsHashError) as err:
        check_extractor_weights(ExtractorConfig(name="dinov2:vits14", sha256="0" * 64))
    msg = str(err.value)
    assert "the torch hub cache" in msg and digest in msg and "extractor.sha256 expects" in msg
    assert dino.weights_file("vits14").url in msg
    assert get_extractor("dinov2:vits14").weights_sha256 == digest  # loaded from the cache


def test_missing_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = ExtractorConfig(name="dinov2:vitl14", allow_download=False)
    with pytest.raises(FileNotFoundError) as err:
        check_extractor_weights(cfg)
    msg = str(err.value)
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in msg
    assert "dinov2:vitl14@random" in msg and "extractor.weights=" in msg
    assert check_extractor_weights(ExtractorConfig(name="dinov2:vitl14")) is None  # downloads (and hashes) when loaded


def test_random_weights_only_when_asked_and_labelled():
    ext = get_extractor("dinov2:vits14@random-seed3")
    assert ext.name == "dinov2:vits14@random-seed3 (NOT comparable to published FID)"
    assert not ext.comparable_to_published and ext.weights_sha256 is None
    again = get_extractor("dinov2:vits14@random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ext.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="only 'random' or 'random-seed<S>'"):
        get_extractor("dinov2:vits14@imagenet")
    with pytest.raises(ValueError, match="unknown DINOv2 architecture 'vitx14'"):
        get_extractor("dinov2:vitx14")


def test_fd_dinov2_config_group_and_inception_only_metrics_refused_at_compose_time():
    cfg = compose_fid_config(["ckpt=x.pt", "extractor=dinov2", "metrics=fd_dinov2"])
    cfg.check()
    assert cfg.extractor.name == "dinov2:vitl14" and cfg.extractor.resize == "pil_bicubic_rgb"
    assert cfg.metrics.fid and not cfg.metrics.inception_score and cfg.metrics.density_coverage
    with pytest.raises(ValueError, match="metrics.inception_score=false"):
        FIDEvalConfig(ckpt="x.pt", extractor=ExtractorConfig(name="dinov2:vitl14")).check()


def test_a_reference_made_with_another_weights_file_of_the_same_name_is_not_mixed_in():
    from ldm_scale.evaluation.evaluate import reference_features
    from ldm_scale.evaluation.fid import gaussian_stats
    from ldm_scale.evaluation.reference import ReferenceStats

    ext = get_extractor("dinov2:vits14@random")
    ext.weights_sha256 = "a" * 64  # as if loaded from a file
    feats = np.random.default_rng(0).normal(size=(20, 384)).astype(np.float32)
    meta = {"extractor": dict(ext.describe(), weights_sha256="b" * 64)}
    with pytest.raises(ValueError, match=f"weights sha256 {'b' * 64}.*weights sha256 {'a' * 64}"):
        reference_features(ReferenceStats(pool=gaussian_stats(feats), features=feats, meta=meta), ext, 8, [])
    same = {"extractor": dict(ext.describe())}
    got = reference_features(ReferenceStats(pool=gaussian_stats(feats), features=feats, meta=same), ext, 8, [])
    assert got["features"] is feats  # same name, rule and file: the stored features are used
