"""An exported LDM checkpoint as a batch sampler for evaluation: EMA weights, DDIM/PLMS/DDPM, CFG.

Reads the export format of ``docs/architecture.md`` (``format="ldm_scale/ldm-v1"``: ``model_config``
(LDMSpec as a dict), ``state_dict``, ``ema_state_dict`` (UNet EMA weights), ``scale_factor``,
``step``, ``config``). The EMA weights replace the UNet's raw weights unless ``use_ema=false``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch

from ldm_scale import storage

log = logging.getLogger("ldm_scale.eval")

CONDITION_KINDS = {"text": "text", "openclip": "text", "class": "class", "label": "class", "none": "none"}


@dataclass
class ModelSampler:
    """What generation needs from a model: ``sample_batch(x_T, raw_condition, generator) -> images``."""

    sample_batch: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]
    latent_shape: Tuple[int, int, int]
    image_size: int
    condition_kind: str  # text | class | none
    checkpoint_info: Dict[str, Any] = field(default_factory=dict)


def read_checkpoint(url: str) -> Dict[str, Any]:
    data = storage.read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Exports whose resolved config holds non-tensor Python objects need the full unpickler.
        log.warning("%s needs full unpickling (trusted checkpoints only)", storage.redact(url))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_model_sampler(cfg, device: torch.device) -> ModelSampler:
    """Build the sampler of ``cfg.ckpt`` (an ``FIDEvalConfig``) on ``device``."""
    from ldm_scale.diffusion import SamplerConfig, make_schedule
    from ldm_scale.diffusion.guidance import classifier_free
    from ldm_scale.diffusion.samplers import sample
    from ldm_scale.models.registry import build_ldm, spec_from_dict

    if not cfg.ckpt:
        raise ValueError("ckpt= is required: an exported checkpoint (path or URL) written by the training run")
    if storage.exists(storage.join(cfg.ckpt, "client_state.json")):
        raise ValueError(f"{storage.redact(cfg.ckpt)} is a training checkpoint directory; evaluate its export "
                         "(train/export.py writes one at the end of training) instead")
    ckpt = read_checkpoint(cfg.ckpt)
    if ckpt.get("format") != "ldm_scale/ldm-v1":
        raise ValueError(f"{storage.redact(cfg.ckpt)} has format {ckpt.get('format')!r}; eval/fid.py needs an "
                         "exported LDM (format 'ldm_scale/ldm-v1')")
    spec = spec_from_dict(ckpt["model_config"])
    kind = CONDITION_KINDS.get(spec.cond_stage.kind)
    if kind is None:
        raise ValueError(f"cond_stage.kind={spec.cond_stage.kind!r} (inpainting / concat models) has no FID protocol here")
    model = build_ldm(spec, device="meta")
    model.load_state_dict(ckpt["state_dict"], assign=True)
    weights = "raw"
    if cfg.use_ema:
        ema = ckpt.get("ema_state_dict")
        if ema:
            ema = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in ema.items()}
            model.unet.load_state_dict(ema)
            weights = "ema"
        else:
            log.warning("use_ema=true but %s has no EMA weights: sampling with the raw weights",
                        storage.redact(cfg.ckpt))
    if ckpt.get("scale_factor") is not None:
        model.scale_factor.fill_(float(ckpt["scale_factor"]))
    model = model.to(device).eval().requires_grad_(False)

    diffusion = dict((ckpt.get("config") or {}).get("diffusion") or {})
    schedule_kind = diffusion.get("schedule", "scaled_linear")
    schedule = make_schedule(schedule_kind, int(diffusion.get("num_timesteps", spec.num_timesteps)),
                             float(diffusion.get("linear_start", spec.linear_start)),
                             float(diffusion.get("linear_end", spec.linear_end))).to(device)
    sampler_cfg = SamplerConfig(sampler=cfg.sampler, steps=cfg.ddim_steps, eta=cfg.ddim_eta, guidance_scale=cfg.scale)
    sampler_cfg.validate()

    def sample_batch(x_T: torch.Tensor, raw: Any, generator: torch.Generator) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            raw = raw.to(device)
        cond = model.condition(raw)
        uncond = model.condition(model.cond_stage.null_raw(len(x_T))) if cfg.scale != 1.0 else cond
        model_fn = classifier_free(model.apply_model, cond, uncond, cfg.scale)
        z = sample(model_fn, x_T, schedule, sampler_cfg, parameterization=spec.parameterization, generator=generator)
        return model.decode_latents(z).float()

    info = {"format": ckpt.get("format"), "step": ckpt.get("step"), "weights": weights,
            "flavour": spec.name, "schedule": schedule_kind, "scale_factor": float(model.scale_factor),
            "config_hash": config_hash(ckpt.get("config"))}
    return ModelSampler(sample_batch, (spec.unet.in_channels, spec.latent_size, spec.latent_size),
                        spec.image_size, kind, info)
