"""One seeding rule for generation (diffusion/noise.py): the same prompt and seed give the same image
from the training grid, launch/sample.py and eval/fid.py's generator, whatever the batch or chunk
size, with a stochastic sampler (DDIM eta=1). Driver: _seeding_driver.py (a world of one)."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.torchrun import REPO_ROOT, run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeding")
    run_python([str(REPO_ROOT / "tests" / "integration" / "_seeding_driver.py"), str(out)], timeout=600).check()
    return torch.load(out / "images.pt")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_batch_size_does_not_change_an_image(images):
    reference = images["grid_batch4"]
    assert reference.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images["grid_batch3"], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(images["sampling_batch1"], reference, atol=1e-5, rtol=0)
    # the four prompts (and noises) give four different images
    assert min((reference[i] - reference[j]).abs().max() for i in range(4) for j in range(i)) > 0.05


@pytest.mark.parametrize("route", ["sample_cli_png", "fid_chunk2_uint8", "fid_chunk3_uint8"])
def test_every_entry_point_makes_the_training_grid_images(images, route):
    expected = to_uint8(images["grid_batch4"]).int()
    got = images[route].int()
    assert got.shape == expected.shape, route
    assert (got - expected).abs().max() <= 1, route  # at most one grey level of rounding
