"""Exported checkpoints: one file with the (EMA) weights for sampling and evaluation.

Format (docs/architecture.md), a single ``torch.save`` dict::

    {"format": "ldm_scale/ldm-v1" | "ldm_scale/autoencoder-v1",
     "model_config": LDMSpec / FirstStageConfig as a dict,
     "state_dict": full LatentDiffusion (or autoencoder) state dict,
     "ema_state_dict": EMA weights keyed like state_dict (LDM: the UNet's, unet.*) or None,
     "ema_coverage": {"ema": [...], "raw": [...], "frozen": [...]},
     "scale_factor": float, "step": int, "config": resolved training config, "dtype": "fp32" | "bf16"}

:func:`read_metadata` reads that dict without the weights (the archive's pickle only), so
``config.validate()`` can check ``model.first_stage_ckpt`` before a run starts.

``ema_coverage`` names the model's top-level parts (state-dict prefixes) by where their weights come
from: ``ema``, covered by ``ema_state_dict``; ``raw``, trained but exported with their raw weights
only; ``frozen``, never trained. The LDM export follows CompVis: its ``LitEma`` averages only
``model`` (the ``DiffusionWrapper`` around the UNet), so a jointly trained text or class encoder
(``cond_stage_trainable``) is sampled with its raw weights, e.g. ``{"ema": ["unet"], "raw":
["cond_stage"], "frozen": ["first_stage"]}`` for txt2img_kl8. (The training EMA also averages that
encoder; its average stays in the training checkpoint's ``ema_rank<R>.pt`` shards.)

With ``compvis=True`` the LDM is written in the CompVis layout instead (``state_dict`` with
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and ``model_ema.*``;
mapping in ``ldm_scale.models.compat``), plus ``global_step``, loadable by CompVis' own code, and the
coverage as ``ldm_scale_ema_coverage``.

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
import collections
import dataclasses
import io
import json
import logging
import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ldm_scale import dist, storage
from ldm_scale.train.checkpoint import (
    CLIENT_STATE,
    COMPLETE,
    LATEST,
    CheckpointError,
    parse_step,
)

log = logging.getLogger(__name__)

LDM_FORMAT = "ldm_scale/ldm-v1"
AUTOENCODER_FORMAT = "ldm_scale/autoencoder-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(sd: Optional[Mapping[str, torch.Tensor]], dtype: str) -> Optional[Dict[str, torch.Tensor]]:
    if sd is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    return {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def full_state_dict(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """CPU copy of ``module.state_dict()`` on rank 0, None elsewhere. Collective under ZeRO-3
    (partitioned parameters are gathered); a plain read otherwise."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
            if dist.get_dist_info().is_main else None
    import deepspeed

    # modifier_rank=None: read-only gather on every rank; nothing is written back.
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
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


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def ema_coverage(state_keys: Iterable[str], ema_keys: Iterable[str], trained_parts: Iterable[str]) -> Dict[str, List[str]]:
    """Which top-level parts of the exported model have EMA weights (``ema``), were trained but are
    exported raw only (``raw``), or were never trained (``frozen``). Parts are state-dict prefixes;
    top-level buffers without one (``scale_factor``) belong to no part."""
    parts = sorted({_part(k) for k in state_keys if "." in k})
    ema = sorted({_part(k) for k in ema_keys})
    trained = set(trained_parts)
    return {"ema": ema, "raw": [p for p in parts if p in trained and p not in ema],
            "frozen": [p for p in parts if p not in trained and p not in ema]}


def describe_coverage(coverage: Mapping[str, Sequence[str]]) -> str:
    """One line for the export log, e.g. ``EMA: unet; raw (trained, no EMA): cond_stage; frozen: first_stage``."""
    labels = {"ema": "EMA", "raw": "raw (trained, no EMA)", "frozen": "frozen"}
    return "; ".join(f"{label}: {', '.join(coverage[k]) or '-'}" for k, label in labels.items())


def ldm_trained_parts(ldm: nn.Module) -> List[str]:
    """The parts of a LatentDiffusion that training optimises: the UNet, and the condition encoder
    when it is trained jointly (its ``trainable`` attribute, docs/architecture.md)."""
    return ["unet"] + (["cond_stage"] if getattr(ldm.cond_stage, "trainable", False) else [])


def write_export(url: str, payload: Mapping[str, Any], storage_cfg: Optional[storage.StorageConfig] = None) -> None:
    """torch.save to a local temp file, then one upload (atomic rename locally, one PUT on S3)."""
    fd, tmp = tempfile.mkstemp(suffix=".pt", prefix="ldm_scale_export_")
    os.close(fd)
    try:
        torch.save(dict(payload), tmp)
        storage.put_file(tmp, url, storage_cfg)
    finally:
        os.unlink(tmp)
    coverage = payload.get("ema_coverage") or payload.get("ldm_scale_ema_coverage")
    log.info("exported %s (weights: %s)", storage.redact(url), describe_coverage(coverage))


@dataclasses.dataclass(frozen=True)
class TensorStub:
    """A tensor of an export read by :func:`read_metadata`: its shape and storage type, no data."""

    shape: Tuple[int, ...]
    storage: str  # e.g. "FloatStorage", "BFloat16Storage"


