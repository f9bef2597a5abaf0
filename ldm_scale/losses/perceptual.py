"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric"), used as the perceptual reconstruction term of the autoencoder loss
(Rombach et al. 2022, Sec. 3.1 / App. G: "perceptual loss and a patch-based adversarial objective")
and as a reconstruction metric.

The network has two parts with different origins:
- the calibrated linear heads ``lin0..lin4`` ship inside the ``lpips`` package and are always loaded
  (no download);
- the trunk (VGG16 or AlexNet ImageNet features) comes from torchvision's weights, which live in the
  torch hub cache (``$TORCH_HOME/hub/checkpoints``) or in a file given by the user.

``backbone_weights`` selects the trunk source:
- ``"torchvision"``: the torch hub cache, downloading into it if it is empty (clusters with internet);
- a path or URL (anything ``ldm_scale.storage`` opens) to a torchvision state dict
  (``features.<i>.weight`` keys, e.g. ``vgg16-397923af.pth``) or to a saved LPIPS trunk state dict;
- ``"random"``: a randomly initialised trunk (seeded, the same network in every process). Only
  meaningful for offline tests: distances are then not perceptual. A warning says so in the log.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ldm_scale.choices import Choice

log = logging.getLogger(__name__)

# torchvision's ImageNet weight files, as named in the torch hub cache.
TORCHVISION_WEIGHT_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
RANDOM_TRUNK_SEED = 0


class PerceptualNet(Choice):
    """The LPIPS trunk (the paper's autoencoders use VGG16)."""

    vgg = "vgg"
    alex = "alex"


@dataclass
class PerceptualConfig:
    """Which LPIPS network to build and where its trunk weights come from."""

    net: PerceptualNet = "vgg"
    backbone_weights: str = "torchvision"  # torchvision | random | <path or URL>
    # LPIPS's linear heads; with False they are random too (a baseline, not the LPIPS metric).
    calibrated_heads: bool = True


def hub_cache_file(net: str) -> str:
    """Where torchvision keeps (or would download) the ImageNet trunk weights for ``net``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_WEIGHT_FILES[net])


def _trunk_state_from_torchvision(lpips_trunk: nn.Module, tv_state: dict) -> dict:
    """Map torchvision ``features.<i>.<w>`` keys onto LPIPS's ``slice<k>.<i>.<w>`` layout.

    LPIPS cuts torchvision's ``features`` Sequential into slices but keeps the original child
    indices as names, so the mapping only needs the index -> slice table.
    """
    mapped = {}
    for key in lpips_trunk.state_dict():
        slice_name, index, leaf = key.split(".")
        source = f"features.{index}.{leaf}"
        if source not in tv_state:
            raise KeyError(
                f"LPIPS trunk weights are missing {source!r} (needed for {slice_name}.{index}.{leaf}); "
                "the file must be a torchvision state dict of the same network as loss.perceptual.net")
        mapped[key] = tv_state[source]
    return mapped


def _load_state_file(url: str) -> dict:
    if os.path.exists(url):
        return torch.load(url, map_location="cpu", weights_only=True)
    from ldm_scale import storage  # lazy: only URLs need the storage seam

    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


class FrozenLPIPS(nn.Module):
    """An LPIPS network that stays in eval mode (its linear heads carry dropout) and never trains."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance between images in [-1, 1], shape ``[B, 1, 1, 1]``; gradients flow to inputs."""
        return self.net(a, b)


def build_lpips(cfg: PerceptualConfig) -> FrozenLPIPS:
    """Build a frozen LPIPS network (eval mode, no gradients to its weights)."""
    import lpips  # lazy: optional at import time of the losses package

    if cfg.net not in TORCHVISION_WEIGHT_FILES:
        raise ValueError(f"loss.perceptual.net={cfg.net!r}: choose one of {sorted(TORCHVISION_WEIGHT_FILES)}")
    source = cfg.backbone_weights
    if source == "torchvision":
        cached = hub_cache_file(cfg.net)
        try:
            net = lpips.LPIPS(net=cfg.net, pretrained=cfg.calibrated_heads, pnet_rand=False, verbose=False)
        except Exception as err:  # urllib / socket errors when the cache is empty and offline
            raise RuntimeError(
                f"LPIPS trunk weights for {cfg.net!r} are not in the torch hub cache ({cached}) and could "
                f"not be downloaded ({err}). Put the torchvision file there, set "
                "loss.perceptual.backbone_weights=<path or URL>, or 'random' for offline tests.") from err
        log.info("LPIPS %s trunk: torchvision ImageNet weights from %s", cfg.net, cached)
    else:
        # A random trunk must be the same network in every process and after every restart (it is
        # not checkpointed): draw it from a fixed seed without touching the global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TRUNK_SEED)
            net = lpips.LPIPS(net=cfg.net, pretrained=cfg.calibrated_heads, pnet_rand=True, verbose=False)
        if source == "random":
            log.warning(
                "LPIPS %s trunk is RANDOMLY INITIALISED (loss.perceptual.backbone_weights=random): "
                "perceptual distances are not meaningful; use this only for offline tests.", cfg.net)
        else:
            state = _load_state_file(source)
            if any(k.startswith("features.") for k in state):
                state = _trunk_state_from_torchvision(net.net, state)
            net.net.load_state_dict(state, strict=True)
            log.info("LPIPS %s trunk: weights from %s", cfg.net, source)
    if cfg.calibrated_heads:
        log.info("LPIPS linear heads: calibrated weights shipped with the lpips package")
    return FrozenLPIPS(net)
