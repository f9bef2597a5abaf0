"""Decode and shape one sample: image bytes -> [3, R, R] float in [-1, 1], or latent moments.

Random crop and flip draw from a generator seeded by the sample's identity (seed, epoch, shard,
index within shard, block), never from a process-global RNG, so a batch is a pure function of the
data position and resumes bitwise.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np
import torch


def sample_rng(seed: int, epoch: int, shard: int, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, shard, index, salt, 0xC0F])


def decode_image(data: bytes, resolution: int, decoder: str = "auto"):
    """PIL RGB image. With ``decoder="auto"`` a JPEG larger than needed is decoded at a reduced
    DCT scale (1/2, 1/4, 1/8) that still leaves the short side >= ``resolution``: libjpeg then skips
    most of the work, which is where decoding time goes for web-sized images."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if decoder == "auto" and img.format == "JPEG":
        w, h = img.size
        scale = resolution / min(w, h)
        # draft() keeps each dimension >= the requested one; ask for the size that the final
        # resize would produce so the short side stays >= resolution.
        img.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
    img = img.convert("RGB")
    img.load()
    return img


def resize_crop_flip(img, resolution: int, crop: str, flip: bool,
                     rng: Optional[np.random.Generator]) -> torch.Tensor:
    """Resize the short side to ``resolution`` (bicubic, antialiased), crop a square (centre, or at
    a random offset), optionally flip horizontally with p=0.5; return [3, R, R] float32 in [-1, 1]."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "random":
        left = int(rng.integers(0, nw - resolution + 1))
        top = int(rng.integers(0, nh - resolution + 1))
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.float().div_(127.5).sub_(1.0)


def decode_latent(data: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) float32 [C, h, w] from a ``.latent.npy`` member holding [2, C, h, w]."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise ValueError(f"latent member has shape {arr.shape}; expected [2, C, h, w] (mean, logvar)")
    t = torch.from_numpy(arr.astype(np.float32))
    return t[0], t[1]
