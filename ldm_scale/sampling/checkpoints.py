"""Load an exported LDM (ldm_scale layout, or CompVis layout with a registered flavour) for
sampling: ``load_checkpoint(url, ...) -> LoadedModel``, through ``ldm_scale.storage`` (so ``s3://``
works), with the EMA or the raw UNet weights, and clear errors for every file that is not one."""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import torch

from ldm_scale import storage
from ldm_scale.diffusion import NoiseSchedule, SamplerConfig, make_schedule
from ldm_scale.formats import AUTOENCODER_FORMAT, LDM_FORMAT
from ldm_scale.train.precision import Precision


@dataclass
class CheckpointSource:
    """Which exported LDM a command samples, and how: the block ``launch/sample.py`` and
    ``eval/fid.py`` share (``ckpt=... use_ema=false precision=bf16``)."""

    ckpt: Optional[str] = None  # required: an exported checkpoint, path or URL (s3://, gs://, https://)
    use_ema: bool = True  # the EMA UNet weights (false: the raw trained weights)
    precision: Precision = "fp32"  # autocast of the networks; the sampler state stays fp32
    flavour: Optional[str] = None  # CompVis-layout .ckpt files only (no stored model config): the flavour
    trust_checkpoint: bool = False  # allow arbitrary pickles (CompVis Lightning .ckpt)
    device: Optional[str] = None  # cpu | cuda | cuda:N; default: this rank's CUDA device, else CPU

    def load(self, device: torch.device) -> "LoadedModel":
        return load_checkpoint(self.ckpt, use_ema=self.use_ema, flavour=self.flavour, device=device,
                               trust=self.trust_checkpoint)


