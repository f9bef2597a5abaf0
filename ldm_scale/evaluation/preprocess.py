"""The one image convention every metric here uses: quantise to uint8, then resize for the extractor.

Generated images (float, [-1, 1]) are first quantised exactly as if they had been saved as PNG:
``round((x + 1) * 127.5)`` clipped to [0, 255]. Real images arrive as uint8 already. Both sides then
go through the same resize to the extractor's input size (299 for Inception). The resize rule moves
FID by several points (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"), so it is a named, recorded choice:

- ``pil_bicubic`` (default): PIL bicubic on each channel in float ("F") mode, no re-quantisation
  after the resize; the clean-fid convention (antialiased).
- ``pil_bicubic_rgb``: PIL bicubic on the 8-bit RGB image, re-quantised to uint8: what torchvision's
  ``Resize`` does to a PIL image, so dgm-eval's default for FD-DINOv2 (``extractor=dinov2`` uses it).
- ``tf_bilinear``: TF1 ``resize_bilinear(align_corners=False)`` without half-pixel centres, as inside
  the original TF FID graph, the ADM evaluator and torch-fidelity (the LDM paper's numbers).
- ``torch_bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)``, as pytorch-fid does.

Images already at the target size are not resampled under any rule.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ldm_scale.choices import Choice
from ldm_scale.images import quantize_to_uint8  # noqa: F401 - the one quantiser, re-exported

class Resize(Choice):
    """``extractor.resize``: the three rules of the module docstring."""

    pil_bicubic = "pil_bicubic"
    pil_bicubic_rgb = "pil_bicubic_rgb"
    tf_bilinear = "tf_bilinear"
    torch_bilinear = "torch_bilinear"


RESIZE_MODES: Tuple[str, ...] = tuple(Resize.values())


def nhwc_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] float in [-1, 1] or uint8 -> uint8 numpy [B, H, W, C] (the ADM ``arr_0`` layout)."""
    return quantize_to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 numpy [B, H, W, C] -> uint8 torch [B, C, H, W]."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, C] images, got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _resize_pil_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    from PIL import Image

    arr = x.to("cpu", torch.float32).numpy()
    out = np.empty((arr.shape[0], arr.shape[1], size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[i, c], mode="F")
            out[i, c] = np.asarray(img.resize((size, size), resample=Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(out).to(x.device)


def _resize_pil_bicubic_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    from PIL import Image

    arr = images.to("cpu").permute(0, 2, 3, 1).contiguous().numpy()
    out = np.stack([np.asarray(Image.fromarray(a, mode="RGB").resize((size, size), resample=Image.BICUBIC))
                    for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().to(images.device)


def _resize_tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False: the source coordinate of
    # output pixel i is i * in / out (no +0.5 shifts), neighbours clamped at the far edge.
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo.double()).float()

    h_lo, h_hi, h_w = axis(x.shape[2])
    w_lo, w_hi, w_w = axis(x.shape[3])
    top = x[:, :, h_lo, :] * (1 - h_w)[None, None, :, None] + x[:, :, h_hi, :] * h_w[None, None, :, None]
    return top[:, :, :, w_lo] * (1 - w_w) + top[:, :, :, w_hi] * w_w


def resize_for_extractor(images: torch.Tensor, size: int, mode: str = "pil_bicubic") -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, size, size] with values on the 0..255 scale."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if images.dtype != torch.uint8:
        raise TypeError(f"resize expects uint8 images (quantise first), got {images.dtype}")
    x = images.float()
    if x.shape[2] == size and x.shape[3] == size:
        return x
    if mode == "pil_bicubic":
        return _resize_pil_bicubic(x, size)
    if mode == "pil_bicubic_rgb":
        return _resize_pil_bicubic_rgb(images, size)
    if mode == "tf_bilinear":
        return _resize_tf_bilinear(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
