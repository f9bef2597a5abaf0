"""Synthetic dataset: determinism, layout, and the attribute detector behind prompt adherence."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_scale import storage
from ldm_scale.data import synthetic as S


def test_dataset_layout_and_determinism(tmp_path):
    a = S.write_synthetic_dataset(str(tmp_path / "a"), num_samples=20, samples_per_shard=8, seed=3, labels="both")
    b = S.write_synthetic_dataset(str(tmp_path / "b"), num_samples=20, samples_per_shard=8, seed=3, labels="both")
    assert [u.rsplit("/", 1)[1] for u in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(open(x, "rb").read() == open(y, "rb").read() for x, y in zip(a, b))
    assert json.loads(storage.read_text(str(tmp_path / "a/sizes.json"))) == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 4}
    with tarfile.open(a[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000000.cls", "000000000.jpg", "000000000.json", "000000000.txt"]
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000000.txt").read().decode()
        label = int(tar.extractfile("000000000.cls").read())
    for field in ("url", "width", "height", "original_width", "original_height", "status", "sha256",
                  "aesthetic", "punsafe", "pwatermark", "similarity"):
        assert field in meta
    attrs = S.parse_caption(caption)
    assert S.CLASS_NAMES[label] == f"{attrs.colour} {attrs.shape}"
    import pyarrow.parquet as pq

    assert pq.read_table(str(tmp_path / "a/00000.parquet")).num_rows == 8


def _degrade(jpg: bytes, i: int) -> np.ndarray:
    """What a weak generator produces: centre crop to 32 px, blur and heavy noise."""
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((32, 32), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(im).astype(np.float32) + np.random.default_rng(i).normal(0, 20, (32, 32, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_detector_robust_to_blur_and_noise_and_chance_level():
    images, captions = [], []
    for i in range(60):
        _, caption, jpg, _ = S.make_sample(7, i)
        images.append(_degrade(jpg, i))
        captions.append(caption)
    assert S.prompt_adherence(images, captions) > 0.95
    shuffled = captions[1:] + captions[:1]
    assert abs(S.prompt_adherence(images, shuffled) - S.CHANCE_ADHERENCE) < 0.12
    # tensors in [-1, 1] (what samplers return) are accepted too
    import torch

    batch = torch.stack([torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in images[:8]])
    assert S.prompt_adherence(batch, captions[:8]) > 0.9


def test_parse_caption_rejects_foreign_text():
    assert S.parse_caption("A Red circle on a BLUE background.") == S.Attributes("red", "circle", "blue")
    with pytest.raises(ValueError, match="does not name"):
        S.parse_caption("a cat on a sofa")
