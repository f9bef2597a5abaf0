"""The FID Inception-v3 network and its pinned weights.

FID, IS and the ADM evaluator use the TF graph ``inception-2015-12-05`` (Szegedy et al. 2016), not
torchvision's ImageNet Inception-v3. Its PyTorch port (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``) loads into torchvision's Inception-v3 layout with the
changes pytorch-fid documents for matching the TF graph:

- 1008 output classes (the TF graph has 1008 logits);
- ``avg_pool2d(..., count_include_pad=False)`` in the pooling branch of blocks A, C and E_1
  (TF's average pooling ignores padded positions);
- max pooling instead of average pooling in the pooling branch of the last block (E_2, ``Mixed_7c``).

Parameter names are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
..., ``fc.weight``), so the pytorch-fid file loads with ``strict=True``.

Weights are looked for as ``weights.py`` says (an explicit path or URL; ``$LDM_SCALE_FID_WEIGHTS``; the
torch hub cache, under pytorch-fid's or torch-fidelity's file name; then a download from
``FID_WEIGHTS_URL`` when allowed). Every file is checked against the pinned SHA-256
(:func:`check_sha256`); the entry points check the file up front, before any other work
(``features.check_extractor_weights``). Where to get the file and how to verify it by hand:
docs/evaluation.md, "The FID Inception weights file".
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from ldm_scale.evaluation import weights
# The weights-file rules every extractor shares, under the names callers of this module use.
from ldm_scale.evaluation.weights import WeightsHashError, hub_checkpoint_dir, sha256_of_file  # noqa: F401

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
# The same converted weights are published by torch-fidelity under this name (same hash prefix).
FID_WEIGHTS_ALT_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)
# SHA-256 of the file. The first 8 hex digits are the ones in the file name (what torch.hub checks);
# the full digest is the one independent projects pin for the pytorch-fid URL above and for
# torch-fidelity's copy (e.g. genforce's metrics/inception.py, with this URL), size 95,628,359 bytes.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV_VAR = "LDM_SCALE_FID_WEIGHTS"

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# sFID (Nash et al. 2021; ADM evaluator): the first 7 channels of "mixed_6/conv", i.e. the 1x1
# branch of the 7th mixed block (Mixed_6d), 17 x 17 spatial -> 2023 features.
SPATIAL_CHANNELS = 7
MIN_INPUT_SIZE = 75


def spatial_size(input_size: int) -> int:
    """Side of the 17 x 17 (at 299) grid entering Mixed_6b..6e, for another input size."""
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"Inception-v3 needs inputs of at least {MIN_INPUT_SIZE} px, got {input_size}")
    s = (input_size - 3) // 2 + 1 - 2  # Conv2d_1a (stride 2), Conv2d_2a
    s = (s - 3) // 2 + 1 - 2  # max pool, Conv2d_4a
    s = (s - 3) // 2 + 1  # max pool
    return (s - 3) // 2 + 1  # Mixed_6a (stride 2)


SPATIAL_DIM = SPATIAL_CHANNELS * spatial_size(INPUT_SIZE) ** 2


class FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [b1, b5, b3, self.branch_pool(pool)]


class FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [b1, b7, bd, self.branch_pool(pool)]


class FIDInceptionE(InceptionE):
    """Block E with the TF graph's pooling branch: average pooling without padded positions in
    ``Mixed_7b`` (``pool="avg"``), max pooling in ``Mixed_7c`` (``pool="max"``, a quirk of the graph)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [b1, b3, bd, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF FID graph. Input: float [B, 3, 299, 299] on the 0..255 scale.

    ``forward`` returns ``pool`` [B, 2048] (FID / precision-recall / KID features), ``logits``
    [B, 1008] (with bias), ``logits_unbiased`` [B, 1008] (``pool @ W``, used for IS as in the original
    code) and ``spatial`` [B, 2023] (sFID).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # The TF graph maps 0..255 to [-1, 1) as (x - 128) / 128 (not x / 127.5 - 1).
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].flatten(1)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits_unbiased = pool @ self.fc.weight.T
        return {"pool": pool, "logits": logits_unbiased + self.fc.bias,
                "logits_unbiased": logits_unbiased, "spatial": spatial}


def random_fid_inception(seed: int = 0) -> FIDInceptionV3:
    """The FID architecture with seeded random weights: an extractor that needs no download.

    Kaiming-normal convolutions keep activations at a stable scale through the 40-odd layers (the
    BatchNorms are at their identity defaults in eval mode), so features are informative rather
    than saturated. Features from it are NOT comparable with any published FID.
    """
    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (1.0 / module.in_features) ** 0.5)
                module.bias.zero_()
    return net.eval().requires_grad_(False)


FID_WEIGHTS = weights.WeightsFile(
    label="FID Inception weights", filename=FID_WEIGHTS_FILENAME, url=FID_WEIGHTS_URL, env_var=WEIGHTS_ENV_VAR,
    sha256=FID_WEIGHTS_SHA256, alt_filenames=FID_WEIGHTS_ALT_FILENAMES,
    offline_hint="Offline, extractor.name=random-inception runs without weights but its numbers are not "
                 "comparable with published FID.")


def check_sha256(path: str, expected: str, *, source: Optional[str] = None, hash_key: str = "extractor.sha256") -> str:
    """:func:`weights.check_sha256` for the FID Inception file (its message names the download URL)."""
    return weights.check_sha256(path, expected, source=source, hash_key=hash_key, url=FID_WEIGHTS_URL)


def resolve_fid_weights(weights_path: Optional[str] = None, *, allow_download: bool = True,
                        storage_cfg=None) -> str:
    """Local path of the FID Inception weights (:func:`weights.resolve`)."""
    return weights.resolve(FID_WEIGHTS, weights_path, allow_download=allow_download, storage_cfg=storage_cfg)


def load_fid_inception(weights_path: Optional[str] = None, *, sha256: str = FID_WEIGHTS_SHA256,
                       allow_download: bool = True, map_location: str = "cpu") -> tuple:
    """(the FID Inception-v3 with pinned weights in eval mode without gradients, the file's SHA-256)."""
    path = resolve_fid_weights(weights_path, allow_download=allow_download)
    digest = check_sha256(path, sha256)
    state = torch.load(path, map_location=map_location, weights_only=True)
    net = FIDInceptionV3()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path} is not an FID Inception state dict: missing {missing[:5]}..., unexpected "
            f"{unexpected[:5]}... ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return net.eval().requires_grad_(False), digest
