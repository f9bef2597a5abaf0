"""The shard format is webdataset's: shards webdataset writes train through our loader, and the
shards we write read back through webdataset with the same samples.

Why the loader is not webdataset's pipeline (data/loader.py, data/tar_stream.py): webdataset has no
exact mid-epoch resume (its #177, #234, #271), no s3:// handler (#184), and unequal batches per rank
hang the end of an epoch (#188, #250). So webdataset is a test dependency only: it checks that we
read and write the format everyone else's tools (img2dataset, webdataset's ShardWriter) use.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scale.data import DataConfig, build_loader
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo

wds = pytest.importorskip("webdataset")


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_shards_written_by_webdataset_train_through_our_loader(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    pattern = str(tmp_path / "wds-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=10, verbose=0) as sink:
        for i in range(40):
            key = f"{i:08d}"
            caption = f"photo number {i} of a test set"
            expected[key] = caption
            sink.write({"__key__": key, "jpg": _jpeg(rng, 40), "txt": caption,
                        "json": {"width": 47, "height": 40, "caption": caption}})
    urls = [str(tmp_path / "wds-{00000..00003}.tar")]
    cfg = DataConfig(urls=urls, resolution=32, num_workers=2, shuffle_buffer=8, samples_per_epoch=40)
    loader = build_loader(cfg, DistInfo(), batch_size=4, seed=0)
    seen = {}
    for batch in loader:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
        seen.update(zip(batch["key"], batch["caption"]))
    assert seen == expected  # every sample once, captions intact
    assert loader.metrics()["samples_yielded"] == 40 and not any(k.startswith("skip/") for k in loader.metrics())


def test_our_shards_read_back_through_webdataset(tmp_path):
    root = str(tmp_path / "ours")
    write_synthetic_dataset(root, num_samples=24, samples_per_shard=8, seed=3, min_size=32, max_size=40, labels="both")
    ours = build_loader(DataConfig(urls=[root + "/{00000..00002}.tar"], resolution=32, num_workers=0, shuffle_buffer=0,
                                   conditioning="text"), DistInfo(), batch_size=8, seed=0)
    our_captions = {k: c for batch in ours for k, c in zip(batch["key"], batch["caption"])}
    theirs = {}
    dataset = wds.WebDataset(root + "/{00000..00002}.tar", shardshuffle=False).decode("pil")
    for sample in dataset:
        image = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        assert image.mode == "RGB" and min(image.size) >= 32
        meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        assert isinstance(meta, dict)
        theirs[sample["__key__"]] = sample["txt"]
        assert int(sample["cls"]) >= 0
    assert set(theirs) == set(our_captions) and len(theirs) == 24
    # our loader cleans captions (whitespace); the stored text is the same caption
    assert all(" ".join(theirs[k].split()) == our_captions[k] for k in theirs)
