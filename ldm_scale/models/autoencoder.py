"""First-stage autoencoders of the LDM paper (Sec. 3.1): KL-regularised and VQ-regularised.

Both keep CompVis attribute names (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``,
``quantize``) and expose the LDM seam used by :class:`ldm_scale.models.ldm.LatentDiffusion`:
``encode_to_latent(x, generator)``, ``decode_from_latent(z)``, ``latent_channels``,
``downsample_factor``. Losses (LPIPS, PatchGAN, KL / VQ weights) live in ``ldm_scale.losses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .distributions import DiagonalGaussianDistribution
from .encoder_decoder import Decoder, Encoder, EncoderDecoderConfig
from .quantize import VectorQuantizer


@dataclass
class AutoencoderConfig:
    """KL autoencoder: ``ddconfig`` (double_z must be True) and the latent width ``embed_dim``."""

    ddconfig: EncoderDecoderConfig = field(default_factory=EncoderDecoderConfig)
    embed_dim: int = 4


@dataclass
class VQConfig:
    """VQ autoencoder: codebook of ``n_embed`` vectors of size ``embed_dim``; commitment ``beta``.

    ``legacy_beta`` selects where beta sits in the VQ loss (see :class:`VectorQuantizer`).
    """

    ddconfig: EncoderDecoderConfig = field(default_factory=lambda: EncoderDecoderConfig(
        ch_mult=[1, 2, 4], z_channels=3, double_z=False))
    embed_dim: int = 3
    n_embed: int = 8192
    beta: float = 0.25
    legacy_beta: bool = True


class _FirstStageModel(nn.Module):
    """What the KL and the VQ model share: ``cfg``, the encoder / decoder pair (registered first:
    the CompVis key order) and the sizes the LDM reads."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.ddconfig)
        self.decoder = Decoder(cfg.ddconfig)

    @property
    def latent_channels(self) -> int:
        return self.cfg.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.cfg.ddconfig.downsample_factor


class AutoencoderKL(_FirstStageModel):
    """E(x) -> q(z|x) = N(mu, sigma^2) with a small KL penalty towards N(0, I); D(z) -> x."""

    def __init__(self, cfg: AutoencoderConfig):
        if not cfg.ddconfig.double_z:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (the encoder outputs mean and logvar)")
        super().__init__(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.ddconfig.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.ddconfig.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> nn.Parameter:
        """Weight of the decoder's last conv, for the adaptive GAN weight (Esser et al. 2021, Eq. 7)."""
        return self.decoder.conv_out.weight

    def encode_to_latent(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                         deterministic: bool = False) -> torch.Tensor:
        """LDM seam: a sample of the posterior (CompVis ``get_first_stage_encoding``), unscaled;
        its mean with ``deterministic`` (the validation loss)."""
        posterior = self.encode(x)
        return posterior.mode() if deterministic else posterior.sample(generator)

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


class VQModel(_FirstStageModel):
    """E(x) -> h -> nearest codebook vectors z_q -> D(z_q).

    As in the paper, the LDM is trained on the *pre-quantisation* latents h and the quantiser is
    absorbed into the decoder (``decode_prequant`` quantises, then decodes).
    """

    def __init__(self, cfg: VQConfig):
        if cfg.ddconfig.double_z:
            raise ValueError("VQModel needs ddconfig.double_z=False")
        super().__init__(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_beta)
        self.quant_conv = nn.Conv2d(cfg.ddconfig.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.ddconfig.z_channels, 1)

    def encode_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        return self.quantize(self.encode_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_prequant(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decode(quant)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices [B, h, w]."""
        return self.decode(self.quantize.embed(indices))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        quant, emb_loss, info = self.encode(x)
        return self.decode(quant), emb_loss, info

    def get_last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    def encode_to_latent(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                         deterministic: bool = True) -> torch.Tensor:
        """LDM seam: the deterministic pre-quantisation latent h (``generator`` and
        ``deterministic`` change nothing)."""
        return self.encode_prequant(x)

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_prequant(z)
