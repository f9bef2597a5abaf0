"""The frozen first stage of an LDM: loaded from an exported autoencoder, or (tests and benchmarks)
randomly initialised. Used by the training task and by the offline export, which rebuilds the
frozen parts exactly as training built them."""
from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ldm_scale import storage
from ldm_scale.formats import AUTOENCODER_FORMAT
from ldm_scale.models.registry import FirstStageConfig, LDMSpec, build_autoencoder

if TYPE_CHECKING:
    from ldm_scale.config import ModelConfig

log = logging.getLogger(__name__)


def load_first_stage(url: str, first_stage: FirstStageConfig, device: torch.device,
                     storage_cfg: Optional[storage.StorageConfig] = None) -> nn.Module:
    """Build the first stage from ``first_stage`` and load an exported autoencoder checkpoint.

    The checkpoint must be ``ldm_scale/autoencoder-v1`` (``train/export.py``) for the same
    architecture: a mismatch names the differing field instead of failing inside load_state_dict.
    """
    payload = torch.load(io.BytesIO(storage.read_bytes(url, storage_cfg)), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != AUTOENCODER_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"model.first_stage_ckpt={storage.redact(url)} is not an exported autoencoder "
                         f"(format {found!r}, expected {AUTOENCODER_FORMAT!r}); export one with "
                         "experiment=autoencoder_* or train/export.py")
    module = build_autoencoder(first_stage)
    state = payload["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.first_stage_ckpt={storage.redact(url)} does not match the first stage of this "
                         f"model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}): train or "
                         "export the autoencoder named by the LDM flavour")
    return module.to(device).eval().requires_grad_(False)


def build_first_stage(model: ModelConfig, spec: LDMSpec, device: torch.device,
                      storage_cfg: storage.StorageConfig) -> nn.Module:
    """The frozen first stage ``model`` names: ``model.first_stage_ckpt`` loaded, or random weights
    (``model.allow_random_first_stage``, which validate() requires for that case)."""
    if model.first_stage_ckpt:
        return load_first_stage(model.first_stage_ckpt, spec.first_stage, device, storage_cfg)
    log.warning("model.allow_random_first_stage=true: the first stage is RANDOMLY initialised "
                "(fine for tests and benchmarks, useless for real training)")
    torch.manual_seed(0)
    return build_autoencoder(spec.first_stage).to(device).eval().requires_grad_(False)
