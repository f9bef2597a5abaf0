"""Every file format ldm_scale writes: the format strings, and the readers and payload builders of
the exported checkpoint (``train/export.py`` gathers a live model's weights into them,
``sampling/checkpoints.py`` and ``config.validate`` read them back).

Format strings (the ``format`` field of each file; a reader refuses any other):

- ``LDM_FORMAT`` / ``AUTOENCODER_FORMAT``: exported models (below);
- ``TRAIN_CKPT_FORMAT``: a training checkpoint's ``client_state.json`` (``train/checkpoint/``);
- ``EMA_SHARD_FORMAT``: one rank's EMA shard in a training checkpoint (``train/ema.py``);
- ``REFERENCE_FORMAT``: an evaluation reference-statistics ``.npz`` (``evaluation/reference.py``).

The exported model (docs/architecture.md) is a single ``torch.save`` dict::

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

"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ldm_scale import storage

log = logging.getLogger(__name__)

LDM_FORMAT = "ldm_scale/ldm-v1"
AUTOENCODER_FORMAT = "ldm_scale/autoencoder-v1"
TRAIN_CKPT_FORMAT = "ldm_scale/train-ckpt-v1"
EMA_SHARD_FORMAT = "ldm_scale/ema-shard-v1"
REFERENCE_FORMAT = "ldm_scale/reference-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # export dtypes


def _cast(sd: Optional[Mapping[str, torch.Tensor]], dtype: str) -> Optional[Dict[str, torch.Tensor]]:
    if sd is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    return {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}



def part_of(key: str) -> str:
    """The top-level part a state-dict key belongs to (``unet.x.weight`` -> ``unet``)."""
    return key.split(".", 1)[0]


def ema_coverage(state_keys: Iterable[str], ema_keys: Iterable[str], trained_parts: Iterable[str]) -> Dict[str, List[str]]:
    """Which top-level parts of the exported model have EMA weights (``ema``), were trained but are
    exported raw only (``raw``), or were never trained (``frozen``). Parts are state-dict prefixes;
    top-level buffers without one (``scale_factor``) belong to no part."""
    parts = sorted({part_of(k) for k in state_keys if "." in k})
    ema = sorted({part_of(k) for k in ema_keys})
    trained = set(trained_parts)
    return {"ema": ema, "raw": [p for p in parts if p in trained and p not in ema],
            "frozen": [p for p in parts if p not in trained and p not in ema]}


def describe_coverage(coverage: Mapping[str, Sequence[str]]) -> str:
    """One line for the export log, e.g. ``EMA: unet; raw (trained, no EMA): cond_stage; frozen: first_stage``."""
    labels = {"ema": "EMA", "raw": "raw (trained, no EMA)", "frozen": "frozen"}
    return "; ".join(f"{label}: {', '.join(coverage[k]) or '-'}" for k, label in labels.items())



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


def check_compvis_exportable(model_config: Mapping[str, Any]) -> None:
    """The CompVis layout holds a UNet (``model.diffusion_model.*``): refuse a transformer by name."""
    if model_config.get("backbone", "unet") != "unet":
        raise ValueError(f"--compvis writes CompVis' UNet layout (model.diffusion_model.*), but "
                         f"{model_config.get('name')} has backbone={model_config.get('backbone')}: export it "
                         "in the ldm_scale layout (drop --compvis)")


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

        check_compvis_exportable(model_config)
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
    coverage = ema_coverage(state, ema_sd or {}, {part_of(k) for k in state})
    return {"format": AUTOENCODER_FORMAT, "model_config": dict(model_config), "state_dict": state,
            "ema_state_dict": _cast(ema_sd, dtype), "ema_coverage": coverage, "scale_factor": None,
            "step": int(step), "config": storage.redact_config(dict(config)), "dtype": dtype}
