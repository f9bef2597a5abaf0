"""Decode and shape one sample: image bytes -> [3, R, R] uint8, batched to float in [-1, 1]; or
latent moments.

Random crop and flip draw from a generator seeded by the sample's identity (seed, epoch, shard,
index within shard, block), never from a process-global RNG, so a batch is a pure function of the
data position and resumes bitwise. Images stay uint8 until a whole batch is converted at once
(a quarter of the memory traffic of per-sample float tensors).
"""
from __future__ import annotations

import io
import random
from typing import List, Optional, Tuple

import numpy as np
import torch


def sample_rng(seed: int, epoch: int, shard: int, index: int, salt: int = 0) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across processes and Python versions,
    # and ~100x cheaper to set up per sample than a numpy SeedSequence.
    return random.Random(f"ldm_scale/{seed}/{epoch}/{shard}/{index}/{salt}")


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


def resize_crop_flip(img, resolution: int, crop: str, flip: bool, rng: Optional[random.Random]) -> torch.Tensor:
    """Resize the short side to ``resolution`` (bicubic, antialiased), crop a square (centre, or at
    a random offset), optionally flip horizontally with p=0.5; return [3, R, R] uint8."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "random":
        left = rng.randint(0, nw - resolution)
        top = rng.randint(0, nh - resolution)
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


def stack_images(images: List[torch.Tensor]) -> torch.Tensor:
    """[B, 3, R, R] float32 in [-1, 1] from uint8 images (same values as :func:`to_unit_range`).
    Each image is cast straight into its slot of the output; inside a DataLoader worker the output
    lives in shared memory, so sending it to the main process copies nothing more."""
    out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    for slot, image in zip(out, images):
        slot.copy_(image)
    return out.div_(127.5).sub_(1.0)


def decode_latent(data: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) float32 [C, h, w] from a ``.latent.npy`` member holding [2, C, h, w]."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise ValueError(f"latent member has shape {arr.shape}; expected [2, C, h, w] (mean, logvar)")
    t = torch.from_numpy(arr.astype(np.float32))
    return t[0], t[1]
