"""evaluation/val_loss.py's rules (timesteps, noise, batch assignment), its config checks, and the
one-pass reader on latent shards it relies on. The world-size identity itself is tested under
torchrun in tests/integration/test_val_loss.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_scale import config as C
from ldm_scale.evaluation.val_loss import batch_slices, default_timesteps, fixed_noise

BASE = ["experiment=quickstart", "data.urls=['s3://bucket/set/{00000..00099}.tar']", "checkpoint.root=/tmp/ckpt",
        "model.allow_random_first_stage=true"]


def test_default_timesteps_are_bin_centres():
    assert default_timesteps(1000) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert default_timesteps(1000, 4) == [125, 375, 625, 875]
    assert default_timesteps(8, 8) == list(range(8))


def test_fixed_noise_depends_on_the_sample_index_only():
    a = fixed_noise(5, (4, 8, 8), 3, seed=1234)
    assert a.shape == (3, 4, 8, 8)
    assert torch.equal(a, fixed_noise(5, (4, 8, 8), 3, seed=1234))
    assert not torch.equal(a, fixed_noise(6, (4, 8, 8), 3, seed=1234))
    assert not torch.equal(a, fixed_noise(5, (4, 8, 8), 3, seed=1235))
    assert not torch.equal(a[0], a[1])  # each timestep slot its own draw


@pytest.mark.parametrize("n, batch, world", [(20, 6, 1), (20, 6, 2), (20, 6, 3), (24, 8, 4), (5, 8, 2), (1, 4, 3)])
def test_batches_are_fixed_slices_dealt_round_robin_and_every_rank_makes_the_same_passes(n, batch, world):
    shares = [batch_slices(n, batch, r, world) for r in range(world)]
    assert len({passes for _, passes in shares}) == 1
    passes = shares[0][1]
    assert all(len(mine) <= passes for mine, _ in shares)
    covered = sorted(i for mine, _ in shares for s in mine for i in range(s.start, s.stop))
    assert covered == list(range(n))  # every sample exactly once
    # The slices themselves do not depend on the world size: the same batches as one rank's.
    alone, _ = batch_slices(n, batch, 0, 1)
    assert sorted((s.start, s.stop) for mine, _ in shares for s in mine) == [(s.start, s.stop) for s in alone]


@pytest.mark.parametrize("overrides, message", [
    (["eval.val_every=10"], "eval.val_data is empty"),
    (["eval.val_every=10", "eval.val_data=['s3://bucket/set/{00098..00101}.tar']"],
     "eval.val_data shares 2 shard(s) with data.urls"),
    (["eval.val_every=10", "eval.val_data=['s3://bucket/val/0.tar']", "eval.val_timesteps=[0,1000]"],
     "eval.val_timesteps [1000] are outside [0, 1000)"),
    (["eval.val_every=10", "eval.val_data=['s3://bucket/val/0.tar']", "eval.val_timesteps=[5,5]"],
     "repeats a timestep"),
    (["eval.val_every=10", "eval.val_data=['s3://bucket/val/0.tar']", "eval.val_samples=0"],
     "eval.val_samples=0"),
])
def test_bad_validation_settings_fail_in_validate(overrides, message):
    cfg = C.to_object(C.compose([*BASE, *overrides]))
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        C.validate(cfg, 2, check_files=False)


def test_a_held_out_set_passes_and_autoencoders_refuse_it():
    ok = C.to_object(C.compose([*BASE, "eval.val_every=10", "eval.val_data=['s3://bucket/val/{0..1}.tar']"]))
    C.validate(ok, 2, check_files=False)
    ae = C.to_object(C.compose(["experiment=autoencoder_tiny", "data.urls=['s3://bucket/set/{0..9}.tar']",
                                "checkpoint.root=/tmp/ckpt", "eval.val_every=10", "eval.val_data=['s3://b/v.tar']"]))
    with pytest.raises(C.ConfigError, match="set eval.val_every=0 for task=autoencoder"):
        C.validate(ae, 2, check_files=False)


def test_one_pass_reads_latent_shards_in_planned_order(tmp_path):
    from ldm_scale.data.config import DataConfig
    from ldm_scale.data.one_pass import OnePassLoader
    import io

    from ldm_scale.data.shard_writer import write_shard, write_sizes

    rng = np.random.default_rng(0)
    means = rng.standard_normal((10, 4, 2, 2)).astype(np.float32)

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    for shard in range(2):
        samples = [{"__key__": f"{i:06d}", "latent.npy": npy(np.stack([means[i], np.full_like(means[i], -2.0)])),
                    "txt": f"caption {i}"} for i in range(shard * 5, shard * 5 + 5)]
        write_shard(str(tmp_path), shard, samples)
    write_sizes(str(tmp_path), {f"{s:05d}.tar": 5 for s in range(2)})
    cfg = DataConfig(urls=[f"{tmp_path}/{{00000..00001}}.tar"], input="latent", conditioning="text", num_workers=0)
    batches = list(OnePassLoader(cfg, batch_size=4, n_samples=7, seed=0))
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(7))
    captions = [c for b in batches for c in b["caption"]]
    got = torch.cat([b["latent_mean"] for b in batches])
    for row, caption in zip(got, captions):
        assert torch.equal(row, torch.from_numpy(means[int(caption.split()[1])]))
    assert "image" not in batches[0] and float(batches[0]["latent_logvar"].mean()) == -2.0
