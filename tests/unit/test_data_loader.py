"""The shard loader: batches, exact resume (bitwise), equal batches per rank, mixtures, bad data."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ldm_scale import storage
from ldm_scale.data import DataConfig, FilterConfig, build_loader
from ldm_scale.data.config import BucketConfig
from ldm_scale.data.shard_writer import tar_bytes, write_aspects, write_shard, write_sizes
from ldm_scale.data.synthetic import make_sample, write_synthetic_dataset
from ldm_scale.dist import DistInfo
from tests.fixtures.loader_resume import stop_and_resume
from tests.fixtures.shapes import shapes_cfg

ONE = DistInfo()


_cfg = shapes_cfg  # the `shapes` fixture (tests/fixtures/shapes.py) and its loader config


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_batches_have_the_contract_shape(shapes):
    # 4 shards per worker in blocks of 3: the second block holds one shard, never a repeat
    loader = build_loader(_cfg(shapes, shards_per_block=3), ONE, batch_size=4, seed=0)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 96 // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert len(b["caption"]) == 4 and all(isinstance(c, str) and c for c in b["caption"])
    keys = [k for x in batches for k in x["key"]]
    assert len(set(keys)) == 96  # every sample exactly once in an epoch
    m = loader.metrics()
    assert m["samples_yielded"] == 96 and m["epoch"] == 1
    # the next epoch has a different order (shards and samples shuffled by (seed, epoch))
    assert [k for x in loader for k in x["key"]] != keys


@pytest.mark.parametrize("workers,stop,mode", [(2, 7, "epoch"), (0, 11, "epoch"), (2, 30, "epoch"),
                                              (2, 9, "resampled")])
def test_exact_resume_is_bitwise(shapes, workers, stop, mode):
    cfg = _cfg(shapes, num_workers=workers, mode=mode)
    reference, resumed, _, _ = stop_and_resume(cfg, stop, seed=5)  # two epochs
    assert _same(resumed, reference)


def test_ranks_yield_equal_batches_on_disjoint_shards(shapes, tmp_path):
    # uneven shards: 5 shards of 12 and one of 3 over 2 ranks x 1 worker
    write_synthetic_dataset(str(tmp_path), num_samples=63, samples_per_shard=12, seed=1, min_size=32, max_size=40)
    cfg = _cfg(str(tmp_path), urls=[str(tmp_path) + "/{00000..00005}.tar"], num_workers=1)
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, DistInfo(rank=rank, world_size=2), batch_size=4, seed=0)
        per_rank.append([k for b in loader for k in b["key"]])
    assert len(per_rank[0]) == len(per_rank[1]) == (63 // 8) * 4
    # a rank whose shards ran short refilled from its own shards, never from the other rank's
    shard_of = lambda key: key[:5]  # noqa: E731
    assert not {shard_of(k) for k in per_rank[0]} & {shard_of(k) for k in per_rank[1]}


def test_too_few_shards_for_ranks_times_workers(shapes):
    with pytest.raises(ValueError, match="8 shards cannot feed 4 ranks x 3 workers"):
        build_loader(_cfg(shapes, num_workers=3), DistInfo(rank=0, world_size=4), batch_size=2, seed=0)


def test_no_matching_shards_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        build_loader(DataConfig(urls=[str(tmp_path) + "/nothing-here/*.tar"]), ONE, batch_size=2, seed=0)
    with pytest.raises(FileNotFoundError, match="nothing-here/000.tar"):
        build_loader(DataConfig(urls=[str(tmp_path) + "/nothing-here/{000..003}.tar"]), ONE, batch_size=2, seed=0)


def _write_prefixed(root: str, prefix: str, shards: int, per_shard: int) -> None:
    for shard in range(shards):
        write_shard(root, shard, [{"__key__": f"{prefix}{shard}_{i}", "jpg": _jpeg(shard * per_shard + i),
                                   "txt": "a red circle on a blue background"} for i in range(per_shard)])
    write_sizes(root, {f"{s:05d}.tar": per_shard for s in range(shards)})


def test_resampled_mixture_follows_weights(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_prefixed(a, "a", 4, 6)
    _write_prefixed(b, "b", 4, 6)
    cfg = DataConfig(urls=[a + "/{00000..00003}.tar", b + "/{00000..00003}.tar"], mode="resampled",
                     weights=[0.8, 0.2], samples_per_epoch=240, resolution=32, num_workers=0,
                     shuffle_buffer=0, shards_per_block=1)
    loader = build_loader(cfg, ONE, batch_size=6, seed=0)
    batches = list(loader)
    assert len(batches) == 40
    from_a = sum(k.startswith("a") for x in batches for k in x["key"]) / 240
    assert 0.65 < from_a < 0.92
    again = build_loader(cfg, ONE, batch_size=6, seed=0)
    assert _same(list(again), batches)


def test_class_labels(shapes):
    from ldm_scale.data.synthetic import CLASS_NAMES

    loader = build_loader(_cfg(shapes, conditioning="class"), ONE, batch_size=8, seed=0)
    batch = next(iter(loader))
    assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
    assert int(batch["label"].max()) < len(CLASS_NAMES) and "caption" not in batch


def _jpeg(i: int) -> bytes:
    return make_sample(0, i, min_size=32, max_size=40)[2]


@pytest.mark.parametrize("bucketed", [False, True], ids=["square", "buckets"])
def test_bad_data_is_skipped_and_counted(tmp_path, bucketed):
    good = [{"__key__": f"g{i:03d}", "jpg": _jpeg(i), "txt": "a red circle on a blue background",
             "json": {"original_width": 64, "original_height": 64, "aesthetic": 6.0}} for i in range(6)]
    bad = [
        {"__key__": "nojpg", "txt": "caption only", "json": {}},
        {"__key__": "garbage", "jpg": b"\xff\xd8 not a jpeg", "txt": "x y z", "json": {}},
        {"__key__": "nocap", "jpg": _jpeg(7), "json": {}},
        {"__key__": "emptycap", "jpg": _jpeg(8), "txt": "  <b> </b> ", "json": {}},
        {"__key__": "small", "jpg": _jpeg(9), "txt": "tiny", "json": {"original_width": 8, "original_height": 8}},
        {"__key__": "ugly", "jpg": _jpeg(10), "txt": "ugly", "json": {"aesthetic": 2.0}},
        {"__key__": "badjson", "jpg": _jpeg(11), "txt": "x", "json": b"{not json"},
    ]
    root = str(tmp_path)
    write_shard(root, 0, good[:3] + bad)
    # shard 1: good samples then a member cut off mid-data
    whole = tar_bytes(good[3:])
    cut = len(tar_bytes(good[3:5])) + 512 + 100  # inside the data of the first member of sample 5
    storage.write_bytes(root + "/00001.tar", whole[:cut])
    storage.write_bytes(root + "/00002.tar", b"this is not a tar archive at all" * 40)
    write_sizes(root, {"00000.tar": 10, "00001.tar": 3, "00002.tar": 2, "00003.tar": 1})  # 00003.tar is lost
    cfg = DataConfig(urls=[root + "/{00000..00003}.tar"], resolution=32, num_workers=0, shuffle_buffer=0,
                     shards_per_block=4, filters=FilterConfig(min_width=16, min_height=16, min_aesthetic=4.5))
    if bucketed:  # the same damage with aspect buckets (an unreadable header is a decode error there)
        write_aspects(root, {f"0000{i}.tar": {0: n} for i, n in enumerate((10, 3, 2, 1))})
        cfg.buckets = BucketConfig(enabled=True, step=8, max_aspect=2.0)
    loader = build_loader(cfg, ONE, batch_size=1, seed=0)
    keys = [b["key"][0] for b in loader]
    assert sorted(set(keys)) == ["g000", "g001", "g002", "g003", "g004"]
    m = loader.metrics()
    assert m["skip/missing_image"] >= 1 and m["skip/decode_error"] >= 1 and m["skip/missing_caption"] >= 2
    assert m["filter/min_width"] >= 1 and m["filter/min_aesthetic"] >= 1 and m["skip/bad_metadata"] >= 1
    assert m["skip/truncated_member"] >= 1 and m["skip/corrupt_tar"] >= 1 and m["skip/missing_shard"] >= 1


def test_captions_are_cleaned(tmp_path):
    root = str(tmp_path)
    sample = {"__key__": "k0", "jpg": _jpeg(0), "txt": '  "A red&amp;blue <i>circle</i>\n\n on  grey" '}
    write_shard(root, 0, [sample])
    cfg = DataConfig(urls=[root + "/00000.tar"], resolution=32, num_workers=0, samples_per_epoch=1)
    (batch,) = list(build_loader(cfg, ONE, batch_size=1, seed=0))
    assert batch["caption"] == ["A red&blue circle on grey"]


def test_latent_shards(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    samples, moments = [], {}
    for i in range(8):
        arr = rng.normal(size=(2, 4, 4, 4)).astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, arr)
        samples.append({"__key__": f"z{i}", "latent.npy": buf.getvalue(), "txt": f"caption {i}"})
        moments[f"z{i}"] = arr.astype(np.float32)
    write_shard(root, 0, samples[:4])
    write_shard(root, 1, samples[4:])
    write_sizes(root, {"00000.tar": 4, "00001.tar": 4})
    cfg = DataConfig(urls=[root + "/{00000..00001}.tar"], input="latent", num_workers=2, shuffle_buffer=2)
    batches = list(build_loader(cfg, ONE, batch_size=2, seed=0))
    assert len(batches) == 4
    for b in batches:
        assert b["latent_mean"].shape == (2, 4, 4, 4) and "image" not in b
        for j, key in enumerate(b["key"]):
            assert torch.equal(b["latent_mean"][j], torch.from_numpy(moments[key][0]))
            assert torch.equal(b["latent_logvar"][j], torch.from_numpy(moments[key][1]))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.urls is empty"):
        DataConfig().validate()
    with pytest.raises(ValueError, match="need data.mode=resampled"):
        DataConfig(urls=["a", "b"], weights=[1.0, 2.0]).validate()
    with pytest.raises(ValueError, match="data.crop"):
        DataConfig(urls=["a"], crop="middle").validate()


def test_workers_leave_the_global_torch_rng_alone(shapes):
    # The trainer draws noise and timesteps from the global torch RNG and restores it on resume:
    # starting data workers must neither consume it nor depend on it.
    cfg = _cfg(shapes, num_workers=2)
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        stream = build_loader(cfg, ONE, batch_size=4, seed=3).infinite()
        batches.append([next(stream) for _ in range(5)])
        del stream
        assert torch.equal(torch.get_rng_state(), before)
    assert _same(*batches)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_reading_metrics_at_an_epoch_boundary_does_not_end_the_stream(shapes, mode):
    """The loop reads loader.metrics() (which rolls a finished epoch) between batches; an epoch
    whose last batch is out must then end cleanly and the next one start (it used to raise
    "data workers stopped after 0 of N batches in epoch 1" when a log step fell on the boundary)."""
    loader = build_loader(_cfg(shapes, num_workers=0, mode=mode), ONE, batch_size=8, seed=0)
    per_epoch = len(loader)
    batches = loader.infinite()
    for i in range(2 * per_epoch + 1):
        next(batches)
        loader.metrics()
    assert loader.epoch == 2 and loader.batches_done == 1


def test_forkserver_workers_yield_the_batches_fork_workers_do(shapes):
    """The start method used once CUDA is initialised (data.config.worker_start_method) reads the
    same data: the dataset plan and its storage settings travel to the workers by pickling."""
    from ldm_scale.data.config import worker_start_method

    assert worker_start_method("spawn") == "spawn"
    assert worker_start_method(None) in (None, "forkserver")
    batches = {}
    for method in ("fork", "forkserver"):
        loader = build_loader(_cfg(shapes, multiprocessing_context=method), ONE, batch_size=4, seed=3)
        it = iter(loader)
        batches[method] = [next(it) for _ in range(3)]
    assert _same(batches["fork"], batches["forkserver"])