def _stub_tensor(storage_type: str, _offset: int, size: Sequence[int], *_rest: Any) -> TensorStub:
    return TensorStub(tuple(int(s) for s in size), storage_type)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` archive's ``data.pkl`` with every tensor as a :class:`TensorStub`.

    Tensor bytes live in separate archive records that the pickle only names (persistent ids), so
    the dict, its strings and numbers, and each tensor's shape come without reading the weights.
    Only the globals ``torch.save`` writes for plain containers of tensors are allowed (as
    ``weights_only`` loading); anything else is not an export."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _stub_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_rest: data
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or a plain container")

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage type, record key, location, numel): keep the type, skip the record.
        return pid[1]


def read_metadata(url: str, cfg: Optional[storage.StorageConfig] = None) -> Dict[str, Any]:
    """The export dict at ``url`` with its tensors as :class:`TensorStub` (``format``,
    ``model_config``, ``step``, ``config``, and the state dicts' names and shapes).

    Reads the archive's directory and pickle only (kilobytes; a few ranged reads on object
    storage), never the weights, so configuration checks can afford it before training. Raises
    ``ValueError`` if the file is not a ``torch.save`` archive of tensors and plain containers."""
    with storage.open_url(url, "rb", cfg, block_size=1 << 20) as f:
        try:
            archive = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            raise ValueError("not a torch.save archive") from None
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("a zip archive without data.pkl, not written by torch.save")
        try:
            payload = _MetadataUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as exc:
            raise ValueError(f"its pickle is not an export ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"it holds a {type(payload).__name__}, not an export dict")
    return payload


def ldm_payload(state_dict: Mapping[str, torch.Tensor], ema_sd: Optional[Mapping[str, torch.Tensor]],
                model_config: Mapping[str, Any], *, scale_factor: float, step: int, config: Mapping[str, Any],
                dtype: str = "fp32", compvis: bool = False,
                trained_parts: Sequence[str] = ("unet",)) -> Dict[str, Any]:
    """The exported-LDM dict (ldm_scale layout, or CompVis layout with ``compvis``).

    Only the UNet's EMA is exported (as CompVis' LitEma, which averages ``model.diffusion_model``
    alone); a jointly trained condition encoder (in ``trained_parts``) is exported with its raw
    weights and listed as ``raw`` in ``ema_coverage``."""
    if ema_sd is not None:
        ema_sd = {k: v for k, v in ema_sd.items() if k.startswith("unet.")}
    state, ema = _cast(state_dict, dtype), _cast(ema_sd, dtype)
    coverage = ema_coverage(state, ema or {}, trained_parts)
    state["scale_factor"] = torch.tensor(float(scale_factor))  # fp32 in every dtype: bf16 would round it
    if compvis:
        from ldm_scale.models.compat import ldm_to_compvis_state_dict

        return {"state_dict": ldm_to_compvis_state_dict(state, ema), "global_step": int(step),
                "ldm_scale_model_config": dict(model_config), "ldm_scale_ema_coverage": coverage,
                "config": storage.redact_config(dict(config))}
    return {"format": LDM_FORMAT, "model_config": dict(model_config), "state_dict": state, "ema_state_dict": ema,
            "ema_coverage": coverage, "scale_factor": float(scale_factor), "step": int(step),
            "config": storage.redact_config(dict(config)), "dtype": dtype}


def autoencoder_payload(state_dict: Mapping[str, torch.Tensor], ema_sd: Optional[Mapping[str, torch.Tensor]],
                        model_config: Mapping[str, Any], *, step: int, config: Mapping[str, Any],
                        dtype: str = "fp32") -> Dict[str, Any]:
    """The exported-autoencoder dict; every part of the autoencoder is trained (and EMA-tracked when
    the run kept an EMA)."""
    state = _cast(state_dict, dtype)
    coverage = ema_coverage(state, ema_sd or {}, {_part(k) for k in state})
    return {"format": AUTOENCODER_FORMAT, "model_config": dict(model_config), "state_dict": state,
            "ema_state_dict": _cast(ema_sd, dtype), "ema_coverage": coverage, "scale_factor": None,
            "step": int(step), "config": storage.redact_config(dict(config)), "dtype": dtype}


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
    from ldm_scale.models.registry import build_autoencoder
    from ldm_scale.models.unet import UNetModel
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
        from ldm_scale.train.tasks import LDMTask

        spec = plan.spec
        device = torch.device("cpu")
        first_stage = LDMTask._build_first_stage(cfg.model, spec, device, cfg.storage)
        ldm = LatentDiffusion(UNetModel(spec.unet), first_stage, build_conditioner(spec.cond_stage),
                              spec.scale_factor, spec.parameterization)
        # Trained parts come from the checkpoint (keys unet.* / cond_stage.* as in LatentDiffusion);
        # frozen parts were rebuilt above from their own sources, as training did.
        missing, unexpected = ldm.load_state_dict(trained, strict=False)
        trained = ldm_trained_parts(ldm)
        missing = [k for k in missing if _part(k) in trained]
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
