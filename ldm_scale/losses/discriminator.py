"""PatchGAN discriminator and its losses.

The discriminator is the N-layer "PatchGAN" of Isola et al. 2017 (pix2pix, Sec. 3.2.2), as used by
Esser et al. 2021 (VQGAN) and Rombach et al. 2022 (App. G) for the first-stage autoencoders: it
classifies overlapping patches, so its output is a logit map, not one logit per image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_scale.choices import Choice


class DiscriminatorNorm(Choice):
    batch = "batch"
    none = "none"


@dataclass
class DiscriminatorConfig:
    """PatchGAN shape. The paper's settings: 3 layers, 64 base channels, batch norm."""

    in_channels: int = 3
    num_layers: int = 3
    base_channels: int = 64
    norm: DiscriminatorNorm = "batch"


class BatchNormFP32(nn.BatchNorm2d):
    """``BatchNorm2d`` evaluated in fp32 whatever the input / weight dtype (same state-dict keys).

    DeepSpeed's bf16/fp16 engines cast parameters but keep buffers in fp32, so the affine weights
    and the running statistics end up in different dtypes; normalising in fp32 is also what
    autocast would do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                           self.training or not self.track_running_stats, self.momentum, self.eps)
        return out.to(x.dtype)


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN (Isola et al. 2017): ``num_layers`` stride-2 4x4 convolutions with channel
    doubling (capped at 8x), one stride-1 4x4 block, then a 1-channel 4x4 convolution to logits.

    Each output logit sees a receptive field of 70x70 pixels for ``num_layers=3``.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        if cfg.num_layers < 1:
            raise ValueError(f"loss.discriminator.num_layers={cfg.num_layers}: must be >= 1")
        if cfg.norm not in ("batch", "none"):
            raise ValueError(f"loss.discriminator.norm={cfg.norm!r}: choose 'batch' or 'none'")
        use_norm = cfg.norm == "batch"
        ch = cfg.base_channels

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            # A conv followed by batch norm needs no bias (the norm's shift replaces it).
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=not use_norm)]
            if use_norm:
                layers.append(BatchNormFP32(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, cfg.num_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += block(ch * prev, ch * mult, stride=2)
        prev, mult = mult, min(2 ** cfg.num_layers, 8)
        layers += block(ch * prev, ch * mult, stride=1)
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> patch logits ``[B, 1, h, w]``, in the weights' dtype.

        The input follows the weights' dtype (a DeepSpeed bf16 engine holds bf16 weights) and
        autocast is off, so the convolutions run in that dtype and batch norm in fp32.
        """
        no_autocast = (torch.autocast(device_type=x.device.type, enabled=False)
                       if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
        with no_autocast:  # (meta tensors, used for FLOP counting, have no autocast)
            return self.main(x.to(self.main[0].weight.dtype))


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation (Radford et al. 2016), which the PatchGAN recipes keep.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): ``(E[relu(1 - D(x))] + E[relu(1 + D(x~))]) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss (Goodfellow et al. 2014) on logits:
    ``(E[softplus(-D(x))] + E[softplus(D(x~))]) / 2`` = binary cross-entropy, averaged over both."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term ``-E[D(x~)]`` used with both discriminator losses
    (as in VQGAN / the LDM autoencoders)."""
    return -logits_fake.mean()
