"""Exported checkpoints from a live run or a training checkpoint: one file with the (EMA) weights
for sampling and evaluation. The file format, its readers and payload builders are
``ldm_scale/formats.py``; this module gathers the weights and writes them in it.

Two ways in:

* from a live run (:func:`export_ldm` / :func:`export_autoencoder`, called by the training loop at
  the end; collective: under ZeRO-3 the parameters and the EMA shards are gathered);
* from a training checkpoint, offline, on one process (:func:`export_checkpoint`, the CLI)::

      python -m ldm_scale.train.export <ckpt url> <out url> [--dtype bf16] [--compvis]

  ``<ckpt url>`` is a ``step_<N>`` directory or a run directory (its ``latest`` is used). The
  trained weights are consolidated from DeepSpeed's shards (any ZeRO stage, any world size), the
  EMA from the per-rank ``ema_rank<R>.pt`` shards, and the frozen parts (first stage, a frozen
  text encoder) are rebuilt from the run's resolved config exactly as training built them. That
  config was saved with its credentials masked: storage access comes from this process's
  environment, and a first-stage URL that was masked is given again with ``--first-stage-ckpt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ldm_scale import dist, storage
from ldm_scale.formats import (  # noqa: F401 - re-exported: the export layer's public names
    AUTOENCODER_FORMAT,
    DTYPES,
    LDM_FORMAT,
    TensorStub,
    check_compvis_exportable,
    autoencoder_payload,
    describe_coverage,
    ema_coverage,
    ldm_payload,
    part_of,
    read_metadata,
    write_export,
)
from ldm_scale.train.checkpoint import (
    CLIENT_STATE,
    COMPLETE,
    LATEST,
    CheckpointError,
    parse_step,
)

log = logging.getLogger(__name__)



def full_state_dict(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """CPU copy of ``module.state_dict()`` on rank 0, None elsewhere. Collective under ZeRO-3
    (partitioned parameters are gathered); a plain read otherwise."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
            if dist.get_dist_info().is_main else None
    from ldm_scale.train.engine import gathered_parameters

    # modifier_rank=None: read-only gather on every rank; nothing is written back.
    with gathered_parameters(partitioned, modifier_rank=None):
        if dist.get_dist_info().is_main:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return None


