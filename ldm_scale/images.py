"""Image conventions shared by training grids, ``launch/sample.py`` and evaluation: one quantiser
(float [-1, 1] -> uint8, exactly as saving a PNG would), one grid layout, one PNG writer, one image
reader, a captioned grid for people to look at, all through ``ldm_scale.storage`` (so ``s3://``
paths work everywhere)."""
from __future__ import annotations

import io
import math
from typing import Sequence, Tuple

import numpy as np
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


def letterbox(images: Sequence[torch.Tensor], fill: float = 1.0) -> torch.Tensor:
    """Images of different sizes ([1 or more, 3, h, w] each, in [-1, 1]) centred on one canvas size
    (the largest height x the largest width), ``fill`` around them (1.0: white): [N, 3, H, W], so
    samples of every aspect bucket share one grid."""
    flat = [im for batch in images for im in batch]
    height, width = max(im.shape[-2] for im in flat), max(im.shape[-1] for im in flat)
    out = torch.full((len(flat), flat[0].shape[0], height, width), fill, dtype=flat[0].dtype)
    for slot, im in zip(out, flat):
        top, left = (height - im.shape[-2]) // 2, (width - im.shape[-1]) // 2
        slot[:, top:top + im.shape[-2], left:left + im.shape[-1]] = im
    return out


def captioned_grid(images: torch.Tensor, captions: Sequence[str], ncols: int = 4, min_size: int = 192,
                   padding: int = 6, font_size: int = 14) -> torch.Tensor:
    """A grid a person can read: each sample enlarged to at least ``min_size`` pixels and its
    caption (prompt or class) printed under it, ``ncols`` a row, on white. -> uint8 [H', W', 3].

    Enlarged by an integer factor with nearest-neighbour sampling, on purpose: every generated pixel
    stays a visible block, so a 32-px sample is not made to look better than it is (a smooth
    resampling would invent detail). Text is drawn by Pillow with its bundled scalable font, wrapped
    to the cell width.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = quantize_to_uint8(images.detach()).cpu()
    n, c, h, w = images.shape
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    scale = max(1, math.ceil(min_size / max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    line_h = font_size + 4
    wrapped = [_wrap(str(text), font, cell_w) for text in captions]
    band = max((len(lines) for lines in wrapped), default=0) * line_h + padding
    ncols = max(1, min(ncols, n))
    rows = math.ceil(n / ncols)
    canvas = Image.new("RGB", (padding + ncols * (cell_w + padding), padding + rows * (cell_h + band + padding)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, ncols)
        x, y = padding + col * (cell_w + padding), padding + r * (cell_h + band + padding)
        big = images[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(big), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + cell_h + 2 + k * line_h), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy())


def _wrap(text: str, font, width: int) -> list:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


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
