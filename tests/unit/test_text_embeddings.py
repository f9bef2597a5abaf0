"""Precomputed text conditioning pieces (ldm_scale/data/text_embeddings.py): the member encoding, the
OpenCLIP pooled vector against open_clip's own encode_text, the weights fingerprint, the identity
checks and the host-side conditioner."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_scale.data import text_embeddings as te
from ldm_scale.models.conditioners import ConditionerConfig, FrozenOpenCLIPEmbedder, HostConditioner, OpenCLIPConfig
from tests.fixtures.tiny_clip import write_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def _cond(clip, **kw) -> ConditionerConfig:
    o = OpenCLIPConfig(arch=clip["arch"], pretrained=clip["ckpt"], model_config_path=clip["config"], **kw)
    return ConditionerConfig(kind="openclip", openclip=o)


@pytest.mark.parametrize("dtype, name", [("float16", "text.npy"), ("bfloat16", "text_bf16.npy"),
                                         ("float32", "text.npy")])
def test_members_round_trip_in_their_dtype(dtype, name):
    x = torch.randn(77, 64) * 5
    member, data = te.member_bytes(x, dtype, "text")
    assert member == name
    back = te.decode_member(member, data)
    assert back.dtype == getattr(torch, dtype)
    assert torch.equal(back, x.to(getattr(torch, dtype)))  # bitwise the cast, nothing else


def test_a_member_of_another_dtype_is_refused():
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.zeros((3,), dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        te.decode_member("text.npy", buf.getvalue())
    with pytest.raises(ValueError, match="int64"):
        te.decode_member("text_bf16.npy", buf.getvalue())


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_pooled_is_open_clips_encode_text_and_context_is_unchanged(clip, layer):
    enc = FrozenOpenCLIPEmbedder(_cond(clip, layer=layer).openclip)
    tokens = enc.caption_tokenizer(["a red circle on a blue background", "", "two words"])
    with torch.no_grad():
        context, pooled = enc.encode_tokens_and_pooled(tokens)
        expected_pooled = enc.model.encode_text(tokens, normalize=False)
        expected_context = enc.encode_tokens(tokens)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)
    assert torch.equal(context, expected_context)
    assert pooled.shape == (3, enc.pooled_dim) == (3, 32)


def test_weights_fingerprint_names_the_weights_not_the_file(clip, tmp_path):
    a = FrozenOpenCLIPEmbedder(_cond(clip).openclip)
    b = FrozenOpenCLIPEmbedder(_cond(clip).openclip)
    assert te.weights_fingerprint(a) == te.weights_fingerprint(b)
    other = write_tiny_clip(tmp_path, seed=1)
    c = FrozenOpenCLIPEmbedder(_cond(other).openclip)
    assert te.weights_fingerprint(c) != te.weights_fingerprint(a)
    with torch.no_grad():
        b.model.ln_final.weight[0] += 1e-3
    assert te.weights_fingerprint(b) != te.weights_fingerprint(a)


def _write_set(root, record):
    root.mkdir(parents=True, exist_ok=True)
    (root / "00000.tar").write_bytes(b"")
    card = {"kind": "latent"}
    if record is not None:
        card["text_encoder"] = record
    (root / "dataset.json").write_text(json.dumps(card))
    return f"{root}/00000.tar"


def test_identity_checks_name_what_differs_and_the_fix(clip, tmp_path):
    record = {**te.encoder_identity(_cond(clip)), "weights_sha256": "abc"}
    url = _write_set(tmp_path / "a", record)
    found, where = te.read_text_record([url])
    assert found == record and where == str(tmp_path / "a")
    assert te.identity_problem(found, _cond(clip), where) is None
    problem = te.identity_problem(found, _cond(clip, layer="last"), where)
    assert "layer: shards 'penultimate' vs 'last'" in problem and "precompute_latents.py" in problem

    bare = _write_set(tmp_path / "b", None)
    with pytest.raises(te.TextEmbeddingError, match="no precomputed text embeddings"):
        te.read_text_record([bare])
    other = _write_set(tmp_path / "c", {**record, "max_length": 64})
    with pytest.raises(te.TextEmbeddingError, match="different encoders .*max_length"):
        te.read_text_record([url, other])
    with pytest.raises(ValueError, match="jointly trained"):
        te.encoder_identity(ConditionerConfig(kind="text"))


def test_host_conditioner_stays_on_the_host_and_hands_out_device_outputs(clip):
    inner = FrozenOpenCLIPEmbedder(_cond(clip).openclip)
    host = HostConditioner(inner, torch.device("meta"))  # any other device: outputs are moved there
    container = torch.nn.ModuleDict({"cond_stage": host})
    container.to(torch.float64)
    assert list(container.parameters()) == [] and container.state_dict() == {}
    assert inner.model.token_embedding.weight.dtype == torch.float32  # untouched by the container's .to()
    out = host(["a red circle"])
    assert out["context"].device.type == "meta" and out["context"].shape == (1, 77, 64)
    assert host.output_dim == 64 and host.null_raw(2) == ["", ""]
