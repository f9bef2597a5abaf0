"""ldm_scale/data/one_pass.py: every sample exactly once with a partial last batch, whatever the
batch size, workers or ranks; planned indices independent of the split; resume mid-pass."""
from __future__ import annotations

import json

import pytest

from ldm_scale.data import DataConfig
from ldm_scale.data.one_pass import OnePassLoader, plan_pass
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo

N = 21  # shards of 8, 8, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_pass")
    write_synthetic_dataset(str(root), num_samples=N, samples_per_shard=8, seed=1, min_size=32, max_size=40)
    return str(root / "{00000..00002}.tar")


def _loader(shards, *, workers=0, batch=4, rank=0, world=1, n=None):
    cfg = DataConfig(urls=[shards], conditioning="text", resolution=16, num_workers=workers)
    return OnePassLoader(cfg, DistInfo(rank=rank, world_size=world), batch_size=batch, n_samples=n)


def test_plan_takes_whole_shards_then_a_part():
    plan = plan_pass([8, 8, 5], 13, seed=0)  # seed 0 orders the shards 2, 1, 0
    assert [(t.shard, t.take, t.offset) for t in plan] == [(2, 5, 0), (1, 8, 5)]
    assert sum(t.take for t in plan_pass([8, 8, 5], None, seed=0)) == N


@pytest.mark.parametrize("workers,batch,world", [(0, 1, 1), (0, 4, 1), (2, 8, 1), (1, 5, 2)])
def test_every_sample_once_with_partial_batches(shards, workers, batch, world):
    indices, keys, sizes = [], [], []
    for rank in range(world):
        loader = _loader(shards, workers=workers, batch=batch, rank=rank, world=world)
        before = len(indices)
        for b in loader:
            indices += b["index"].tolist()
            keys += b["key"]
            sizes.append(len(b["key"]))
            assert b["image"].shape[1:] == (3, 16, 16) and len(b["caption"]) == len(b["key"])
        assert loader.counts() == {"samples_read": len(indices) - before}  # nothing dropped
    assert sorted(indices) == list(range(N)) and len(set(keys)) == N
    assert max(sizes) <= batch and sum(sizes) == N


def test_resume_mid_pass_over_two_workers(shards):
    first = _loader(shards, workers=2, batch=3)
    seen = []
    for b in first:
        seen += b["index"].tolist()
        if len(seen) >= 9:
            break
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able, like the resume files
    second = _loader(shards, workers=2, batch=3)
    second.load_state_dict(state)
    rest = [i for b in second for i in b["index"].tolist()]
    assert sorted(seen + rest) == list(range(N))
    assert second.counts()["samples_read"] == N
    with pytest.raises(ValueError, match="does not fit"):
        _loader(shards, workers=1, batch=3).load_state_dict(state)
