"""An exported LDM checkpoint as a batch sampler for evaluation: EMA weights, DDIM/PLMS/DDPM, CFG.

Loading (export format, EMA weights, CompVis layout, errors) is ``ldm_scale.sampling.load_checkpoint``.
Sampling is ``ldm_scale.sampling.generate`` with the initial noise ``x_T`` passed in, so that sample
``i`` starts from noise seeded by (seed, i) whatever batch or rank it lands in (``generate.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Tuple

import torch

from ldm_scale import storage


@dataclass
class ModelSampler:
    """What generation needs from a model: ``sample_batch(x_T, raw_condition, generator) -> images``."""

    sample_batch: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]
    latent_shape: Tuple[int, int, int]
    image_size: int
    condition_kind: str  # text | class | none
    checkpoint_info: Dict[str, Any] = field(default_factory=dict)


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _local_copy(url: str) -> Iterator[str]:
    """A local path of ``url``: itself when local, else a temporary download (fetched once)."""
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="ldm_scale_ckpt_") as tmp:
        path = os.path.join(tmp, os.path.basename(url.rstrip("/")) or "checkpoint.pt")
        storage.get_file(url, path)
        yield path


def load_model_sampler(cfg, device: torch.device) -> ModelSampler:
    """Build the sampler of ``cfg.ckpt`` (an ``FIDEvalConfig``) on ``device``."""
    from ldm_scale.diffusion import SamplerConfig
    from ldm_scale.sampling import PRECISIONS, condition_kind, generate, load_checkpoint

    if not cfg.ckpt:
        raise ValueError("ckpt= is required: an exported checkpoint (path or URL) written by the training run")
    if storage.exists(storage.join(cfg.ckpt, "client_state.json")):
        raise ValueError(f"{storage.redact(cfg.ckpt)} is a training checkpoint directory; export it first "
                         "(ldm_scale/train/export.py) and evaluate the export")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {sorted(PRECISIONS)}")
    with _local_copy(cfg.ckpt) as path:
        loaded = load_checkpoint(path, use_ema=cfg.use_ema, flavour=cfg.flavour, device=device,
                                 trust=cfg.trust_checkpoint)
        # The training config's hash identifies the run the weights came from (recorded with every
        # result); mmap reads only the pickled metadata, not the weights a second time.
        ckpt_config = torch.load(path, map_location="cpu", mmap=True, weights_only=not cfg.trust_checkpoint).get("config")
    model, spec = loaded.model, loaded.spec
    kind = condition_kind(spec)
    if kind not in ("text", "class", "none"):
        raise ValueError(f"{spec.name} is a {kind!r}-conditioned model (inpainting): there is no FID protocol for it here")
    sampler_cfg = SamplerConfig(sampler=cfg.sampler, steps=cfg.ddim_steps, eta=cfg.ddim_eta, guidance_scale=cfg.scale)
    sampler_cfg.validate()

    def sample_batch(x_T: torch.Tensor, raw: Any, generator: torch.Generator) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            raw = raw.to(device)
        return generate(loaded, raw, len(x_T), sampler_cfg, height=spec.image_size, width=spec.image_size,
                        generator=generator, precision=cfg.precision, x_T=x_T)

    info = {"step": loaded.step, "weights": "ema" if loaded.used_ema else "raw", "flavour": spec.name,
            "scale_factor": float(model.scale_factor), "config_hash": config_hash(ckpt_config),
            "precision": cfg.precision}
    latent = (spec.first_stage.latent_channels, spec.latent_size, spec.latent_size)
    return ModelSampler(sample_batch, latent, spec.image_size, kind, info)
