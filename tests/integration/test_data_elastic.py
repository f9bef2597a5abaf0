"""Loader state across a change of world size: 2 torchrun ranks (gloo) consume part of an epoch and
save their states (a collective); one process resumes the epoch from rank 0's state alone.
No shard finished before the restart is read again, none is skipped, every sample is seen.

Run by torchrun, this file is also the per-rank script (see ``__main__``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def _cfg(root: str, buckets: bool = False):
    from ldm_scale.data import DataConfig
    from ldm_scale.data.config import BucketConfig

    return DataConfig(urls=[root + "/{00000..00007}.tar"], resolution=32, num_workers=1, shuffle_buffer=6,
                      shards_per_block=1, buckets=BucketConfig(enabled=buckets, step=8, max_aspect=2.0))


@pytest.mark.dist
def test_resume_on_smaller_world_size(tmp_path, torchrun):
    from ldm_scale.data import build_loader
    from ldm_scale.data.synthetic import write_synthetic_dataset
    from ldm_scale.dist import DistInfo

    root = str(tmp_path / "shards")
    write_synthetic_dataset(root, num_samples=96, samples_per_shard=12, seed=0, min_size=32, max_size=40)
    torchrun([__file__, root, str(tmp_path)], nproc=2, timeout=300).check()
    consumed = []
    for rank in range(2):
        consumed += json.loads((tmp_path / f"keys_rank{rank}.json").read_text())
    state = json.loads((tmp_path / "loader_rank0.json").read_text())
    assert state["world_size"] == 2 and len(consumed) == 2 * 5 * 4

    loader = build_loader(_cfg(root), DistInfo(), batch_size=4, seed=3)
    loader.load_state_dict(state)
    assert loader.epoch == 0
    resumed = [k for batch in loader for k in batch["key"]]
    done = {f"{s:05d}" for s in state["done_shards_global"]}
    assert len(done) == 2  # each old rank finished one shard of 12 before its 20th sample
    resumed_shards = {k[:5] for k in resumed}
    assert not resumed_shards & done  # finished shards are not read again
    assert resumed_shards | done == {f"{s:05d}" for s in range(8)}  # nothing skipped
    assert set(consumed) | set(resumed) == {f"{s:05d}{i:04d}" for s in range(8) for i in range(12)}
    assert len(resumed) == loader.batches_per_epoch * 4 or loader.epoch == 1


@pytest.mark.dist
def test_bucketed_resume_on_smaller_world_size(tmp_path, torchrun):
    """With aspect buckets a shard counts as finished only once none of its samples waits in a
    bucket queue; those shards are not read again, the others are, none is skipped."""
    from ldm_scale.data import build_loader
    from ldm_scale.data.synthetic import write_synthetic_dataset
    from ldm_scale.dist import DistInfo

    root = str(tmp_path / "shards")
    write_synthetic_dataset(root, num_samples=96, samples_per_shard=12, seed=0, min_size=32, max_size=48,
                            max_aspect=2.5)
    torchrun([__file__, root, str(tmp_path), "buckets"], nproc=2, timeout=300).check()
    state = json.loads((tmp_path / "loader_rank0.json").read_text())
    assert state["world_size"] == 2 and state["buckets"]
    origins = [w["origin"] for r in range(2) for w in json.loads(
        (tmp_path / f"loader_rank{r}.json").read_text())["workers"].values()]
    done = {f"{s:05d}" for s in state["done_shards_global"]}
    assert 1 <= len(done) == sum(origins)  # shards_per_block=1: the blocks before each worker's origin

    loader = build_loader(_cfg(root, buckets=True), DistInfo(), batch_size=4, seed=3)
    loader.load_state_dict(state)
    assert loader.epoch == 0
    shapes, resumed, expected = [], [], loader.batches_per_epoch * 4
    for batch in loader:
        resumed += batch["key"]
        shapes.append(tuple(batch["image"].shape[2:]))
    resumed_shards = {k[:5] for k in resumed}
    assert not resumed_shards & done  # finished shards are not read again
    assert resumed_shards | done == {f"{s:05d}" for s in range(8)}  # nothing skipped
    assert len(set(shapes)) >= 2 and len(resumed) == expected


def _rank_main(root: str, out: str, buckets: bool = False) -> None:
    from ldm_scale.data import build_loader
    from ldm_scale.dist import init_distributed

    info = init_distributed()
    loader = build_loader(_cfg(root, buckets), info, batch_size=4, seed=3)
    stream = iter(loader)
    keys = [k for _ in range(5) for k in next(stream)["key"]]
    state = loader.state_dict()  # collective: gathers every rank's finished shards
    Path(out, f"keys_rank{info.rank}.json").write_text(json.dumps(keys))
    Path(out, f"loader_rank{info.rank}.json").write_text(json.dumps(state))


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], buckets=sys.argv[3:] == ["buckets"])
