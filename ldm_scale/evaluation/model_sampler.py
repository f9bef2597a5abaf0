"""An exported LDM checkpoint as a batch sampler for evaluation: EMA weights, DDIM/PLMS/DDPM, CFG.

Loading (export format, EMA weights, CompVis layout, errors) is ``ldm_scale.sampling.load_checkpoint``.
Sampling is ``ldm_scale.sampling.generate`` with the initial noise ``x_T`` passed in, so that sample
``i`` starts from noise seeded by (seed, i) whatever batch or rank it lands in (``generate.py``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Tuple

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


def load_model_sampler(cfg, device: torch.device) -> ModelSampler:
    """Build the sampler of ``cfg.ckpt`` (an ``FIDEvalConfig``) on ``device``."""
    return sampler_of_loaded(load_export(cfg, device), cfg, device)


def load_export(cfg, device: torch.device):
    """``cfg.ckpt`` loaded (``sampling.LoadedModel``), after refusing what is not an export."""
    if not cfg.ckpt:
        raise ValueError("ckpt= is required: an exported checkpoint (path or URL) written by the training run")
    if storage.exists(storage.join(cfg.ckpt, "client_state.json")):
        raise ValueError(f"{storage.redact(cfg.ckpt)} is a training checkpoint directory; export it first "
                         "(ldm_scale/train/export.py) and evaluate the export")
    # One read of the file (a remote one is downloaded once): weights, training config, EMA coverage.
    return cfg.load(device)


def sampler_of_loaded(loaded, cfg, device: torch.device) -> ModelSampler:
    """The sampler of an already loaded model with ``cfg.sampler`` / ``cfg.precision`` (a guidance
    sweep loads the checkpoint once and samples it with several settings)."""
    from ldm_scale.sampling import condition_kind, generate
    from ldm_scale.sampling.generate import check_size

    spec = loaded.spec
    kind = condition_kind(spec)
    if kind not in ("text", "class", "none"):
        raise ValueError(f"{spec.name} is a {kind!r}-conditioned model (inpainting): there is no FID protocol for it here")
    sampler_cfg = cfg.sampler
    sampler_cfg.validate()
    sampler_cfg.check_model(spec.parameterization)  # a flow model takes euler/heun: say so before sampling

    height, width = cfg.H or spec.image_size, cfg.W or spec.image_size
    check_size(loaded, height, width)  # before any sample: a size the denoiser cannot take

    def sample_batch(x_T: torch.Tensor, raw: Any, generator) -> torch.Tensor:  # PerSampleGenerators
        if isinstance(raw, torch.Tensor):
            raw = raw.to(device)
        return generate(loaded, raw, len(x_T), sampler_cfg, height=height, width=width,
                        generator=generator, precision=cfg.precision, x_T=x_T)

    training_sampler = loaded.training_sampler()
    # The training config's hash identifies the run the weights came from (recorded with every result).
    info = {"step": loaded.step, "weights": "ema" if loaded.used_ema else "raw", "flavour": spec.name,
            "scale_factor": loaded.scale_factor, "config_hash": config_hash(loaded.config),
            "experiment": loaded.experiment, "run_id": loaded.run_id,
            "ema_coverage": loaded.ema_coverage if loaded.used_ema else None,
            "training_sampler": asdict(training_sampler) if training_sampler is not None else None,
            "precision": cfg.precision}
    if (height, width) != (spec.image_size, spec.image_size):
        info["size"] = [height, width]  # recorded only when it is not the training size
    f = spec.first_stage.downsample_factor
    latent = (spec.first_stage.latent_channels, height // f, width // f)
    return ModelSampler(sample_batch, latent, spec.image_size, kind, info)
