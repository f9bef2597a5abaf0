"""The host -> device hand-off of training batches: uint8 images copied on a side CUDA stream and
normalised to [-1, 1] on the device.

Why uint8 to the device: a float32 image is 4x the bytes of its uint8 pixels, so converting on the
host quadruples the page-locked copy and the PCIe/NVLink traffic, and costs the main process a pass
over every pixel per batch (``benchmarks/bench_handoff.py`` measures that share). The conversion is
one fused elementwise kernel on the device.

Why a side stream but no loader-level look-ahead: the copy is issued non-blocking from pinned memory
on its own stream, and the compute stream waits for it with an event, so it overlaps whatever the
device still runs. Fetching the *next* batch from the loader before the current step ends would
make the loader's saved position one batch ahead of the trained batches and break exact resume,
and it would buy little: the step's one host sync (the step-health decision) is at its end, and the
copy of a 32-image 256 px uint8 batch is 6.3 MB, ~0.3 ms at 25 GB/s.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

IMAGE_KEYS = ("image",)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Float32 images in [-1, 1] from uint8 (on the tensor's device), or the tensor unchanged when it
    is already floating point (a loader that normalised on the host)."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)


class DeviceHandoff:
    """Moves loader batches to ``device``: tensors non-blocking on a side stream (CUDA), images
    normalised there; strings and other Python values pass through."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream: Optional[torch.cuda.Stream] = (torch.cuda.Stream(self.device)
                                                    if self.device.type == "cuda" else None)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.stream is None:
            return {k: self._move(k, v) for k, v in batch.items()}
        compute = torch.cuda.current_stream(self.device)
        # The side stream must not overwrite memory the compute stream still reads: order it after
        # the work queued so far (cheap: an event, no host wait).
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            moved = {k: self._move(k, v) for k, v in batch.items()}
        compute.wait_stream(self.stream)  # the step's kernels start after the copy, on the device
        for value in moved.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                # Allocated on the side stream, used on the compute stream: tell the caching
                # allocator, or it may reuse the memory while the compute stream still reads it.
                value.record_stream(compute)
        return moved

    def _move(self, key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(self.device, non_blocking=True)
        return unit_range(value) if key in IMAGE_KEYS else value
