"""Run identity and the resolved config on disk: the run id every rank agrees on, and
``config.yaml`` / ``plan.json`` with secrets redacted."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from ldm_scale import dist, storage
from ldm_scale.config.schema import RUN_ID_ENV, Config
from ldm_scale.config.validate import Plan

def resolve_run_id(cfg: Config) -> str:
    """The run id, identical on every rank.

    From the config, else ``$LDM_SCALE_RUN_ID`` (set it in a requeued SLURM job so the run resumes),
    else generated on rank 0 and broadcast (``${now:}`` differs between ranks, hydra #2070).
    """
    run_id = cfg.run_id or os.environ.get(RUN_ID_ENV)
    if not run_id:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{cfg.name}-{stamp}-{secrets.token_hex(3)}"
    # Broadcast even a configured id: ranks that disagree (different env per node) would write apart.
    return dist.broadcast_object(run_id, src=0)


def resolved_dict(cfg: Config) -> Dict[str, Any]:
    """The fully resolved configuration as plain containers, as it is persisted (config.yaml, W&B,
    every checkpoint's client state, exports): credentials are masked by
    :func:`ldm_scale.storage.redact_config`. ``cfg`` itself keeps the real values the run needs; a
    reader of a persisted copy must not connect with its URLs (see ``storage.is_redacted``)."""
    # Enums as their strings: persisted copies stay plain data (weights_only loads, JSON, YAML).
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return storage.redact_config(container)  # type: ignore[return-value]


def write_resolved(cfg: Config, plan: Plan, run_dir: Path) -> Path:
    """Write ``config.yaml`` (resolved, redacted) and ``plan.json`` to the run directory (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_dict(cfg))))
    plan_dict = {
        "global_batch_size": plan.batch.global_batch_size,
        "micro_batch_size": plan.batch.micro_batch_size,
        "gradient_accumulation_steps": plan.batch.gradient_accumulation_steps,
        "world_size": plan.batch.world_size, "image_size": plan.image_size,
        "latent_size": plan.latent_size, "latent_channels": plan.latent_channels, "peak_lr": plan.peak_lr,
        "spec": dataclasses.asdict(plan.spec) if plan.spec is not None else None,
        "autoencoder": dataclasses.asdict(plan.autoencoder) if plan.autoencoder is not None else None,
    }
    (run_dir / "plan.json").write_text(json.dumps(storage.redact_config(plan_dict), indent=2) + "\n")
    return path
