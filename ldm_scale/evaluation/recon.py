"""Reconstruction metrics of a first-stage autoencoder: PSNR, SSIM, LPIPS, rFID, and the latent
standard deviation that sets the LDM's scale factor (Rombach et al. 2022, Tab. 8 and App. G).

Conventions (recorded in the JSON output):
- images are compared in [0, 1] (``(x + 1) / 2``, clipped), in float, without quantisation;
- PSNR and SSIM are computed per image and averaged over images. Identical images have PSNR = inf
  (and so does the mean if any image is identical);
- SSIM is Wang et al. 2004 ("Image Quality Assessment: From Error Visibility to Structural
  Similarity", Eq. 13): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range
  1, evaluated where the window fits inside the image ("valid"), averaged over pixels and channels;
- LPIPS is the distance of the ``lpips`` package on [-1, 1] images (the network is the caller's);
- rFID is FID between the features of the inputs and of their reconstructions (the eval package's
  extractor and ``fid.StreamingMoments``), so it measures the distribution shift the first stage
  introduces, independent of any generator.

All sums live in float64 and are reduced across ranks with one all-reduce, so the numbers do not
depend on how the shards were split.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ldm_scale import dist
from ldm_scale.diffusion.latent_scale import latent_moments, scale_factor_from_moments
from ldm_scale.evaluation.fid import StreamingMoments, fid_from_stats, warn_if_undersampled


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> float32 in [0, 1] (clipped: decoders overshoot)."""
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(R^2 / MSE)``, of ``[B, C, H, W]`` images; inf where equal."""
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf, as intended


def _gaussian_window(kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, kernel_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image mean SSIM (Wang et al. 2004, Eq. 13) of ``[B, C, H, W]`` images, Gaussian window."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < kernel_size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the SSIM window ({kernel_size})")
    x, y = a.double(), b.double()
    channels = x.shape[1]
    g = _gaussian_window(kernel_size, sigma, x.dtype, x.device)
    # The 2-D Gaussian is separable: filter rows then columns, per channel (groups=C).
    kh = g.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size)
    kv = g.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=channels), kv, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


class ReconMetrics:
    """Streaming reconstruction metrics over batches and ranks.

    ``lpips_net``: a frozen LPIPS network (``ldm_scale.losses.build_lpips``) or None to skip LPIPS.
    ``extract_features``: images in [-1, 1] -> features ``[B, D]`` for rFID, or None to skip rFID.
    """

    def __init__(self, lpips_net: Optional[torch.nn.Module] = None,
                 extract_features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 feature_dim: Optional[int] = None):
        if (extract_features is None) != (feature_dim is None):
            raise ValueError("rFID needs both extract_features and feature_dim (or neither)")
        self.lpips_net = lpips_net
        self.extract_features = extract_features
        # [n, sum psnr (finite), n inf psnr, sum ssim, sum lpips, n lpips]
        self.sums = torch.zeros(6, dtype=torch.float64)
        self.latent = torch.zeros(3, dtype=torch.float64)
        self.real = StreamingMoments(feature_dim) if feature_dim else None
        self.fake = StreamingMoments(feature_dim) if feature_dim else None
        self._reduced = False

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, recon: torch.Tensor, latents: Optional[torch.Tensor] = None) -> None:
        """Add one batch: ``inputs`` and ``recon`` in [-1, 1]; ``latents`` as the LDM would see them
        (before scaling), for the latent std."""
        if self._reduced:
            raise RuntimeError("ReconMetrics.update after compute(): make a new accumulator")
        a, b = to_unit_range(inputs), to_unit_range(recon)
        p = psnr(a, b)
        finite = torch.isfinite(p)
        s = ssim(a, b)
        row = [float(len(p)), float(p[finite].sum()), float((~finite).sum()), float(s.sum()), 0.0, 0.0]
        if self.lpips_net is not None:
            dtype = next(self.lpips_net.parameters()).dtype
            d = self.lpips_net(inputs.to(dtype), recon.to(dtype).clamp(-1, 1)).flatten()
            row[4], row[5] = float(d.double().sum()), float(len(d))
        self.sums += torch.tensor(row, dtype=torch.float64)
        if latents is not None:
            self.latent += latent_moments(latents).cpu()
        if self.extract_features is not None:
            self.real.update(self.extract_features(inputs))
            self.fake.update(self.extract_features(recon.clamp(-1, 1)))

    def compute(self) -> Dict[str, float]:
        """All-reduce over ranks (every rank must call this) and return the metrics."""
        if not self._reduced:
            if dist.is_initialized():
                self.sums = dist.all_reduce_sum(self.sums)
                self.latent = dist.all_reduce_sum(self.latent)
                if self.real is not None:
                    self.real.all_reduce()
                    self.fake.all_reduce()
            self._reduced = True
        n, psnr_sum, n_inf, ssim_sum, lpips_sum, n_lpips = (float(v) for v in self.sums)
        if n == 0:
            raise ValueError("no images were evaluated: check the data shards and num_images")
        out: Dict[str, float] = {
            "num_images": int(n),
            "psnr": math.inf if n_inf > 0 else psnr_sum / n,
            "psnr_identical_images": int(n_inf),
            "ssim": ssim_sum / n,
        }
        if n_lpips:
            out["lpips"] = lpips_sum / n_lpips
        if self.real is not None:
            warn_if_undersampled(self.real.n, self.real.dim, "reconstruction features")
            out["rfid"] = fid_from_stats(self.real.stats(), self.fake.stats())
        if self.latent[0] >= 2:
            scale = scale_factor_from_moments(self.latent)
            count, total = float(self.latent[0]), float(self.latent[1])
            out.update({"latent_mean": total / count, "latent_std": 1.0 / scale, "scale_factor": scale})
        return out
