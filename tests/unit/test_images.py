"""ldm_scale/images.py: the one quantiser, grid layout and PNG round trip every writer uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scale.images import grid_size, image_grid, load_image, quantize_to_uint8, save_png, to_uint8_hwc


def test_quantiser_is_what_a_png_stores():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7)
    assert quantize_to_uint8(x).flatten().tolist() == [0, 0, 64, 128, 191, 255, 255]  # 127.5 -> 128: half to even
    assert to_uint8_hwc(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_grid_layout_and_png_round_trip(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 6, 4) * 2 - 1
    grid = image_grid(images, ncols=2)  # 3 rows x 2 columns, the last cell empty
    assert grid.shape == (*grid_size(3, 2, 6, 4), 3) and grid.dtype == torch.uint8
    assert torch.equal(grid[2:8, 2:6], to_uint8_hwc(images[:1])[0])  # first sample, 2 px in
    assert torch.equal(grid[2 + 2 * 8:8 + 2 * 8, 2:6], to_uint8_hwc(images[4:5])[0])  # fifth: third row
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0 and grid[18:24, 8:12].max() == 0  # black gaps, empty cell
    path = save_png(grid, str(tmp_path / "sub" / "grid.png"))
    assert torch.equal(torch.from_numpy(np.array(Image.open(path))), grid)
    back = load_image(path, (grid.shape[0], grid.shape[1]))
    assert torch.equal((back[0] * 255).round().to(torch.uint8).permute(1, 2, 0), grid)


def test_captioned_grid_enlarges_each_sample_and_prints_its_caption_under_it():
    from ldm_scale.images import captioned_grid

    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    grid = captioned_grid(images, ["a red circle on a blue background", "class 7", "x", "y", "z"], ncols=3,
                          min_size=192, padding=6)
    scale, cell = 6, 192  # ceil(192 / 32): whole pixels, nearest neighbour
    assert grid.dtype == torch.uint8 and grid.shape[2] == 3
    assert grid.shape[1] == 6 + 3 * (cell + 6)
    # Sample 0's pixels, each a 6x6 block, exactly where the first cell is.
    block = grid[6:6 + cell, 6:6 + cell].permute(2, 0, 1)
    expected = quantize_to_uint8(images[:1])[0].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    assert torch.equal(block, expected)
    # Under each sample, ink (the caption) on white; the first caption wraps to two lines.
    band0 = grid[6 + cell:6 + cell + 40, 6:6 + cell]
    assert (band0 < 128).any() and (band0 == 255).float().mean() > 0.7
    second_line = grid[6 + cell + 2 + 18:6 + cell + 2 + 36, 6:6 + cell]
    assert (second_line < 128).any()
    rows = 2
    assert grid.shape[0] == 6 + rows * (cell + 2 * 18 + 6 + 6)
    with pytest.raises(ValueError, match="5 images but 2 captions"):
        captioned_grid(images, ["a", "b"])
