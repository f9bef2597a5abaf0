"""The shard loader with aspect-ratio buckets (data.buckets): one bucket per batch, the same bucket
on every rank at every step, SDXL's micro-conditioning, and exact resume including the queued
samples of every bucket."""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
import torch
from PIL import Image

from ldm_scale.data import DataConfig, build_loader
from ldm_scale.data.buckets import assign_bucket
from ldm_scale.data.config import BucketConfig
from ldm_scale.data.synthetic import make_sample, write_synthetic_dataset
from ldm_scale.data.tar_stream import iter_tar_samples
from ldm_scale.data.transforms import decode_image, resize_crop_to
from ldm_scale.dist import DistInfo
from tests.fixtures.loader_resume import stop_and_resume

ONE = DistInfo()
MICRO = ("original_size", "crop_top_left", "target_size")


@pytest.fixture(scope="module")
def wide_and_tall(tmp_path_factory):
    """16 shards of 12 images, 48-96 px wide, aspect ratios log-uniform in [1/2.5, 2.5]."""
    root = str(tmp_path_factory.mktemp("aspects"))
    write_synthetic_dataset(root, num_samples=192, samples_per_shard=12, seed=4, min_size=48, max_size=96,
                            max_aspect=2.5)
    return root


def _cfg(root: str, **kw) -> DataConfig:
    """64^2-px buckets in 8 px steps up to 2:1 (64x64, 72x56, 80x48 and transposes), 2 workers."""
    base = {"urls": [root + "/{00000..00015}.tar"], "resolution": 64, "num_workers": 2, "shuffle_buffer": 6,
            "crop": "random", "flip": True, "buckets": BucketConfig(enabled=True, step=8, max_aspect=2.0)}
    return DataConfig(**{**base, **kw})


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"])
        and all(torch.equal(x[m], y[m]) for m in MICRO) for x, y in zip(a, b))


def _shards(root):
    meta = {}
    for shard in range(16):
        for raw in iter_tar_samples(f"{root}/{shard:05d}.tar", shard, Counter()):
            meta[raw["__key__"]] = (json.loads(raw["json"]), raw["jpg"])
    return meta


def test_every_batch_holds_the_bucket_the_schedule_gives_its_step(wide_and_tall):
    loader = build_loader(_cfg(wide_and_tall), ONE, batch_size=4, seed=1)
    assert loader.buckets == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    schedule = loader.bucket_schedule()
    batches = list(loader)
    assert len(batches) == len(schedule) == 192 // 4
    meta = _shards(wide_and_tall)
    for b, bucket in zip(batches, schedule):
        w, h = loader.buckets[bucket]
        assert b["image"].shape == (4, 3, h, w)
        assert b["target_size"].tolist() == [[h, w]] * 4
        for key, original, (top, left) in zip(b["key"], b["original_size"].tolist(), b["crop_top_left"].tolist()):
            m = meta[key][0]
            assert original == [m["original_height"], m["original_width"]]
            # the image went to the bucket nearest its own aspect ratio, and the crop lies inside
            # the resized image (scale that covers the bucket)
            assert assign_bucket(m["width"], m["height"], loader.buckets) == bucket
            scale = max(w / m["width"], h / m["height"])
            assert 0 <= top <= max(h, round(m["height"] * scale)) - h
            assert 0 <= left <= max(w, round(m["width"] * scale)) - w
    # the schedule shares the batches out by the buckets' sample counts (largest remainder: within
    # one batch of the exact share), counted from the images themselves
    held = Counter(assign_bucket(m["width"], m["height"], loader.buckets) for m, _ in meta.values())
    per_bucket = Counter(schedule)
    assert all(abs(per_bucket[b] - held[b] * len(schedule) / 192) < 1 for b in range(5)), (per_bucket, held)
    assert len(per_bucket) >= 3


