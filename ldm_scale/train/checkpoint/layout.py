"""Where a training checkpoint's files live and which of them survive: names, ownership, retention.

Pure functions and small local-disk helpers, no storage calls and no collectives. Everything that
decides a file's *name* is here, so the names on disk stay the same whoever writes them::

    <root>/<run_id>/latest                      text "step_<N>" (publish.py writes it last)
    <root>/<run_id>/step_<N>/<name>_rank<R>.pt  a per-rank state's file (``rank_file``)
    <root>/<run_id>/step_<N>/<dir>/...          files a directory state writes itself (DeepSpeed's)
    <root>/<run_id>/step_<N>/client_state.json  rank 0's JSON: the loop's numbers + what states describe
    <root>/<run_id>/step_<N>/DONE/rank<R>.json  rank R's uploaded files, then COMPLETE (merged manifest)

A file belongs to the rank its name says (``*_rank<R>.*`` or DeepSpeed's ``*zero_pp_rank_<R>_*``);
every other file is shared and rank 0 writes and uploads it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ldm_scale.formats import TRAIN_CKPT_FORMAT
from ldm_scale.train.lease import LeaseConfig

CKPT_FORMAT = TRAIN_CKPT_FORMAT  # ldm_scale/formats.py
STEP_PREFIX = "step_"
COMPLETE = "COMPLETE"
LATEST = "latest"
CLIENT_STATE = "client_state.json"
DONE = "DONE"
FAILED = "FAILED"
# Files of one rank: DeepSpeed's `*zero_pp_rank_<R>_*` and our `*_rank<R>.pt`; everything else is
# shared and written/uploaded by rank 0 (DeepSpeed's `mp_rank_00_model_states.pt` under ZeRO-1/2).
_OWNER = re.compile(r"(?:zero_pp_rank_|_rank)(\d+)[_.]")
# A per-rank state's name becomes `<name>_rank<R>.pt`: no "rank" inside it, or `file_owner` would
# read the wrong number out of the file name.
_STATE_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


@dataclass
class CheckpointConfig:
    """Training checkpoints (layout in docs/checkpoints.md)."""

    # Local path or URL; checkpoints go to <root>/<run_id>/step_<N>/.
    root: str = "???"
    # Per-node staging directory; None: <system temp>/ldm_scale_ckpt. Keep it on local disk.
    local_dir: Optional[str] = None
    every_steps: int = 1000  # 0: only the final checkpoint
    keep_last: int = 3  # retention: the newest N complete checkpoints ...
    keep_every: Optional[int] = None  # ... plus every step divisible by this, forever
    resume: str = "auto"  # auto (this run id's `latest`, if any) | never | <checkpoint URL>
    async_upload: bool = True  # False: save() returns after the upload and `latest` are durable
    save_final: bool = True
    export_final: bool = True
    keep_local: int = 1  # newest uploaded checkpoints kept in local_dir (a restart skips downloading)
    confirm_timeout_s: float = 1800.0  # rank 0 waits this long for every rank's DONE file
    poll_interval_s: float = 0.5
    max_failed_saves: int = 3  # consecutive failed uploads before training stops with an error
    # One live run per run id: <root>/<run_id>/LEASE (train/lease.py).
    lease: LeaseConfig = dataclasses.field(default_factory=LeaseConfig)


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, incomplete, corrupt, or from another model)."""


def coerce_config(cfg: Any) -> CheckpointConfig:
    """A :class:`CheckpointConfig` from ours, an equivalent dataclass or an OmegaConf node."""
    if isinstance(cfg, CheckpointConfig):
        return cfg
    names = [f.name for f in dataclasses.fields(CheckpointConfig)]
    return CheckpointConfig(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})


# ---------------------------------------------------------------------------------------------
# Names and ownership
# ---------------------------------------------------------------------------------------------
def step_tag(step: int) -> str:
    return f"{STEP_PREFIX}{int(step)}"


