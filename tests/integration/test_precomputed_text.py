"""Precomputed text conditioning end to end (issue 16, part 1): `data_tools/precompute_latents.py`
on 2 ranks writes a frozen OpenCLIP encoder's outputs beside each latent (and the empty prompt's once
per set), a rerun skips the finished shards, the loader hands them out, training on them equals
training with the encoder in the step, and shards of another encoder are refused before training."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch

from ldm_scale.data import build_loader
from ldm_scale.data import text_embeddings as te
from ldm_scale.data.config import DataConfig
from ldm_scale.data.one_pass import OnePassLoader
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.models.conditioners import FrozenOpenCLIPEmbedder, OpenCLIPConfig
from tests.fixtures.tiny_clip import openclip_overrides, write_tiny_clip
from tests.fixtures.torchrun import REPO_ROOT, run_python, run_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.dist]

PRECOMPUTE = "data_tools/precompute_latents.py"


def _precompute_args(root, clip, dtype="float32"):
    return [PRECOMPUTE, f"data={root}/images/{{00000..00003}}.tar", f"out={root}/latents_{dtype}",
            "architecture=kl_tiny", "resolution=32", "batch_size=8", f"text_dtype={dtype}",
            *openclip_overrides("text_encoder", clip)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("precomputed_text")
    write_synthetic_dataset(str(root / "images"), num_samples=64, samples_per_shard=16, seed=0, min_size=32,
                            max_size=48)
    clip = write_tiny_clip(root / "clip")
    first = run_torchrun(_precompute_args(root, clip), timeout=600).check()
    return root, clip, first


def _encoder(clip, layer="penultimate"):
    return FrozenOpenCLIPEmbedder(OpenCLIPConfig(arch=clip["arch"], pretrained=clip["ckpt"],
                                                 model_config_path=clip["config"], layer=layer))


def test_shards_hold_the_encoders_outputs_of_the_cleaned_captions(made):
    root, clip, first = made
    out = root / "latents_float32"
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 64 and summary["text_encoder"] == clip["arch"]
    card = json.loads((out / "dataset.json").read_text())
    record = card["text_encoder"]
    enc = _encoder(clip)
    assert record["weights_sha256"] == te.weights_fingerprint(enc)
    assert record["context_shape"] == [77, 64] and record["pooled_dim"] == 32 and record["dtype"] == "float32"
    assert {k: record[k] for k in ("arch", "layer", "max_length")} == \
        {"arch": clip["arch"], "layer": "penultimate", "max_length": 77}
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert sum(n.endswith(".text.npy") for n in names) == sum(n.endswith(".latent.npy") for n in names) == 16
    assert sum(n.endswith(".pooled.npy") for n in names) == 16

    # Through the training loader: each sample's outputs are the encoder's for its cleaned caption.
    cfg = DataConfig(urls=[f"{out}/{{00000..00003}}.tar"], input="latent", conditioning="text",
                     text_embeddings=True, shuffle_buffer=0, num_workers=1, resolution=32)
    seen = 0
    for batch in build_loader(cfg, None, batch_size=8, seed=0):
        with torch.no_grad():
            context, pooled = enc.encode_tokens_and_pooled(enc.caption_tokenizer(batch["caption"]))
        assert batch["text_context"].dtype == torch.float32 and "tokens" not in batch
        torch.testing.assert_close(batch["text_context"], context, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["text_pooled"], pooled, rtol=1e-5, atol=1e-5)
        seen += len(batch["key"])
    assert seen == 64
    null_context, null_pooled = te.load_null(str(out))
    with torch.no_grad():
        context, pooled = enc.encode_tokens_and_pooled(enc.caption_tokenizer([""]))
    torch.testing.assert_close(null_context, context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(null_pooled, pooled[0], rtol=1e-5, atol=1e-5)

    # The one-pass reader (reference statistics, validation loss) reads them too.
    passed = list(OnePassLoader(cfg, None, batch_size=16, n_samples=40, seed=0))
    assert sum(len(b["key"]) for b in passed) == 40 and passed[0]["text_context"].shape == (16, 77, 64)


def test_a_rerun_skips_the_finished_shards(made):
    root, clip, _ = made
    again = run_torchrun(_precompute_args(root, clip), timeout=600).check()
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["encoded_here"] == 0 and summary["num_samples"] == 64


def test_bfloat16_embeddings_are_the_cast_of_the_outputs(made):
    root, clip, _ = made
    run_python(_precompute_args(root, clip, "bfloat16"), timeout=600).check()
    f32 = DataConfig(urls=[f"{root}/latents_float32/{{00000..00003}}.tar"], input="latent", text_embeddings=True,
                     shuffle_buffer=0, num_workers=0, resolution=32)
    b16 = DataConfig(urls=[f"{root}/latents_bfloat16/{{00000..00003}}.tar"], input="latent", text_embeddings=True,
                     shuffle_buffer=0, num_workers=0, resolution=32)
    a = next(iter(build_loader(f32, None, batch_size=16, seed=0)))
    b = next(iter(build_loader(b16, None, batch_size=16, seed=0)))
    assert a["key"] == b["key"] and b["text_context"].dtype == torch.bfloat16
    # The same encoder on the same captions, batched alike: bitwise the bf16 cast up to fp32 rounding.
    torch.testing.assert_close(b["text_context"].float(), a["text_context"].to(torch.bfloat16).float(),
                               rtol=0, atol=0.02)
    assert (root / "latents_bfloat16" / "null_text.npz").exists()


def test_training_on_precomputed_embeddings_equals_encoding_in_the_step(made):
    root, clip, _ = made
    overrides = openclip_overrides("model.ldm.cond_stage", clip)
    run = run_python([str(REPO_ROOT / "tests" / "integration" / "_precomputed_text_driver.py"),
                      f"{root}/latents_float32/{{00000..00003}}.tar", json.dumps(overrides)], timeout=600).check()
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    online, pre = json.loads(line[len("RESULT "):])
    assert online["tokenizer_in_workers"] and not pre["tokenizer_in_workers"]
    assert all("tokens" in k and "text_context" not in k for k in online["batch_keys"])
    assert all("text_context" in k and "tokens" not in k for k in pre["batch_keys"])
    assert online["cond_stage_params"] > 0 and pre["cond_stage_params"] == 0  # not on the device
    assert pre["cond_stage"] == "HostConditioner"
    # Same seeds, same batches, same dropout draws: the same losses (cond_drop_prob=0.5 exercises the
    # stored empty-prompt embedding), and the host-side encoder samples the same prompt grid.
    assert pre["losses"] == pytest.approx(online["losses"], rel=1e-5, abs=1e-6)
    assert pre["grid_shape"] == online["grid_shape"] == [1, 3, 32, 32]
    assert pre["grid"] == pytest.approx(online["grid"], abs=1e-4)


def _train(root, *extra):
    return run_python(["launch/train.py", "experiment=quickstart", "model.allow_random_first_stage=true",
                       "data.input=latent", "data.text_embeddings=true",
                       f"data.urls=['{root}/latents_float32/{{00000..00003}}.tar']", "data.num_workers=0",
                       "train.micro_batch_size=2", "train.max_steps=1", f"output_dir={root}/runs", "logger=none",
                       "eval.sample_at_end=false", "eval.prompt_adherence_samples=0", "checkpoint.export_final=false",
                       "deepspeed.zero.stage=0", *extra], timeout=600)


def test_shards_of_another_encoder_are_refused_before_training(made, tmp_path):
    root, clip, _ = made
    # By configuration (validate(), nothing built): another layer of the same model.
    wrong_layer = _train(root, "run_id=wrong-layer", *openclip_overrides("model.ldm.cond_stage", clip, layer="last"))
    assert wrong_layer.returncode == 2, wrong_layer.stderr
    assert "layer: shards 'penultimate' vs 'last'" in wrong_layer.stderr
    assert not (root / "runs" / "wrong-layer").exists()
    # By weights (the host encoder's fingerprint): a checkpoint of the same name and size, other values.
    other = write_tiny_clip(tmp_path / "other", seed=1)
    assert other["ckpt"] != clip["ckpt"]
    wrong_weights = _train(root, "run_id=wrong-weights", *openclip_overrides("model.ldm.cond_stage", other))
    assert wrong_weights.returncode == 2, wrong_weights.stderr
    assert "are not those that encoded" in wrong_weights.stderr and "pretrained" in wrong_weights.stderr
    # A jointly trained encoder has nothing to precompute.
    joint = _train(root, "run_id=joint")
    assert joint.returncode == 2 and "trained jointly" in joint.stderr
    # Image shards without embeddings.
    images = run_python(["launch/train.py", "experiment=quickstart", "model.allow_random_first_stage=true",
                         "data.text_embeddings=true", f"data.urls=['{root}/images/{{00000..00003}}.tar']",
                         f"output_dir={root}/runs", "run_id=no-embeddings", "logger=none",
                         *openclip_overrides("model.ldm.cond_stage", clip)], timeout=600)
    assert images.returncode == 2 and "no precomputed text embeddings" in images.stderr


def test_precomputed_text_to_and_from_object_storage(made, s3_server):
    root, clip, _ = made
    out = s3_server.url("latents_clip")
    run_python([PRECOMPUTE, f"data={root}/images/{{00000..00003}}.tar", f"out={out}", "architecture=kl_tiny",
                "resolution=32", "batch_size=8", "text_dtype=float32", *openclip_overrides("text_encoder", clip)],
               env=s3_server.env, timeout=600).check()
    record, where = te.read_text_record([f"{out}/{{00000..00003}}.tar"])
    local_record, _ = te.read_text_record([f"{root}/latents_float32/{{00000..00003}}.tar"])
    assert where == out and record["weights_sha256"] == local_record["weights_sha256"]
    null_s3, _ = te.load_null(out)
    null_local, _ = te.load_null(str(root / "latents_float32"))
    assert torch.equal(null_s3, null_local)
    common = dict(input="latent", text_embeddings=True, shuffle_buffer=0, num_workers=0, resolution=32)
    a = next(iter(build_loader(DataConfig(urls=[f"{out}/{{00000..00003}}.tar"], **common), None, batch_size=16,
                               seed=0)))
    b = next(iter(build_loader(DataConfig(urls=[f"{root}/latents_float32/{{00000..00003}}.tar"], **common), None,
                               batch_size=16, seed=0)))
    assert a["key"] == b["key"] and torch.equal(a["text_context"], b["text_context"])