def test_a_bucketed_image_is_the_crop_of_its_decoded_jpeg(wide_and_tall):
    loader = build_loader(_cfg(wide_and_tall, crop="center", flip=False, num_workers=0), ONE, batch_size=4, seed=1)
    meta = _shards(wide_and_tall)
    batch = next(iter(loader))
    h, w = batch["target_size"][0].tolist()
    for key, image, (top, left) in zip(batch["key"], batch["image"], batch["crop_top_left"].tolist()):
        expected, offset = resize_crop_to(decode_image(meta[key][1], (w, h)), w, h, "center", False, None)
        assert offset == (top, left)
        assert torch.equal(image, expected.float() / 127.5 - 1.0)


def test_ranks_share_the_bucket_of_every_step(wide_and_tall):
    shapes, keys = [], []
    for rank in range(2):
        loader = build_loader(_cfg(wide_and_tall), DistInfo(rank=rank, world_size=2), batch_size=4, seed=2)
        batches = [b for _ in range(2) for b in loader]  # two epochs: the schedule changes per epoch
        shapes.append([tuple(b["image"].shape) for b in batches])
        keys.append({k for b in batches[:192 // 8] for k in b["key"]})
    assert shapes[0] == shapes[1] and len(shapes[0]) == 2 * (192 // 8)
    assert len(set(shapes[0])) >= 3
    assert not keys[0] & keys[1]  # in an epoch, each rank reads its own shards only


@pytest.mark.parametrize("workers,stop,mode,persistent", [(2, 7, "epoch", True), (0, 13, "epoch", True),
                                                          (2, 30, "epoch", True), (2, 9, "resampled", True),
                                                          (2, 30, "epoch", False)])
def test_bucketed_exact_resume_is_bitwise(wide_and_tall, workers, stop, mode, persistent):
    cfg = _cfg(wide_and_tall, num_workers=workers, mode=mode, persistent_workers=persistent)
    if mode == "resampled":
        cfg.samples_per_epoch = 96
    reference, resumed, state, first = stop_and_resume(cfg, stop, seed=5)  # two epochs
    if stop < first.batches_per_epoch:
        # the queues are not empty mid-epoch: the state must carry them
        assert any(w["queued"] for w in state["workers"].values())
    assert _same(resumed, reference)


def test_buckets_change_nothing_of_the_square_loader_when_off(wide_and_tall):
    square = _cfg(wide_and_tall, buckets=BucketConfig(enabled=False))
    batches = list(build_loader(square, ONE, batch_size=4, seed=0))
    assert all(b["image"].shape == (4, 3, 64, 64) and not any(m in b for m in MICRO) for b in batches)


def test_a_resume_with_other_buckets_is_refused(wide_and_tall):
    loader = build_loader(_cfg(wide_and_tall), ONE, batch_size=4, seed=0)
    next(iter(loader))
    state = loader.state_dict()
    other = build_loader(_cfg(wide_and_tall, buckets=BucketConfig(enabled=True, step=8, max_aspect=1.5)), ONE,
                         batch_size=4, seed=0)
    with pytest.raises(ValueError, match="data.buckets"):
        other.load_state_dict(state)
    square = build_loader(_cfg(wide_and_tall, buckets=BucketConfig(enabled=False)), ONE, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="data.buckets"):
        square.load_state_dict(state)


def test_missing_aspect_histogram_names_the_fix(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_samples=24, samples_per_shard=12, seed=0, min_size=48, max_size=64)
    os.remove(tmp_path / "aspects.json")
    with pytest.raises(FileNotFoundError, match="inspect_shards.py"):
        build_loader(_cfg(str(tmp_path), urls=[str(tmp_path) + "/{00000..00001}.tar"], num_workers=1), ONE,
                     batch_size=4, seed=0)


def test_bucket_config_errors_name_the_field(wide_and_tall):
    with pytest.raises(ValueError, match="data.buckets.max_aspect"):
        _cfg(wide_and_tall, buckets=BucketConfig(enabled=True, max_aspect=0.5)).validate()
    with pytest.raises(ValueError, match="data.buckets.step"):
        _cfg(wide_and_tall, buckets=BucketConfig(enabled=True, step=24)).validate()


@pytest.fixture(scope="module")
def bucketed_latents(wide_and_tall, tmp_path_factory):
    """wide_and_tall's first 8 shards encoded in their buckets by a random kl_tiny (f=4) through
    data_tools/precompute_latents.py."""
    import dataclasses
    import importlib.util

    from ldm_scale.models import AUTOENCODERS, build_autoencoder

    out = tmp_path_factory.mktemp("bucketed_latents")
    torch.manual_seed(0)
    ckpt = str(out / "ae.pt")
    torch.save({"format": "ldm_scale/autoencoder-v1", "model_config": dataclasses.asdict(AUTOENCODERS["kl_tiny"]),
                "state_dict": build_autoencoder("kl_tiny").state_dict(), "ema_state_dict": None, "scale_factor": 1.0,
                "step": 0, "config": {}}, ckpt)
    spec = importlib.util.spec_from_file_location("precompute_cli", os.path.join(
        os.path.dirname(__file__), "..", "..", "data_tools", "precompute_latents.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    latents = str(out / "lat")
    args = [f"data={wide_and_tall}/{{00000..00007}}.tar", f"out={latents}", f"ckpt={ckpt}", "resolution=64",
            "batch_size=5", "dtype=float32", "buckets.enabled=true", "buckets.step=8", "buckets.max_aspect=2"]
    assert cli.main(args) == 0
    return latents


def _latent_cfg(latents: str, **kw) -> DataConfig:
    return _cfg(latents, **{"urls": [latents + "/{00000..00007}.tar"], "input": "latent", **kw})


def test_bucketed_latents_have_their_bucket_shape_and_the_image_path_micro_conditioning(wide_and_tall,
                                                                                       bucketed_latents):
    card = json.loads(open(os.path.join(bucketed_latents, "dataset.json")).read())
    assert card["buckets"] == {"step": 8, "max_aspect": 2.0,
                               "sizes": [[48, 80], [56, 72], [64, 64], [72, 56], [80, 48]]}
    loader = build_loader(_latent_cfg(bucketed_latents), ONE, batch_size=4, seed=3)
    schedule = loader.bucket_schedule()
    micro = {}
    for batch, bucket in zip(loader, schedule):
        w, h = loader.buckets[bucket]
        assert batch["latent_mean"].shape == (4, 4, h // 4, w // 4)
        assert batch["target_size"].tolist() == [[h, w]] * 4
        for i, key in enumerate(batch["key"]):
            micro[key] = [batch[m][i].tolist() for m in MICRO]
    assert len(micro) >= 80 and len(set(schedule)) >= 3
    # the image loader's centre crop of the same image reports the same crop and sizes
    images = _cfg(wide_and_tall, urls=[wide_and_tall + "/{00000..00007}.tar"], crop="center", flip=False)
    for batch in build_loader(images, ONE, batch_size=4, seed=3):
        for i, key in enumerate(batch["key"]):
            if key in micro:
                assert micro[key] == [batch[m][i].tolist() for m in MICRO], key


def test_bucketed_latents_resume_exactly(bucketed_latents):
    cfg = _latent_cfg(bucketed_latents)
    reference = list(build_loader(cfg, ONE, batch_size=4, seed=5))
    first = build_loader(cfg, ONE, batch_size=4, seed=5)
    stream = iter(first)
    consumed = [next(stream) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    del stream
    resumed = build_loader(cfg, ONE, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    got = consumed + list(resumed)
    assert [b["key"] for b in got] == [b["key"] for b in reference]
    assert all(torch.equal(a["latent_mean"], b["latent_mean"]) for a, b in zip(got, reference))


def test_latent_buckets_must_match_the_ones_the_shards_were_encoded_with(bucketed_latents, tmp_path):
    from ldm_scale.data.latents import bucket_record_problem

    assert bucket_record_problem(_latent_cfg(bucketed_latents)) is None
    for kw in ({"buckets": BucketConfig(enabled=False)}, {"buckets": BucketConfig(enabled=True, step=16)},
               {"resolution": 96}):
        problem = bucket_record_problem(_latent_cfg(bucketed_latents, **kw))
        assert "data.buckets.enabled=true data.resolution=64 data.buckets.step=8 data.buckets.max_aspect=2.0" in problem
    # a square latent set cannot be bucketed: its latents are all one shape
    square = str(tmp_path / "square")
    write_synthetic_dataset(square, num_samples=8, samples_per_shard=8, seed=0, min_size=32, max_size=40)
    open(os.path.join(square, "dataset.json"), "w").write(json.dumps({"kind": "latent", "resolution": 64}))
    problem = bucket_record_problem(_latent_cfg(square, urls=[square + "/00000.tar"]))
    assert "precompute_latents.py buckets.enabled=true buckets.step=8" in problem


def _uniform_shards(root: str, sizes) -> None:
    """One shard per (width, height): 12 captioned JPEGs of that size, with aspects.json and sizes.json."""
    from ldm_scale.data.buckets import aspect_bin
    from ldm_scale.data.shard_writer import write_aspects, write_shard, write_sizes

    aspects, counts = {}, {}
    for shard, (w, h) in enumerate(sizes):
        samples = []
        for i in range(12):
            _, caption, jpg, meta = make_sample(shard, i, min_size=w, max_size=w)
            image = Image.open(io.BytesIO(jpg)).convert("RGB").resize((w, h))
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            samples.append({"__key__": f"{shard:05d}{i:04d}", "jpg": buf.getvalue(), "txt": caption,
                            "json": {**meta, "width": w, "height": h}})
        write_shard(root, shard, samples)
        aspects[f"{shard:05d}.tar"] = {aspect_bin(w, h): 12}
        counts[f"{shard:05d}.tar"] = 12
    write_aspects(root, aspects)
    write_sizes(root, counts)


def test_a_rank_short_of_a_bucket_borrows_from_the_nearest_one_and_still_resumes_exactly(tmp_path):
    """4 ranks, 1 shard each, every shard one shape: rank 0 holds only 64x64 images but the schedule
    (global) asks it for wide batches too. Its queues fill to the cap and the wide batches take the
    nearest bucket's samples cropped wide; every batch still has the scheduled shape."""
    root = str(tmp_path)
    _uniform_shards(root, [(64, 64), (96, 48), (48, 96), (96, 48)])
    cfg = _cfg(root, urls=[root + "/{00000..00003}.tar"], num_workers=0,
               buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0, queue_limit=3))
    rank0 = DistInfo(rank=0, world_size=4)
    loader = build_loader(cfg, rank0, batch_size=1, seed=0)
    schedule = loader.bucket_schedule()
    assert len(set(schedule)) == 3  # 64x64, 80x48, 48x80 batches for every rank
    batches = list(loader)
    assert [tuple(b["image"].shape[2:]) for b in batches] == [loader.buckets[i][::-1] for i in schedule]
    assert loader.metrics()["bucket_borrowed"] > 0
    for stop in (3, 7):
        reference = [b for loader in [build_loader(cfg, rank0, batch_size=1, seed=0)] for _ in range(2)
                     for b in loader]  # two epochs of one loader
        first = build_loader(cfg, rank0, batch_size=1, seed=0)
        stream = first.infinite()
        consumed = [next(stream) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        del stream
        assert state["workers"]["0"]["queued"]
        resumed = build_loader(cfg, rank0, batch_size=1, seed=0)
        resumed.load_state_dict(state)
        got = consumed + [b for _, b in zip(range(len(reference) - stop), resumed.infinite())]
        assert _same(got, reference)
