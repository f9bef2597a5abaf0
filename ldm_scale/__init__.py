"""ldm_scale: latent diffusion training at scale."""