def ema_in_namespace(ema_sd: Mapping[str, torch.Tensor], ema: Any, module: nn.Module) -> Dict[str, torch.Tensor]:
    """Rename EMA entries (named in the module the EMA tracked) to ``module``'s state-dict names,
    matching parameters by identity, so the EMA of a training wrapper lines up with the exported model."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for tracked_name, param in zip(ema.all_names, ema.tracked_params):
        if id(param) not in names:
            raise ValueError(f"EMA parameter {tracked_name} is not a parameter of the exported {type(module).__name__}")
        out[names[id(param)]] = ema_sd[tracked_name]
    return out


def ldm_trained_parts(ldm: nn.Module) -> List[str]:
    """The parts of a LatentDiffusion that training optimises: the UNet, and the condition encoder
    when it is trained jointly (its ``trainable`` attribute, docs/architecture.md)."""
    return ["unet"] + (["cond_stage"] if getattr(ldm.cond_stage, "trainable", False) else [])


def export_ldm(url: str, ldm: nn.Module, ema: Any, spec: Any, *, config: Mapping[str, Any], step: int,
               dtype: str = "fp32", compvis: bool = False) -> None:
    """Export a live LatentDiffusion (+ its CPU EMA). Every rank calls it; rank 0 writes."""
    state = full_state_dict(ldm)
    ema_sd = ema.full_state_dict(dst=0) if ema is not None else None
    if dist.get_dist_info().is_main:
        ema_named = ema_in_namespace(ema_sd, ema, ldm) if ema is not None else None
        write_export(url, ldm_payload(state, ema_named, dataclasses.asdict(spec), scale_factor=float(ldm.scale_factor),
                                      step=step, config=config, dtype=dtype, compvis=compvis,
                                      trained_parts=ldm_trained_parts(ldm)))
    dist.barrier()


def export_autoencoder(url: str, autoencoder: nn.Module, ema: Any, first_stage_cfg: Any, *,
                       config: Mapping[str, Any], step: int, dtype: str = "fp32") -> None:
    """Export a live autoencoder (+ EMA if any) as ``ldm_scale/autoencoder-v1``. Every rank calls it."""
    state = full_state_dict(autoencoder)
    ema_sd = ema.full_state_dict(dst=0) if ema is not None else None
    if dist.get_dist_info().is_main:
        ema_named = ema_in_namespace(ema_sd, ema, autoencoder) if ema is not None else None
        write_export(url, autoencoder_payload(state, ema_named, dataclasses.asdict(first_stage_cfg), step=step,
                                              config=config, dtype=dtype))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Offline: from a training checkpoint
# ---------------------------------------------------------------------------------------------
def resolve_step_url(url: str, storage_cfg: Optional[storage.StorageConfig] = None) -> str:
    """A ``step_<N>`` URL as given, or the one a run directory's ``latest`` names."""
    url = url.rstrip("/")
    if parse_step(url) is not None:
        return url
    marker = storage.join(url, LATEST)
    if not storage.exists(marker, storage_cfg):
        raise CheckpointError(f"{storage.redact(url)} is neither a step_<N> checkpoint nor a run directory with a "
                              "`latest` marker")
    return storage.join(url, storage.read_text(marker, storage_cfg).strip())


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def export_checkpoint(ckpt_url: str, out_url: str, *, dtype: str = "fp32", compvis: bool = False,
                      first_stage_ckpt: Optional[str] = None,
                      storage_cfg: Optional[storage.StorageConfig] = None) -> Dict[str, Any]:
    """Consolidate a training checkpoint into an exported file (one process, no collectives).

    The checkpoint's config is persisted with its credentials masked (``storage.redact_config``),
    so it describes the model but is never used to connect: all I/O goes through ``storage_cfg``
    (default: this process's, from the environment), and a first stage whose URL was masked (a
    presigned URL, say) must be given again as ``first_stage_ckpt``.

    Returns a summary (format, step, number of tensors, whether an EMA was included, ``ema_coverage``).
    """
    from omegaconf import OmegaConf

    from ldm_scale import config as config_lib
    from ldm_scale.models.ldm import LatentDiffusion
    from ldm_scale.models.registry import build_autoencoder, build_denoiser
    from ldm_scale.train.checkpoint import consolidated_fp32_state_dict
    from ldm_scale.train.ema import assemble_full_state_dict

    io_cfg = storage_cfg or storage.get_config()
    step_url = resolve_step_url(ckpt_url, io_cfg)
    shown = storage.redact(step_url)
    if not storage.exists(storage.join(step_url, COMPLETE), io_cfg):
        raise CheckpointError(f"checkpoint {shown} is incomplete (no {COMPLETE} marker); export an earlier step_<N>")
    meta = json.loads(storage.read_text(storage.join(step_url, CLIENT_STATE), io_cfg))
    manifest = json.loads(storage.read_text(storage.join(step_url, COMPLETE), io_cfg))["files"]
    cfg = config_lib.to_object(OmegaConf.merge(OmegaConf.structured(config_lib.Config), meta["config"]))
    cfg.storage = io_cfg  # the saved slice may be redacted; every read below (validate's too) uses this one
    if first_stage_ckpt is not None:
        cfg.model.first_stage_ckpt = first_stage_ckpt
    elif storage.is_redacted(cfg.model.first_stage_ckpt):
        raise CheckpointError(f"model.first_stage_ckpt={cfg.model.first_stage_ckpt} in checkpoint {shown} held "
                              "credentials and was saved redacted: give the first stage again with "
                              "--first-stage-ckpt <url>")
    plan = config_lib.validate(cfg, int(meta["world_size"]))
    if compvis and plan.spec is not None:
        check_compvis_exportable(dataclasses.asdict(plan.spec))  # before anything is downloaded
    engine = "model" if "model" in meta["engines"] else "generator"
    if engine not in meta["engines"]:
        raise CheckpointError(f"checkpoint {shown} has engines {sorted(meta['engines'])}; expected 'model' (task=ldm) "
                              "or 'generator' (task=autoencoder)")

    with tempfile.TemporaryDirectory(prefix="ldm_scale_export_") as tmp:
        for rel in manifest:
            if rel.startswith((engine + "/", "ema_rank")):
                storage.get_file(storage.join(step_url, rel), os.path.join(tmp, rel), io_cfg)
        trained = consolidated_fp32_state_dict(tmp, engine)
        ema_files = sorted(f for f in os.listdir(tmp) if f.startswith("ema_rank"))
        ema_full = assemble_full_state_dict([torch.load(os.path.join(tmp, f), map_location="cpu", weights_only=False)
                                             for f in ema_files]) if ema_files else None

    step = int(meta["step"])
    config = meta["config"]
    if engine == "model":
        from ldm_scale.models.conditioners import build_conditioner
        from ldm_scale.train.first_stage import build_first_stage

        spec = plan.spec
        device = torch.device("cpu")
        first_stage = build_first_stage(cfg.model, spec, device, cfg.storage)
        ldm = LatentDiffusion(build_denoiser(spec), first_stage, build_conditioner(spec.cond_stage),
                              spec.scale_factor, spec.parameterization)
        # Trained parts come from the checkpoint (keys unet.* / cond_stage.* as in LatentDiffusion);
        # frozen parts were rebuilt above from their own sources, as training did.
        missing, unexpected = ldm.load_state_dict(trained, strict=False)
        trained = ldm_trained_parts(ldm)
        missing = [k for k in missing if part_of(k) in trained]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {shown} does not match the model its config describes (missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]})")
        payload = ldm_payload(ldm.state_dict(), ema_full, dataclasses.asdict(spec),
                              scale_factor=float(meta.get("scale_factor", spec.scale_factor)), step=step,
                              config=config, dtype=dtype, compvis=compvis, trained_parts=trained)
    else:
        if compvis:
            raise ValueError("--compvis applies to LDM checkpoints; autoencoders are exported in the ldm_scale layout")
        autoencoder = build_autoencoder(plan.autoencoder)
        autoencoder.load_state_dict(_strip(trained, "autoencoder."), strict=True)
        payload = autoencoder_payload(autoencoder.state_dict(), ema_full, dataclasses.asdict(plan.autoencoder),
                                      step=step, config=config, dtype=dtype)
    write_export(out_url, payload, io_cfg)
    return {"format": payload.get("format", "compvis"), "step": step, "tensors": len(payload["state_dict"]),
            "ema": ema_full is not None,
            "ema_coverage": payload.get("ema_coverage") or payload.get("ldm_scale_ema_coverage")}


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm_scale.train.export",
                                     description="Consolidate a training checkpoint into one exported file.")
    parser.add_argument("ckpt", help="step_<N> checkpoint URL, or a run directory (its `latest` is used)")
    parser.add_argument("out", help="output file URL (local path, s3://, gs://)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--compvis", action="store_true", help="write the CompVis latent-diffusion layout")
    parser.add_argument("--first-stage-ckpt", default=None,
                        help="first-stage URL, when the run's (a presigned URL, say) was saved redacted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, compvis=args.compvis,
                                first_stage_ckpt=args.first_stage_ckpt)
    print(json.dumps({"out": storage.redact(args.out), **summary}))


if __name__ == "__main__":
    main()
