"""Aspect-ratio bucket pieces (ldm_scale/data/buckets.py), the general resize-crop they use, and the
wide/tall synthetic images they are tested on."""
from __future__ import annotations

import io
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scale.data.buckets import assign_bucket, bucket_schedule, make_buckets, original_size
from ldm_scale.data.synthetic import make_sample
from ldm_scale.data.transforms import resize_crop_flip, resize_crop_to


@pytest.mark.parametrize("resolution, step, max_aspect", [(1024, 64, 4.0), (256, 32, 2.0), (256, 16, 3.0),
                                                           (32, 8, 2.0)])
def test_buckets_have_about_equal_area_within_the_aspect_range(resolution, step, max_aspect):
    buckets = make_buckets(resolution, step, max_aspect)
    assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert max(w / h, h / w) <= max_aspect + 1e-9
        area = w * h
        # The largest height (multiple of step) under the area: within one step-row of it.
        assert resolution ** 2 - step * max(w, h) < area <= resolution ** 2
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_sdxl_style_megapixel_buckets():
    landscape = [b for b in make_buckets(1024, 64, 4.0) if b[0] >= b[1]]
    assert landscape[:6] == [(1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768)]
    assert landscape[-1] == (2048, 512) and len(landscape) == 17


def test_assignment_is_the_nearest_log_aspect_ratio():
    buckets = make_buckets(256, 32, 2.0)  # 192x320, 224x288, 256x256, 288x224, 320x192
    assert buckets[assign_bucket(640, 640, buckets)] == (256, 256)
    assert buckets[assign_bucket(1000, 600, buckets)] == (320, 192)   # 1.67 -> 1.67
    assert buckets[assign_bucket(3000, 500, buckets)] == (320, 192)   # wider than any: the widest
    assert buckets[assign_bucket(500, 3000, buckets)] == (192, 320)
    assert buckets[assign_bucket(260, 200, buckets)] == (288, 224)    # 1.30 -> 1.29
    # Exactly between two buckets in log ratio: the squarer wins.
    mid = math.sqrt((288 / 224) * 1.0)
    assert buckets[assign_bucket(mid * 1000, 1000, buckets)] == (256, 256)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, buckets)


def test_original_size_reads_img2dataset_fields():
    assert original_size({"original_width": 640, "original_height": "480", "width": 256, "height": 256}) == (640, 480)
    assert original_size({"width": 300, "height": 200}) == (300, 200)
    assert original_size({"original_width": None, "width": 30, "height": 20}) == (30, 20)
    assert original_size({}) is None and original_size({"width": "x", "height": 3}) is None


def test_schedule_shares_batches_by_counts_and_is_a_pure_function():
    counts = [10, 30, 60, 0]
    s = bucket_schedule(counts, 10, seed=3, epoch=1)
    assert Counter(s) == {0: 1, 1: 3, 2: 6}
    assert s == bucket_schedule(counts, 10, seed=3, epoch=1)
    assert s != bucket_schedule(counts, 10, seed=3, epoch=2) or s != bucket_schedule(counts, 10, seed=4, epoch=1)
    uneven = bucket_schedule([1, 1, 1], 7, seed=0, epoch=0)  # largest remainder, ties to the lower index
    assert Counter(uneven) == {0: 3, 1: 2, 2: 2}
    assert bucket_schedule([5], 0, 0, 0) == []
    with pytest.raises(ValueError, match="all zero"):
        bucket_schedule([0, 0], 3, 0, 0)


def _image(w, h):
    g = torch.Generator().manual_seed(w * 1000 + h)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_resize_crop_to_covers_the_bucket_and_reports_the_crop():
    img = _image(200, 100)
    out, (top, left) = resize_crop_to(img, 96, 64, "center", False, None)
    assert out.shape == (3, 64, 96) and out.is_contiguous()
    # scale max(96/200, 64/100) = 0.64 -> 128x64: a 96 wide centre crop starts at 16.
    assert (top, left) == (0, 16)
    expected = img.resize((128, 64), Image.BICUBIC).crop((16, 0, 112, 64))
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(np.array(expected)))
    rng = random.Random(0)
    flipped, (top, left) = resize_crop_to(_image(200, 100), 96, 64, "random", True, rng)
    assert 0 <= left <= 32 and top == 0


def test_the_square_path_is_the_general_one():
    img = _image(120, 90)
    for crop, flip in (("center", False), ("random", True)):
        a = resize_crop_flip(img, 64, crop, flip, random.Random(1))
        b, _ = resize_crop_to(img, 64, 64, crop, flip, random.Random(1))
        assert torch.equal(a, b)


def test_synthetic_wide_and_tall_images_and_the_default_unchanged():
    sizes = []
    for i in range(64):
        _, _, jpg, meta = make_sample(0, i, min_size=48, max_size=96, max_aspect=3.0)
        w, h = Image.open(io.BytesIO(jpg)).size
        assert (w, h) == (meta["width"], meta["height"]) == (meta["original_width"], meta["original_height"])
        sizes.append(w / h)
    assert min(sizes) < 0.5 and max(sizes) > 2.0 and all(1 / 3.01 <= r <= 3.01 for r in sizes)
    # max_aspect=None keeps the near-square default byte for byte (the recorded figures used it).
    _, _, jpg, meta = make_sample(0, 5)
    _, _, jpg_again, _ = make_sample(0, 5, max_aspect=None)
    assert jpg == jpg_again and 48 <= meta["height"] <= 96 and 48 <= meta["width"] <= 96