def parse_step(name: str) -> Optional[int]:
    """``12`` for ``step_12`` (or a URL ending in it), None otherwise."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith(STEP_PREFIX) and base[len(STEP_PREFIX):].isdigit():
        return int(base[len(STEP_PREFIX):])
    return None


def rank_file(name: str, rank: int) -> str:
    """File name of per-rank state ``name`` of rank ``rank``: ``ema_rank3.pt``."""
    return f"{name}_rank{int(rank)}.pt"


def check_state_name(name: str) -> None:
    if not _STATE_NAME.fullmatch(name) or "rank" in name:
        raise ValueError(f"checkpoint state name {name!r} must be lower-case words joined by '_' without "
                         "'rank' (it becomes the file name <name>_rank<R>.pt)")


def file_owner(relpath: str) -> int:
    """Rank that writes and uploads ``relpath`` inside a step directory."""
    m = _OWNER.search(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def is_shared(relpath: str) -> bool:
    """Whether ``relpath`` belongs to no particular rank (rank 0 writes it, every rank may read it)."""
    return not _OWNER.search(relpath.rsplit("/", 1)[-1])


def local_run_dir(base: Optional[str], run_url_shown: str, run_id: str) -> str:
    """The per-node staging folder of one (root, run id): ``<base>/<run_id>-<hash of the run URL>``.

    Staged files are reused on resume when their size matches the manifest, so a staging folder must
    belong to exactly one (root, run_id): two runs sharing a run id but writing to different roots
    would otherwise load each other's weights. ``run_url_shown`` is the redacted URL (no secrets in
    the hash input, and the same on every rank)."""
    base = base or os.path.join(tempfile.gettempdir(), "ldm_scale_ckpt")
    root_key = hashlib.sha256(run_url_shown.encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(base), f"{run_id}-{root_key}")


# ---------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------
def steps_to_delete(complete: Sequence[int], incomplete: Sequence[int], latest: Optional[int],
                    keep_last: int, keep_every: Optional[int]) -> List[int]:
    """Retention: keep the newest ``keep_last`` complete checkpoints, every multiple of
    ``keep_every``, and whatever ``latest`` points at; delete other complete ones and incomplete
    ones older than ``latest`` (abandoned uploads). Incomplete ones newer than ``latest`` may
    still be uploading and are kept."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = sorted(set(complete))
    keep = set(done[-keep_last:])
    if keep_every:
        keep |= {s for s in done if s % keep_every == 0}
    if latest is not None:
        keep.add(latest)
    stale = [s for s in incomplete if latest is not None and s < latest and s not in keep]
    return sorted([s for s in done if s not in keep] + stale)


def local_steps_to_delete(local_steps: Sequence[int], uploaded: int, keep_local: int) -> List[int]:
    """Local staging copies that may go once ``uploaded`` is on storage: all but the newest
    ``keep_local``, never one newer than ``uploaded`` (its upload may still be running). The caller
    deletes older ones only once they are COMPLETE on storage."""
    steps = sorted(local_steps)
    keep = set(steps[-keep_local:]) if keep_local > 0 else set()
    return [s for s in steps if s not in keep and s <= uploaded]


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------
def torch_load(path: str, what: str) -> Any:
    """``torch.load`` of a checkpoint file on CPU; an unreadable file is a :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure here means an unreadable file
        raise CheckpointError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                              "truncated: resume from an earlier checkpoint with checkpoint.resume=<url of "
                              "step_N>, or start a new run id") from exc


def write_local(path: str, save: Callable[[str], None]) -> None:
    """Write via a temp file + rename so a crash never leaves a truncated file under the real name."""
    tmp = path + ".tmp"
    save(tmp)
    os.replace(tmp, path)


def write_text_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def local_files(step_dir: str) -> Dict[str, int]:
    """``{relative path: size}`` of the finished files under ``step_dir`` (``.tmp`` files excluded)."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name.endswith(".tmp"):
                continue
            full = os.path.join(root, name)
            out[os.path.relpath(full, step_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return out
