"""Autoencoder losses: LPIPS perceptual term, PatchGAN discriminator, adaptive GAN weight, KL / VQ
regularisers (Rombach et al. 2022, Sec. 3.1; Esser et al. 2021)."""
from .autoencoder import (AutoencoderLoss, AutoencoderLossConfig, LearnedLogVariance, adaptive_weight,
                          gan_active, gaussian_nll, reconstruction_error)
from .discriminator import (DiscriminatorConfig, PatchDiscriminator, generator_adversarial_loss, hinge_d_loss,
                            vanilla_d_loss)
from .perceptual import PerceptualConfig, build_lpips

__all__ = [
    "AutoencoderLoss", "AutoencoderLossConfig", "LearnedLogVariance", "adaptive_weight", "gan_active",
    "gaussian_nll", "reconstruction_error", "DiscriminatorConfig", "PatchDiscriminator",
    "generator_adversarial_loss", "hinge_d_loss", "vanilla_d_loss", "PerceptualConfig", "build_lpips",
]
