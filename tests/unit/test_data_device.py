"""The host -> device hand-off: uint8 images normalised on the device, the same values as the host
conversion; CUDA branch (side stream, pinned memory) as a `gpu` test."""
from __future__ import annotations

import pytest
import torch

from ldm_scale.data.device import DeviceHandoff, unit_range
from ldm_scale.data.transforms import batch_to_unit_range


def batch(n=3, size=8, pin=False):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return {"image": images.pin_memory() if pin else images, "caption": ["a", "b", "c"][:n],
            "key": [str(i) for i in range(n)], "label": torch.arange(n)}


def test_unit_range_equals_the_host_conversion_bitwise():
    b = batch()
    torch.testing.assert_close(unit_range(b["image"]), batch_to_unit_range(b["image"]), rtol=0, atol=0)
    floats = torch.rand(2, 3, 4, 4)
    assert unit_range(floats) is floats


def test_cpu_handoff_normalises_images_and_passes_everything_else():
    b = batch()
    out = DeviceHandoff(torch.device("cpu"))(b)
    assert out["image"].dtype == torch.float32 and out["image"].min() >= -1 and out["image"].max() <= 1
    torch.testing.assert_close(out["image"], batch_to_unit_range(b["image"]), rtol=0, atol=0)
    assert out["caption"] == b["caption"] and out["key"] == b["key"] and torch.equal(out["label"], b["label"])


@pytest.mark.gpu
def test_cuda_handoff_copies_pinned_uint8_on_a_side_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    handoff = DeviceHandoff(device)
    assert handoff.stream is not None and handoff.stream != torch.cuda.current_stream(device)
    expected = batch_to_unit_range(batch(n=3, size=64)["image"])
    for _ in range(50):  # reuse of freed blocks across streams must never corrupt a batch
        out = handoff(batch(n=3, size=64, pin=True))
        assert out["image"].device == device and out["label"].device == device
        y = out["image"] * 2.0  # consumer work on the compute stream
        torch.testing.assert_close((y / 2.0).cpu(), expected, rtol=0, atol=0)
