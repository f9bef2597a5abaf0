"""Image conventions shared by training grids, ``launch/sample.py`` and evaluation: one quantiser
(float [-1, 1] -> uint8, exactly as saving a PNG would), one grid layout, one PNG writer, one image
reader, all through ``ldm_scale.storage`` (so ``s3://`` paths work everywhere)."""
from __future__ import annotations

import io
import math
from typing import Tuple

import torch


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1], [B, C, H, W] -> uint8 [B, C, H, W] (round half to even, clipped)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1] or uint8, got {images.dtype}")
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU."""
    return quantize_to_uint8(images.detach()).permute(0, 2, 3, 1).contiguous().cpu()


def grid_size(rows: int, cols: int, height: int, width: int, padding: int = 2) -> Tuple[int, int]:
    """(height, width) in pixels of the :func:`image_grid` of rows x cols samples."""
    return rows * (height + padding) + padding, cols * (width + padding) + padding


def image_grid(images: torch.Tensor, ncols: int, padding: int = 2) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] (or uint8) -> one uint8 [H', W', 3] image: ``ncols`` samples a row,
    ``padding`` black pixels around each (torchvision's ``make_grid`` layout)."""
    images = quantize_to_uint8(images.detach()).cpu()
    n, c, h, w = images.shape
    ncols = max(1, min(ncols, n))
    rows = math.ceil(n / ncols)
    grid = torch.zeros(c, *grid_size(rows, ncols, h, w, padding), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid.permute(1, 2, 0).contiguous()


def save_png(image_hwc: torch.Tensor, url: str) -> str:
    """Write one uint8 [H, W, C] image as PNG to ``url`` (a path or any storage URL)."""
    from PIL import Image

    from ldm_scale import storage

    buf = io.BytesIO()
    Image.fromarray(image_hwc.numpy()).save(buf, format="PNG")
    storage.write_bytes(str(url), buf.getvalue())
    return str(url)


def load_image(url: str, size: Tuple[int, int], mode: str = "RGB") -> torch.Tensor:
    """Image at ``url`` resized to ``size`` = (H, W) -> [1, C, H, W] in [0, 1]."""
    from PIL import Image

    from ldm_scale import storage

    if not storage.exists(url):
        raise FileNotFoundError(f"image not found: {storage.redact(url)}")
    with storage.open_url(url, "rb") as f:
        img = Image.open(io.BytesIO(f.read())).convert(mode)
    img = img.resize((size[1], size[0]), resample=Image.Resampling.LANCZOS)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
    return x.reshape(size[0], size[1], len(mode)).permute(2, 0, 1)[None]
