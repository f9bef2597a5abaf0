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

``run_recon_eval`` is the whole evaluation behind ``python eval/recon.py ckpt=... data=...``.
"""
from __future__ import annotations

import math
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ldm_scale import dist, storage
from ldm_scale.diffusion.latent_scale import latent_moments, scale_factor_from_moments
from ldm_scale.evaluation.config import ExtractorConfig
from ldm_scale.evaluation.fid import StreamingMoments, fid_from_stats, warn_if_undersampled
from ldm_scale.losses.perceptual import PerceptualConfig
from ldm_scale.train.export import AUTOENCODER_FORMAT, LDM_FORMAT

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------
# The evaluation program (eval/recon.py)

@dataclass
class ReconEvalConfig:
    """``python eval/recon.py ckpt=... data=...`` (``key=value`` overrides of these fields)."""

    ckpt: Optional[str] = None  # exported autoencoder (ldm_scale/autoencoder-v1), or a training
    #                             checkpoint (step_<N> or run directory), consolidated on the fly
    data: Optional[str] = None  # shard URLs: a brace pattern, a '::'-separated list or a glob
    resolution: Optional[int] = None  # default: the resolution the autoencoder was trained at
    num_images: Optional[int] = None  # default: every image of the shards, once (partial last batch included)
    batch_size: int = 16  # per rank
    num_workers: int = 1
    use_ema: bool = True  # EMA weights when the export has them
    sample_posterior: bool = False  # KL models: decode a posterior sample instead of its mode
    seed: int = 0
    lpips: PerceptualConfig = field(default_factory=PerceptualConfig)
    rfid: bool = True
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    out: Optional[str] = None  # JSON file (path or URL); default: printed only
    device: Optional[str] = None  # default: this rank's CUDA device, else CPU

    def check(self) -> None:
        if not self.ckpt:
            raise ValueError("ckpt is not set: give the exported autoencoder, e.g. ckpt=s3://bucket/ae/export.pt")
        if not self.data:
            raise ValueError("data is not set: give shard URLs, e.g. data='s3://bucket/val/{00000..00009}.tar'")
        if self.batch_size < 1 or (self.num_images is not None and self.num_images < 1):
            raise ValueError("batch_size and num_images must be >= 1")


def _first_stage_config(model_config: Dict[str, Any]):
    from omegaconf import OmegaConf

    from ldm_scale.models.registry import FirstStageConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FirstStageConfig), model_config))


def _read_export(url: str) -> Dict[str, Any]:
    """The export dict at ``url``; a training checkpoint is consolidated into one first (rank 0).

    Read as ``launch/sample.py`` and ``eval/fid.py`` read theirs (``sampling.read_checkpoint``), so a
    missing or unreadable file is the same one-line ``FileNotFoundError`` / ``ValueError``."""
    from ldm_scale.sampling import read_checkpoint
    from ldm_scale.train.checkpoint import COMPLETE, LATEST

    if storage.exists(storage.join(url, COMPLETE)) or storage.exists(storage.join(url, LATEST)):
        from ldm_scale.train.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="ldm_scale_recon_") as tmp:
            local = os.path.join(tmp, "export.pt")
            export_checkpoint(url, local)
            return read_checkpoint(local)
    return read_checkpoint(url)


def load_autoencoder_export(url: str, *, use_ema: bool = True) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(autoencoder in eval mode, info) from an exported checkpoint; EMA weights when asked and present."""
    from ldm_scale.models.registry import build_autoencoder

    payload = _read_export(url)
    found = payload.get("format")
    if found != AUTOENCODER_FORMAT:
        what = "an LDM export, not an autoencoder" if found == LDM_FORMAT else "not an exported autoencoder"
        raise ValueError(f"ckpt={storage.redact(url)} is {what} (format {found!r}, expected "
                         f"{AUTOENCODER_FORMAT!r}); export an autoencoder run with `python -m ldm_scale.train.export`")
    first_stage = _first_stage_config(payload["model_config"])
    model = build_autoencoder(first_stage)
    ema = payload.get("ema_state_dict")
    weights = "ema" if use_ema and ema else "raw"
    state = dict(payload["state_dict"])
    if weights == "ema":  # the EMA covers parameters; buffers come from the raw weights
        state.update(ema)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    dd = first_stage.kl.ddconfig if first_stage.kind == "kl" else first_stage.vq.ddconfig
    info = {"kind": first_stage.kind, "step": payload.get("step"), "weights": weights,
            "downsample_factor": first_stage.downsample_factor, "latent_channels": first_stage.latent_channels,
            "trained_resolution": int(payload.get("config", {}).get("data", {}).get("resolution", dd.resolution))}
    return model.eval().requires_grad_(False), info