@dataclass
class LoadedModel:
    model: Any  # ldm_scale.models.LatentDiffusion, eval mode
    spec: Any  # ldm_scale.models.registry.LDMSpec
    schedule: NoiseSchedule  # float32 on the model's device
    step: Optional[int]
    used_ema: bool  # the UNet holds the EMA weights (a jointly trained encoder is raw: see ema_coverage)
    # The resolved training config stored in the file (ldm_scale exports, CompVis-layout exports
    # written by ldm_scale), or None (e.g. CompVis' own Lightning checkpoints).
    config: Optional[Dict[str, Any]] = None
    # What the file records about its weights (train/export.py): {"ema": [...], "raw": [...],
    # "frozen": [...]} by top-level part, or None for files written without it.
    ema_coverage: Optional[Dict[str, List[str]]] = None

    @property
    def device(self) -> torch.device:
        return self.model.scale_factor.device

    @property
    def scale_factor(self) -> float:
        return float(self.model.scale_factor)

    @property
    def experiment(self) -> Optional[str]:
        """The training run's experiment name (config ``name``), when the file has a config."""
        return (self.config or {}).get("name")

    @property
    def run_id(self) -> Optional[str]:
        return (self.config or {}).get("run_id")

    def training_sampler(self) -> Optional[SamplerConfig]:
        """The sampler settings the run used for its own sample grids (config ``eval.sampler``), or None."""
        stored = ((self.config or {}).get("eval") or {}).get("sampler")
        if not isinstance(stored, dict):
            return None
        stored = dict(stored)
        if "sampler" in stored:  # exports written before the field was renamed to `name`
            stored.setdefault("name", stored.pop("sampler"))
        known = {f.name for f in fields(SamplerConfig)}
        return SamplerConfig(**{k: v for k, v in stored.items() if k in known})

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: first-stage factor x the UNet's downsampling (or the DiT's
        patch size)."""
        return self.spec.first_stage.downsample_factor * self.spec.denoiser_downsampling


def read_checkpoint(url: str, trust: bool = False) -> Dict[str, Any]:
    """``torch.load`` a checkpoint through the storage seam, with clear errors."""
    shown = storage.redact(url)
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {shown} (ckpt= takes a local path or an s3:// / gs:// / "
                                "https:// URL of an exported checkpoint)")
    if storage.is_local(url):
        ckpt = _torch_load(storage.local_path(url), shown, trust, mmap=True)
    else:
        # One download, then a local load: torch.load seeks record by record, which over a ranged
        # object-store stream would be one request per tensor.
        with tempfile.TemporaryDirectory(prefix="ldm_scale_ckpt_") as tmp:
            path = os.path.join(tmp, "checkpoint.pt")
            storage.get_file(url, path)
            ckpt = _torch_load(path, shown, trust, mmap=False)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{shown} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _torch_load(path: str, shown: str, trust: bool, mmap: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (legacy format: a raw pickle, protocol byte 0x80 first).
    is_zip = head.startswith(b"PK\x03\x04")
    if not (is_zip or head[:1] == b"\x80"):
        raise ValueError(f"{shown} is not a readable torch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        # mmap (zip only): tensors are paged in from the file instead of read into memory first.
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        if trust:
            raise ValueError(f"{shown} is not a readable torch checkpoint: {exc}") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{shown} holds objects beyond tensors and plain containers (typical of Lightning "
                         f"checkpoints: {reason}); if you trust its origin, pass trust_checkpoint=true") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{shown} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems))


def _schedule_kind(ckpt: Dict[str, Any]) -> str:
    """The forward-process schedule kind recorded in the training config (LDMSpec stores only its
    numbers); checkpoints without one used the LDM default."""
    config = ckpt.get("config") or {}
    diffusion = config.get("diffusion") if isinstance(config, dict) else None
    return (diffusion or {}).get("schedule", "scaled_linear")


def load_checkpoint(url: str, *, use_ema: bool = True, flavour: Optional[str] = None,
                    device: torch.device | str = "cpu", trust: bool = False) -> LoadedModel:
    """Build the LatentDiffusion an exported checkpoint describes and load its (EMA) weights.

    Exported checkpoints (``format`` = ``ldm_scale/ldm-v1``, docs/architecture.md) carry their
    model config. CompVis-layout checkpoints (``state_dict`` with ``model.diffusion_model.*`` keys)
    need ``flavour`` and are mapped by ``ldm_scale.models.compat``.
    """
    from ldm_scale.models.registry import build_ldm, get_spec, spec_from_dict

    ckpt = read_checkpoint(url, trust)
    shown = storage.redact(url)
    fmt = ckpt.get("format")
    if fmt == AUTOENCODER_FORMAT:
        raise ValueError(f"{shown} is an autoencoder export; sampling needs an LDM export ({LDM_FORMAT})")
    if fmt == LDM_FORMAT:
        spec = spec_from_dict(ckpt["model_config"])
        if flavour is not None and flavour != spec.name:
            raise ValueError(f"flavour={flavour} given but {shown} holds a {spec.name!r} model: drop flavour=")
        ema = ckpt.get("ema_state_dict")
        if use_ema and not ema:
            raise ValueError(f"{shown} has no EMA weights: pass use_ema=false to sample with the raw weights")
        model = build_ldm(spec)
        _load_strict(model, ckpt["state_dict"], f"state_dict of {shown}")
        if use_ema:
            _load_strict(model.unet, _strip_prefix(ema, "unet."), f"ema_state_dict of {shown}")
        if ckpt.get("scale_factor") is not None:
            model.scale_factor.fill_(float(ckpt["scale_factor"]))
        step = ckpt.get("step")
    elif fmt is None and isinstance(ckpt.get("state_dict"), dict):
        # CompVis layout: no model config inside, so the flavour names the architecture.
        if flavour is None:
            raise ValueError(f"{shown} has no model config (CompVis layout?): pass flavour=<name> "
                             "naming the registered flavour it was trained as")
        from ldm_scale.models import compat

        state = ckpt["state_dict"]
        if use_ema and not any(k.startswith(compat.EMA_PREFIX) for k in state):
            raise ValueError(f"{shown} has no EMA weights (no {compat.EMA_PREFIX}* keys): pass use_ema=false")
        spec = get_spec(flavour)
        model = build_ldm(spec)
        compat.load_compvis_checkpoint(model, state, use_ema=use_ema, strict=True)
        step = ckpt.get("global_step")
    else:
        raise ValueError(f"{shown}: unknown checkpoint format {fmt!r}; expected {LDM_FORMAT} "
                         "(ldm_scale export) or a CompVis checkpoint with flavour=")
    model.to(device).eval().requires_grad_(False)
    schedule = make_schedule(_schedule_kind(ckpt), spec.num_timesteps, spec.linear_start, spec.linear_end)
    config = ckpt.get("config")
    coverage = ckpt.get("ema_coverage", ckpt.get("ldm_scale_ema_coverage"))
    return LoadedModel(model, spec, schedule.to(device), step, use_ema,
                       config=dict(config) if isinstance(config, dict) else None, ema_coverage=coverage)
