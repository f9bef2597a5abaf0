"""Decode and shape one sample: image bytes -> [3, R, R] uint8, batched to float in [-1, 1]; or
latent moments.

Random crop and flip draw from a generator seeded by the sample's identity (seed, epoch, shard,
index within shard, block), never from a process-global RNG, so a batch is a pure function of the
data position and resumes bitwise. Images stay uint8 through batching and the trip from a
DataLoader worker to the main process, where a batch is converted to float once.
"""
from __future__ import annotations

import io
import random
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch


def sample_rng(seed: int, epoch: int, shard: int, index: int, salt: int = 0) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across processes and Python versions,
    # and ~100x cheaper to set up per sample than a numpy SeedSequence.
    return random.Random(f"ldm_scale/{seed}/{epoch}/{shard}/{index}/{salt}")


def decode_image(data: bytes, resolution: Union[int, Tuple[int, int]], decoder: str = "auto"):
    """PIL RGB image. With ``decoder="auto"`` a JPEG larger than needed is decoded at a reduced
    DCT scale (1/2, 1/4, 1/8) that still covers the target: a ``resolution`` square, or a
    ``(width, height)`` bucket. libjpeg then skips most of the work, which is where decoding time
    goes for web-sized images."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if decoder == "auto" and img.format == "JPEG":
        w, h = img.size
        tw, th = (resolution, resolution) if isinstance(resolution, int) else resolution
        scale = max(tw / w, th / h)  # for a square: resolution / min(w, h), the same float
        # draft() keeps each dimension >= the requested one; ask for the size that the final
        # resize would produce so the target stays covered.
        img.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
    if img.mode != "RGB":
        img = img.convert("RGB")  # (converting an RGB image would be a full copy)
    img.load()
    return img


def image_header_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of an encoded image from its header (PIL parses no pixels)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


def resize_crop_flip(img, resolution: int, crop: str, flip: bool, rng: Optional[random.Random]) -> torch.Tensor:
    """Resize the short side to ``resolution`` (bicubic, antialiased), crop a square (centre, or at
    a random offset), optionally flip horizontally with p=0.5; return [3, R, R] uint8."""
    return resize_crop_to(img, resolution, resolution, crop, flip, rng)[0]


def resize_crop_to(img, width: int, height: int, crop: str, flip: bool,
                   rng: Optional[random.Random]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Resize (bicubic, antialiased) by the smallest scale that covers ``width`` x ``height``, crop
    that size (centre, or at a random offset), optionally flip horizontally with p=0.5; return
    ([3, height, width] uint8, (top, left) of the crop in the resized image, as the output shows it:
    after a flip, left is measured from the flipped image's left edge). The crop offset is SDXL's
    crop micro-conditioning (Podell et al. 2023, Sec. 2.2)."""
    from PIL import Image

    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "random":
        left = rng.randint(0, nw - width)
        top = rng.randint(0, nh - height)
    else:
        left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = nw - width - left
    # Channel planes straight from PIL (its "R"/"G"/"B" raw packers): as cheap as one interleaved
    # copy, and the tensor comes out contiguous, so the later float conversion is a vectorised pass
    # instead of a strided gather.
    planes = bytearray(b"".join(img.tobytes("raw", band) for band in "RGB"))
    return torch.frombuffer(planes, dtype=torch.uint8).view(3, height, width), (top, left)


def crop_to_bucket(data: bytes, bucket: Tuple[int, int], *, stored: Tuple[int, int], meta: Dict, crop: str,
                   flip: bool, rng: Optional[random.Random], decoder: str = "auto"
                   ) -> Tuple[torch.Tensor, Dict[str, Tuple[int, int]]]:
    """An encoded image cropped to its aspect ``bucket`` (width, height), with SDXL's
    micro-conditioning of that crop: ([3, h, w] uint8, {original_size, crop_top_left, target_size}
    as (height, width) / (top, left)). ``stored``: the image's (width, height) from its header; the
    original size is the metadata's (before any download-time resize), else ``stored``. The one
    rule the bucketed loader and bucketed latent precomputation share."""
    from ldm_scale.data.buckets import original_size
    from ldm_scale.models.micro_conditioning import BATCH_KEYS

    width, height = bucket
    image, (top, left) = resize_crop_to(decode_image(data, bucket, decoder), width, height, crop, flip, rng)
    ow, oh = original_size(meta) or stored
    return image, dict(zip(BATCH_KEYS, ((int(oh), int(ow)), (top, left), (height, width))))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


def stack_uint8(images: List[torch.Tensor]) -> torch.Tensor:
    """[B, 3, R, R] uint8 from [3, R, R] uint8 images. Inside a DataLoader worker the batch is built
    directly in shared memory: sending it to the main process then copies nothing, and uint8 has a
    quarter of the shared pages (each one a page fault) of float32."""
    shape = (len(images), *images[0].shape)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    return torch.stack(images, out=out)


def batch_to_unit_range(images: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """Float32 in [-1, 1] from a uint8 batch (same values as :func:`to_unit_range`). One image at a
    time, so each slot is still in cache for its second pass; ``pin_memory`` allocates the output in
    page-locked memory for asynchronous GPU copies."""
    out = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
    for slot, image in zip(out, images):
        torch.div(image, 127.5, out=slot)  # uint8 in, float32 out: one pass, no temporary
        slot.sub_(1.0)
    return out


def latent_header_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of a ``.latent.npy`` member ([2, C, h, w]) from its header (no array read)."""
    buf = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape = read_header(buf)[0]
    if len(shape) != 4:
        raise ValueError(f"latent member has shape {shape}; expected [2, C, h, w] (mean, logvar)")
    return int(shape[3]), int(shape[2])


def decode_latent(data: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) float32 [C, h, w] from a ``.latent.npy`` member holding [2, C, h, w]."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise ValueError(f"latent member has shape {arr.shape}; expected [2, C, h, w] (mean, logvar)")
    t = torch.from_numpy(arr.astype(np.float32))
    return t[0], t[1]