def posterior_noise(image_ids: torch.Tensor, shape: Tuple[int, ...], seed: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps ~ N(0, I) of shape ``[B, *shape]``, image ``i``'s drawn from a generator seeded by
    (seed, ``image_ids[i]``): a posterior sample then depends on the image only, not on the batch
    size, the rank or the worker that read it."""
    rows = []
    for image_id in image_ids.tolist():
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(image_id)]).generate_state(1)[0]))
        rows.append(torch.randn(shape, generator=gen))
    return torch.stack(rows).to(device=device, dtype=dtype)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, kind: str, images: torch.Tensor, *, sample_posterior: bool,
                generator: Optional[torch.Generator] = None,
                eps: Optional[Callable[[Tuple[int, ...]], torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, LDM-seam latent) of ``images`` in [-1, 1]: the KL posterior's mode (or a sample)
    / the VQ code; the latent is what the LDM trains on (KL: a posterior sample, VQ: pre-quantisation).
    The KL sample's noise comes from ``eps(latent shape)`` when given (:func:`posterior_noise`),
    else from ``generator``."""
    if kind == "kl":
        posterior = model.encode(images)
        z = posterior.sample(generator) if eps is None else posterior.mean + posterior.std * eps(posterior.mean.shape)
        return model.decode(z if sample_posterior else posterior.mode()), z
    h = model.encode_prequant(images)
    return model.decode_prequant(h), h


def run_recon_eval(cfg: ReconEvalConfig) -> Optional[Dict[str, Any]]:
    """Reconstruction metrics of an autoencoder over a shard set, split over ranks (collective).
    Returns the JSON record on rank 0 (and writes it to ``cfg.out``), None elsewhere."""
    from ldm_scale.data.config import DataConfig
    from ldm_scale.data.one_pass import OnePassLoader
    from ldm_scale.evaluation.features import extractor_from_config
    from ldm_scale.losses.perceptual import build_lpips

    cfg.check()
    info = dist.init_distributed()
    device = dist.resolve_device(cfg.device, info)
    t_start = time.time()

    model, model_info = load_autoencoder_export(cfg.ckpt, use_ema=cfg.use_ema)
    model.to(device)
    resolution = cfg.resolution or model_info["trained_resolution"]
    lpips_net = build_lpips(cfg.lpips).to(device)
    extractor = extractor_from_config(cfg.extractor, device) if cfg.rfid else None
    metrics = ReconMetrics(lpips_net, (lambda x: extractor(x)["pool"]) if extractor is not None else None,
                           extractor.feature_dims["pool"] if extractor is not None else None)

    # Every image once (the first num_images of a fixed order), centre-cropped, the partial last
    # batch included: N is the set's size (or num_images), not a multiple of the global batch.
    data_cfg = DataConfig(urls=[cfg.data], mode="epoch", input="image", conditioning="none",
                          resolution=resolution, crop="center", flip=False, shuffle_buffer=0,
                          num_workers=cfg.num_workers)
    loader = OnePassLoader(data_cfg, info, batch_size=cfg.batch_size, n_samples=cfg.num_images, seed=cfg.seed)
    for batch in loader:
        x = batch["image"].to(device)

        def eps(shape, ids=batch["index"]):  # per image (its planned index): independent of the split
            return posterior_noise(ids, tuple(shape[1:]), cfg.seed, device)

        recon, z = reconstruct(model, model_info["kind"], x, sample_posterior=cfg.sample_posterior, eps=eps)
        metrics.update(x, recon, z)
    dropped: Dict[str, int] = {}
    for counts in dist.all_gather_object(loader.counts()):
        for key, value in counts.items():
            if key != "samples_read":
                dropped[key] = dropped.get(key, 0) + value
    result = metrics.compute()
    if not info.is_main:
        return None
    record = {
        "metrics": result,
        "checkpoint": {"url": storage.redact(cfg.ckpt), **model_info},
        "data": {"urls": storage.redact(cfg.data), "resolution": resolution, "crop": "center",
                 "images_planned": loader.planned, "dataset_size": loader.dataset_size,
                 "dropped": dict(sorted(dropped.items()))},
        "conventions": {"range": "[0, 1], clipped, float (not quantised)", "psnr": "per-image mean",
                        "ssim": "Wang et al. 2004, gaussian 11x11 sigma 1.5, valid window",
                        "reconstruction": "posterior sample" if cfg.sample_posterior else "posterior mode (KL) / codes (VQ)",
                        "posterior_noise": "per image, seeded by (seed, planned index of the image)",
                        "images": "every image once, partial last batch included",
                        "lpips": dataclasses.asdict(cfg.lpips)},
        "extractor": extractor.describe() if extractor is not None else None,
        "world_size": info.world_size,
        "seconds": round(time.time() - t_start, 2),
    }
    if cfg.lpips.backbone_weights == "random":
        record["notes"] = ["LPIPS trunk randomly initialised: the lpips value is not perceptual"]
    if cfg.out:
        storage.write_text(cfg.out, json.dumps(record, indent=1) + "\n")
    return record


def compose_recon_config(overrides: List[str]) -> ReconEvalConfig:
    """``conf/commands/recon.yaml`` with Hydra ``overrides``; a bad key, type or choice raises ``ValueError``."""
    from ldm_scale.cli import compose_command

    return compose_command("recon", ReconEvalConfig, overrides)
