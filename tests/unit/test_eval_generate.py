"""Generation for evaluation: per-sample seeds, resume after an interruption or a torn chunk gives
the same images, and the exported-checkpoint sampler (EMA weights, CFG) on the tiny LDM."""
import dataclasses

import numpy as np
import pytest
import torch

from ldm_scale.diffusion import SamplerConfig

from ldm_scale.evaluation.config import FIDEvalConfig
from ldm_scale.evaluation.generate import (
    chunk_ranges,
    chunk_url,
    generate_samples,
    initial_noise,
    load_samples,
    write_adm_npz,
)
from ldm_scale.evaluation.model_sampler import load_model_sampler
from ldm_scale.models.registry import build_ldm, get_spec


def write_export(path, flavour="tiny_cin", seed=0):
    """An exported checkpoint in the documented format, EMA weights different from the raw ones."""
    torch.manual_seed(seed)
    model = build_ldm(flavour)
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in model.unet.state_dict().items()}
    torch.save({"format": "ldm_scale/ldm-v1", "model_config": dataclasses.asdict(get_spec(flavour)),
                "state_dict": model.state_dict(), "ema_state_dict": ema, "scale_factor": 0.8, "step": 11,
                "config": {"diffusion": {"schedule": "scaled_linear", "num_timesteps": 1000,
                                         "linear_start": 0.0015, "linear_end": 0.0195}}}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("ckpt") / "tiny_cin.pt")


@pytest.fixture(scope="module")
def sampler(ckpt):
    return load_model_sampler(FIDEvalConfig(ckpt=ckpt, sampler=SamplerConfig(steps=2, eta=0.5, guidance_scale=2.0)), torch.device("cpu"))


def test_initial_noise_depends_only_on_seed_and_index():
    a = initial_noise((4, 8, 8), [3, 4, 5], seed=7)
    b = initial_noise((4, 8, 8), [5], seed=7)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(initial_noise((4, 8, 8), [5], seed=8)[0], b[0])
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_exported_checkpoint_sampler_uses_ema_and_guidance(sampler, ckpt):
    assert sampler.checkpoint_info["weights"] == "ema" and sampler.checkpoint_info["step"] == 11
    assert sampler.condition_kind == "class" and sampler.latent_shape == (4, 8, 8) and sampler.image_size == 32
    x_T = initial_noise(sampler.latent_shape, range(2), seed=0)
    labels = torch.tensor([1, 2])
    out = sampler.sample_batch(x_T, labels, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    raw = load_model_sampler(FIDEvalConfig(ckpt=ckpt, sampler=SamplerConfig(steps=2, eta=0.5, guidance_scale=2.0), use_ema=False),
                             torch.device("cpu"))
    assert raw.checkpoint_info["weights"] == "raw"
    assert not torch.allclose(out, raw.sample_batch(x_T, labels, torch.Generator().manual_seed(0)))


def test_the_sampler_generates_at_a_bucket_size_and_refuses_one_the_model_cannot_take(ckpt):
    cfg = FIDEvalConfig(ckpt=ckpt, sampler=SamplerConfig(steps=2, guidance_scale=2.0), H=16, W=48)
    wide = load_model_sampler(cfg, torch.device("cpu"))
    assert wide.latent_shape == (4, 4, 12) and wide.checkpoint_info["size"] == [16, 48]
    out = wide.sample_batch(initial_noise(wide.latent_shape, range(2), seed=0), torch.tensor([1, 2]),
                            torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 48) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="H=20, W=48: both must be positive multiples of 16"):
        load_model_sampler(dataclasses.replace(cfg, H=20), torch.device("cpu"))


def test_interrupted_and_torn_runs_resume_to_the_same_images(sampler, tmp_path):
    kw = dict(n_samples=10, chunk_size=4, seed=3, latent_shape=sampler.latent_shape, conditions=list(range(10)))
    reference_url = str(tmp_path / "reference")
    stats = generate_samples(sampler.sample_batch, samples_url=reference_url, **kw)
    assert (stats.chunks_made, stats.chunks_skipped, stats.images_made) == (3, 0, 10)
    expected = load_samples(reference_url, 10, 4)
    assert expected["images"].shape == (10, 32, 32, 3) and expected["images"].dtype == np.uint8
    np.testing.assert_array_equal(expected["labels"], np.arange(10))

    class Crash(RuntimeError):
        pass

    def crash_after_first(chunk, n):
        raise Crash

    run_url = str(tmp_path / "run")
    with pytest.raises(Crash):
        generate_samples(sampler.sample_batch, samples_url=run_url, on_chunk=crash_after_first, **kw)
    with open(chunk_url(run_url, 8, 10), "wb") as f:  # a torn write from a killed process
        f.write(b"PK\x03\x04 truncated")
    resumed = generate_samples(sampler.sample_batch, samples_url=run_url, **kw)
    assert (resumed.chunks_made, resumed.chunks_skipped) == (2, 1)
    np.testing.assert_array_equal(load_samples(run_url, 10, 4)["images"], expected["images"])

    write_adm_npz(run_url, str(tmp_path / "samples.npz"), 10, 4)
    with np.load(tmp_path / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], expected["images"])
        np.testing.assert_array_equal(f["label_arr"], np.arange(10))


def test_checkpoint_on_object_storage_loads_once_into_the_same_sampler(ckpt, sampler, s3_server):
    from ldm_scale import storage

    url = s3_server.url("exports/tiny_cin.pt")
    storage.put_file(ckpt, url)
    remote = load_model_sampler(FIDEvalConfig(ckpt=url, sampler=SamplerConfig(steps=2, eta=0.5, guidance_scale=2.0)), torch.device("cpu"))
    assert remote.checkpoint_info == sampler.checkpoint_info
    x_T = initial_noise(sampler.latent_shape, [0], seed=0)
    torch.testing.assert_close(remote.sample_batch(x_T, torch.tensor([4]), torch.Generator().manual_seed(1)),
                               sampler.sample_batch(x_T, torch.tensor([4]), torch.Generator().manual_seed(1)))
