"""Training checkpoints: save locally on every rank, upload in the background, mark `latest` last.

Layout on storage (any URL ``ldm_scale.storage`` understands: local path, ``s3://``, ``gs://``)::

    <root>/<run_id>/
        latest                       text "step_<N>": written only after every rank's upload is confirmed
        step_<N>/
            <engine name>/...        DeepSpeed's files of each engine (``engine.save_checkpoint``)
            ema_rank<R>.pt           this rank's CPU-EMA shard (``train/ema.py``)
            loader_rank<R>.pt        data-loader position (``ShardLoader.state_dict``)
            rng_rank<R>.pt           python / numpy / torch / cuda RNG states (+ named generators)
            client_state.json        step, samples seen, W&B run id, resolved config, task numbers,
                                     plus what resuming checks: world size, ZeRO stages, parameter shapes
            DONE/rank<R>.json        rank R's uploaded files and sizes
            COMPLETE                 merged manifest, written by rank 0 once all DONE files exist

Saving (``save``, every rank, main thread): DeepSpeed's ``save_checkpoint`` (a collective, local
directories only) and our per-rank files go to ``<local_dir>/<run_id>-<hash of the run URL>/step_<N>/``; then a single
upload thread per rank puts the files this rank *owns* (its ``*rank<R>*`` files; rank 0 also the
shared ones) to storage and writes ``DONE/rank<R>.json``. Rank 0's upload thread then polls for every
rank's DONE file, writes ``COMPLETE``, then ``latest``, then prunes old checkpoints. The upload threads
issue no collectives (they would race with the training loop's on the same process group); the
only cross-rank confirmation is through storage. Failures are agreed on with one all-reduce at the
next ``save``/``wait`` on the main thread, so every rank takes the same decision.

Resuming (``resume``): rank 0 resolves ``latest`` (or an explicit URL), validates ``COMPLETE`` and
``client_state.json`` against this run (engines, parameter shapes), and every rank raises the same
clear error if anything is wrong, before anything is loaded or written. One process per node
downloads what the node needs (skipping files already present with the right size), then every
rank loads its engines, EMA shard, loader position and RNG states. On a different world size the
DeepSpeed files are converted with ``deepspeed.checkpoint.ds_to_universal`` and loaded as a universal
checkpoint, the EMA shards are reassembled and re-split, and the loader re-splits the rest of its
epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ldm_scale import dist, storage
from ldm_scale.formats import TRAIN_CKPT_FORMAT
from ldm_scale.train.ema import CpuEma, assemble_full_state_dict
from ldm_scale.train.lease import LeaseConfig

log = logging.getLogger(__name__)

CKPT_FORMAT = TRAIN_CKPT_FORMAT  # ldm_scale/formats.py
STEP_PREFIX = "step_"
COMPLETE = "COMPLETE"
LATEST = "latest"
CLIENT_STATE = "client_state.json"
UPLOAD_NICENESS = 10
# Files of one rank: DeepSpeed's `*zero_pp_rank_<R>_*` and our `*_rank<R>.pt`; everything else is
# shared and written/uploaded by rank 0 (DeepSpeed's `mp_rank_00_model_states.pt` under ZeRO-1/2).
_OWNER = re.compile(r"(?:zero_pp_rank_|_rank)(\d+)[_.]")


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
# Pure helpers (unit tested)
# ---------------------------------------------------------------------------------------------
def step_tag(step: int) -> str:
    return f"{STEP_PREFIX}{int(step)}"


def parse_step(name: str) -> Optional[int]:
    """``12`` for ``step_12`` (or a URL ending in it), None otherwise."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith(STEP_PREFIX) and base[len(STEP_PREFIX):].isdigit():
        return int(base[len(STEP_PREFIX):])
    return None


def file_owner(relpath: str) -> int:
    """Rank that writes and uploads ``relpath`` inside a step directory."""
    m = _OWNER.search(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


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


def param_shapes(module: nn.Module) -> Dict[str, List[int]]:
    """Parameter name -> full shape (ZeRO-3 keeps the real shape in ``ds_shape``)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def describe_shape_mismatch(saved: Mapping[str, Sequence[int]], mine: Mapping[str, Sequence[int]]) -> Optional[str]:
    """A one-line description of how two parameter-shape maps differ, or None when equal."""
    missing = [n for n in saved if n not in mine]
    extra = [n for n in mine if n not in saved]
    changed = [n for n in saved if n in mine and list(saved[n]) != list(mine[n])]
    if not (missing or extra or changed):
        return None
    parts = []
    if changed:
        n = changed[0]
        parts.append(f"{len(changed)} shapes differ (first: {n} is {list(saved[n])} in the checkpoint, "
                     f"{list(mine[n])} here)")
    if missing:
        parts.append(f"{len(missing)} checkpoint parameters missing here (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} parameters not in the checkpoint (first: {extra[0]})")
    return "; ".join(parts)


def rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def set_rng_state(state: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name])


def _torch_load(path: str, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure here means an unreadable file
        raise CheckpointError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                              "truncated: resume from an earlier checkpoint with checkpoint.resume=<url of "
                              "step_N>, or start a new run id") from exc


def _write_local(path: str, save: Any) -> None:
    """Write via a temp file + rename so a crash never leaves a truncated file under the real name."""
    tmp = path + ".tmp"
    save(tmp)
    os.replace(tmp, path)


def _write_text_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _local_files(step_dir: str) -> Dict[str, int]:
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name.endswith(".tmp"):
                continue
            full = os.path.join(root, name)
            out[os.path.relpath(full, step_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return out


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves, uploads, confirms, prunes and resumes training checkpoints of one run.

    Args:
        cfg: :class:`CheckpointConfig` (or an object with the same fields).
        run_id: identical on every rank; checkpoints go to ``<cfg.root>/<run_id>/``.
        storage_cfg: ``ldm_scale.storage.StorageConfig`` for every storage call (None: the
            process default set by ``storage.configure``).
        dist_info: topology (default: from the environment).
    """

    def __init__(self, cfg: Any, *, run_id: str, storage_cfg: Optional[storage.StorageConfig] = None,
                 dist_info: Optional[dist.DistInfo] = None):
        self.cfg = coerce_config(cfg)
        if not self.cfg.root or self.cfg.root == "???":
            raise ValueError("checkpoint.root is not set: give a local directory or an object-store URL "
                             "(e.g. checkpoint.root=s3://bucket/checkpoints)")
        if not run_id or "/" in run_id:
            raise ValueError(f"run_id must be a non-empty name without '/', got {run_id!r}")
        self.run_id = run_id
        self.storage_cfg = storage_cfg
        self.info = dist_info or dist.get_dist_info()
        self.run_url = storage.join(self.cfg.root, run_id)
        base = self.cfg.local_dir or os.path.join(tempfile.gettempdir(), "ldm_scale_ckpt")
        # Staged files are reused on resume when their size matches the manifest, so a staging folder
        # must belong to exactly one (root, run_id): two runs sharing a run id but writing to
        # different roots would otherwise load each other's weights.
        root_key = hashlib.sha256(storage.redact(self.run_url).encode()).hexdigest()[:12]
        self.local_run_dir = os.path.join(os.path.abspath(base), f"{run_id}-{root_key}")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload",
                                            initializer=_lower_thread_priority)
        self._pending: Optional[Future] = None
        self._pending_step: Optional[int] = None
        self._last_failed = False  # this rank's view of the last finished upload job
        self._consecutive_failures = 0  # agreed across ranks
        self._node_group: Optional[Tuple[int, List[int]]] = None  # (leader rank, ranks on this node)
        self._lock = threading.Lock()
        self.last_saved_step: Optional[int] = None

    # -- small helpers ------------------------------------------------------------------------
    def step_url(self, step: int) -> str:
        return storage.join(self.run_url, step_tag(step))

    def local_step_dir(self, step: int) -> str:
        return os.path.join(self.local_run_dir, step_tag(step))

    @property
    def upload_pending(self) -> bool:
        """Whether this rank's last checkpoint is still uploading (or confirming, on rank 0)."""
        return self._pending is not None and not self._pending.done()

    def due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def _device(self) -> torch.device:
        return dist.default_device(self.info)

    def _agree_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (main thread only)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce_sum(t)
        return bool(t.item() > 0)

    def _node(self) -> Tuple[int, List[int]]:
        """(leader rank, ranks) of the processes sharing this node's local_dir (collective, cached)."""
        if self._node_group is None:
            key = (socket.gethostname(), os.path.realpath(os.path.dirname(self.local_run_dir) or "."))
            keys = dist.all_gather_object(key)
            ranks = [r for r, k in enumerate(keys) if k == key]
            self._node_group = (min(ranks), ranks)
        return self._node_group

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, *, engines: Mapping[str, Any], ema: Optional[CpuEma] = None,
             loader: Any = None, client_state: Mapping[str, Any],
             generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
        """Checkpoint ``step`` (every rank, main thread). Returns once the local files are written;
        the upload continues in the background (``cfg.async_upload``)."""
        self._finish_previous_upload()
        step = int(step)
        for name, engine in engines.items():
            _refuse_decoupled_engine(name, engine)
        leader, _ = self._node()
        local = self.local_step_dir(step)
        # A directory left by a crash at this step (possibly another world size) must not leak
        # stale files into the new checkpoint.
        if self.info.rank == leader and os.path.exists(local):
            shutil.rmtree(local, ignore_errors=True)
        dist.barrier()

        if ema is not None:
            ema.wait()
        loader_state = loader.state_dict() if loader is not None else None  # collective
        for name, engine in engines.items():
            engine.save_checkpoint(local, tag=name, client_state={"ldm_scale_step": step})
        rank = self.info.rank
        if ema is not None:
            ema_state = ema.state_dict()
            _write_local(os.path.join(local, f"ema_rank{rank}.pt"), lambda p: torch.save(ema_state, p))
        if loader_state is not None:
            _write_local(os.path.join(local, f"loader_rank{rank}.pt"), lambda p: torch.save(loader_state, p))
        rng = rng_state(generators)
        _write_local(os.path.join(local, f"rng_rank{rank}.pt"), lambda p: torch.save(rng, p))
        if rank == 0:
            meta = self._client_state(step, engines, ema, loader, client_state)
            text = json.dumps(meta, indent=1, sort_keys=True, default=str)
            _write_local(os.path.join(local, CLIENT_STATE), lambda p: _write_text_file(p, text))
        mine = {rel: size for rel, size in _local_files(local).items() if file_owner(rel) == rank}
        self.last_saved_step = step
        self._pending_step = step
        self._pending = self._executor.submit(self._upload_job, step, mine)
        if not self.cfg.async_upload:
            self.wait()

    def _client_state(self, step: int, engines: Mapping[str, Any], ema: Optional[CpuEma], loader: Any,
                      client_state: Mapping[str, Any]) -> Dict[str, Any]:
        meta = dict(client_state)
        meta.update({
            "format": CKPT_FORMAT,
            "step": step,
            "run_id": self.run_id,
            "world_size": self.info.world_size,
            "engines": {name: {"zero_stage": int(engine.zero_optimization_stage()),
                               "param_shapes": param_shapes(engine.module)}
                        for name, engine in engines.items()},
            "has_ema": ema is not None,
            "ema_names": list(ema.all_names) if ema is not None else None,
            "has_loader": loader is not None,
            "saved_at": time.time(),
        })
        return meta

    def _upload_job(self, step: int, files: Mapping[str, int]) -> bool:
        """Background thread: upload this rank's files, write DONE; rank 0 then confirms all
        ranks, writes COMPLETE and `latest`, and prunes. No collectives in here."""
        local, remote = self.local_step_dir(step), self.step_url(step)
        cfg = self.storage_cfg
        try:
            t0 = time.monotonic()
            for rel in sorted(files):
                storage.put_file(os.path.join(local, rel), storage.join(remote, rel), cfg)
            storage.write_text(storage.join(remote, "DONE", f"rank{self.info.rank}.json"),
                               json.dumps({"files": dict(files)}), cfg)
            log.info("checkpoint %s: rank %d uploaded %d files (%.1f MB) in %.1fs", step_tag(step), self.info.rank,
                     len(files), sum(files.values()) / 1e6, time.monotonic() - t0)
            if self.info.rank == 0:
                self._confirm_and_publish(step)
            self._prune_local(step)
            return True
        except Exception as exc:  # reported on the main thread, training may go on
            log.error("checkpoint %s: upload from rank %d failed: %s", step_tag(step), self.info.rank,
                      storage.redact(exc))
            try:
                storage.write_text(storage.join(remote, "FAILED", f"rank{self.info.rank}"),
                                   storage.redact(exc), cfg)
            except Exception as marker_exc:  # storage is down; rank 0 then times out instead
                log.debug("could not write the FAILED marker: %s", storage.redact(marker_exc))
            return False

    def _confirm_and_publish(self, step: int) -> None:
        remote, cfg = self.step_url(step), self.storage_cfg
        world = self.info.world_size
        deadline = time.monotonic() + self.cfg.confirm_timeout_s
        while True:
            names = {u.rsplit("/", 1)[-1] for u in _listdir_or_empty(storage.join(remote, "DONE"), cfg)}
            if all(f"rank{r}.json" in names for r in range(world)):
                break
            failed = _listdir_or_empty(storage.join(remote, "FAILED"), cfg)
            if failed:
                raise RuntimeError(f"ranks {[u.rsplit('/', 1)[-1] for u in failed]} failed to upload")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(names)}/{world} ranks confirmed their upload within "
                                   f"checkpoint.confirm_timeout_s={self.cfg.confirm_timeout_s}")
            time.sleep(self.cfg.poll_interval_s)
        manifest: Dict[str, int] = {}
        for r in range(world):
            manifest.update(json.loads(storage.read_text(storage.join(remote, "DONE", f"rank{r}.json"), cfg))["files"])
        # Trust the store, not the DONE files alone: an object lost in an outage must not be published.
        present = {u[len(remote.rstrip("/")) + 1:] for u in storage.glob(storage.join(remote, "**"), cfg)}
        lost = sorted(set(manifest) - present)
        if lost:
            raise RuntimeError(f"{len(lost)} uploaded files are missing from storage (first: {lost[0]})")
        storage.write_text(storage.join(remote, COMPLETE),
                           json.dumps({"step": step, "world_size": world, "files": manifest}, sort_keys=True), cfg)
        # `latest` last: a reader that sees it always finds a COMPLETE checkpoint.
        storage.write_text(storage.join(self.run_url, LATEST), step_tag(step), cfg)
        log.info("checkpoint %s complete: %s", step_tag(step), storage.redact(remote))
        self.prune(step)

    def prune(self, latest: int) -> List[int]:
        """Apply the retention policy to this run's checkpoints on storage; returns deleted steps."""
        cfg = self.storage_cfg
        complete, incomplete = [], []
        for url in _listdir_or_empty(self.run_url, cfg):
            step = parse_step(url)
            if step is None:
                continue
            (complete if storage.exists(storage.join(url, COMPLETE), cfg) else incomplete).append(step)
        doomed = steps_to_delete(complete, incomplete, latest, self.cfg.keep_last, self.cfg.keep_every)
        for step in doomed:
            log.info("pruning checkpoint %s", step_tag(step))
            storage.rm(self.step_url(step), recursive=True, cfg=cfg)
        return doomed

    def _prune_local(self, uploaded: int) -> None:
        """Node leader: drop local copies beyond the newest ``keep_local`` that are safely uploaded."""
        leader, _ = self._node_group or (0, [0])
        if self.info.rank != leader or not os.path.isdir(self.local_run_dir):
            return
        steps = sorted(s for s in (parse_step(n) for n in os.listdir(self.local_run_dir)) if s is not None)
        keep = set(steps[-max(self.cfg.keep_local, 0):]) if self.cfg.keep_local > 0 else set()
        for step in steps:
            if step in keep or step > uploaded:
                continue
            if step == uploaded or storage.exists(storage.join(self.step_url(step), COMPLETE), self.storage_cfg):
                shutil.rmtree(self.local_step_dir(step), ignore_errors=True)

    def _finish_previous_upload(self) -> None:
        """Wait for this rank's previous upload and agree with all ranks whether it failed."""
        if self._pending is None:
            return
        ok = self._pending.result()
        step = self._pending_step
        self._pending, self._pending_step = None, None
        if self._agree_any(not ok):
            self._consecutive_failures += 1
            msg = (f"checkpoint {step_tag(step)} was not uploaded (see the errors above); `latest` still points "
                   f"at the previous complete checkpoint ({self._consecutive_failures} failed in a row)")
            if self._consecutive_failures >= self.cfg.max_failed_saves:
                raise RuntimeError(msg + f"; stopping after checkpoint.max_failed_saves="
                                   f"{self.cfg.max_failed_saves}. Check the storage endpoint and credentials")
            log.error(msg)
        else:
            self._consecutive_failures = 0

    def wait(self) -> None:
        """Block until this checkpoint's upload, COMPLETE and `latest` are durable (every rank,
        main thread). Raises if the upload failed on any rank."""
        step = self._pending_step
        failures = self._consecutive_failures
        self._finish_previous_upload()
        dist.barrier()  # rank 0's job (COMPLETE, latest) is part of its pending upload
        if self._consecutive_failures > failures:
            raise RuntimeError(f"checkpoint {step_tag(step)} could not be uploaded to "
                               f"{storage.redact(self.run_url)}: see the errors logged above")

    def close(self) -> None:
        """Finish pending uploads and stop the upload thread (every rank)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    # -- resuming -----------------------------------------------------------------------------
    def latest_url(self) -> Optional[str]:
        """URL of the step directory `latest` points at, or None (this process only)."""
        latest = storage.join(self.run_url, LATEST)
        if not storage.exists(latest, self.storage_cfg):
            return None
        tag = storage.read_text(latest, self.storage_cfg).strip()
        if parse_step(tag) is None:
            raise CheckpointError(f"{storage.redact(latest)} holds {tag[:40]!r}, not a step_<N> tag: the marker is "
                                  "corrupt; point checkpoint.resume at a step directory to resume")
        return storage.join(self.run_url, tag)

    def complete_steps(self) -> List[int]:
        """Steps of this run's checkpoints that are COMPLETE on storage, ascending (this process)."""
        steps = []
        for url in _listdir_or_empty(self.run_url, self.storage_cfg):
            step = parse_step(url)
            if step is not None and storage.exists(storage.join(url, COMPLETE), self.storage_cfg):
                steps.append(step)
        return sorted(steps)

    def refuse_lost_history(self, history_step: Optional[int]) -> None:
        """With ``resume=auto``, a run directory that logged steps while storage holds no checkpoint
        of this run means the checkpoints were lost (or ``checkpoint.root`` changed): starting from
        step 0 would silently throw the run away. Rank 0, before anything is written."""
        if self.cfg.resume != "auto" or not history_step or self.latest_url() is not None:
            return
        raise CheckpointError(
            f"the run directory records training up to step {history_step}, but there is no checkpoint of this run "
            f"under {storage.redact(self.run_url)} (lost, or checkpoint.root changed). Refusing to restart it from "
            "step 0: point checkpoint.root / checkpoint.resume=<url of step_N> at its checkpoints, or pass "
            "checkpoint.resume=never to start it fresh (its metrics.jsonl is then rewritten)")

    def _resume_target(self) -> Optional[str]:
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            return self.latest_url()
        url = mode.rstrip("/")
        if parse_step(url) is None:  # a run directory: use its `latest`
            marker = storage.join(url, LATEST)
            if not storage.exists(marker, self.storage_cfg):
                raise CheckpointError(f"checkpoint.resume={storage.redact(url)} is neither a step_<N> directory nor a "
                                      "run directory with a `latest` marker")
            url = storage.join(url, storage.read_text(marker, self.storage_cfg).strip())
        return url

    def _read_and_validate(self, url: str, engines: Mapping[str, Any], ema: Optional[CpuEma]) -> Tuple[dict, dict]:
        shown = storage.redact(url)
        cfg = self.storage_cfg
        complete_url = storage.join(url, COMPLETE)
        if not storage.exists(complete_url, cfg):
            if not storage.exists(storage.join(url, CLIENT_STATE), cfg) and not _listdir_or_empty(url, cfg):
                raise CheckpointError(f"checkpoint {shown} does not exist. Check checkpoint.root/run_id, or pass "
                                      "checkpoint.resume=never to start fresh")
            raise CheckpointError(f"checkpoint {shown} is incomplete (no {COMPLETE} marker: its upload was "
                                  "interrupted). Resume from an earlier step_<N> with checkpoint.resume=<url>")
        try:
            manifest = json.loads(storage.read_text(complete_url, cfg))
            meta = json.loads(storage.read_text(storage.join(url, CLIENT_STATE), cfg))
        except (ValueError, FileNotFoundError) as exc:
            raise CheckpointError(f"checkpoint {shown} has an unreadable {COMPLETE} or {CLIENT_STATE} ({exc}); "
                                  "resume from an earlier step_<N> with checkpoint.resume=<url>") from exc
        if meta.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"{shown} is not an ldm_scale training checkpoint (format "
                                  f"{meta.get('format')!r}, expected {CKPT_FORMAT!r}); exported checkpoints are "
                                  "for sampling (model.first_stage_ckpt / sample.py), not for resuming")
        saved_engines = meta.get("engines", {})
        if set(saved_engines) != set(engines):
            raise CheckpointError(f"checkpoint {shown} holds engines {sorted(saved_engines)} but this run has "
                                  f"{sorted(engines)}: it was written by another task; resume it with the same "
                                  "task config or start a new run id")
        for name, engine in engines.items():
            diff = describe_shape_mismatch(saved_engines[name]["param_shapes"], param_shapes(engine.module))
            if diff:
                raise CheckpointError(
                    f"checkpoint {shown} was written for a different model ({name}: {diff}). Resume it with the "
                    f"model config it was trained with (saved under 'config' in {CLIENT_STATE}), or start a new "
                    "run id / pass checkpoint.resume=never")
        if ema is not None and meta.get("has_ema") and list(meta.get("ema_names") or []) != list(ema.all_names):
            raise CheckpointError(f"checkpoint {shown} has an EMA of different parameters than this model; resume "
                                  "with the same model config or start a new run id")
        return meta, manifest

    def resume(self, *, engines: Mapping[str, Any], ema: Optional[CpuEma] = None, loader: Any = None,
               generators: Optional[Mapping[str, torch.Generator]] = None,
               url: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """Load the checkpoint ``cfg.resume`` selects (or ``url``: a rollback) into engines, EMA,
        loader and RNGs (every rank).

        Returns the saved client state (``step``, ``samples_seen``, ``wandb_run_id``, ``config``,
        task entries, ...) or None when there is nothing to resume.
        """
        found: Tuple[Optional[str], Optional[dict], Optional[dict], Optional[str]] = (None, None, None, None)
        if self.info.rank == 0:
            try:
                url = url or self._resume_target()
                if url is not None:
                    meta, manifest = self._read_and_validate(url, engines, ema)
                    found = (url, meta, manifest, None)
            except (CheckpointError, storage.StorageError) as exc:
                found = (None, None, None, storage.redact(exc))
        url, meta, manifest, error = dist.broadcast_object(found)
        if error is not None:  # the same error on every rank, before anything was loaded
            raise CheckpointError(error)
        if url is None:
            log.info("no checkpoint to resume for run %s under %s: starting fresh", self.run_id,
                     storage.redact(self.cfg.root))
            return None
        step = int(meta["step"])
        saved_world = int(meta["world_size"])
        same_world = saved_world == self.info.world_size
        log.info("resuming from %s (step %d, saved on %d ranks, now %d)", storage.redact(url), step, saved_world,
                 self.info.world_size)
        local = self.local_step_dir(step)
        self._download(url, local, manifest["files"], saved_world, same_world)

        rank = self.info.rank
        src_rank = rank if same_world else min(rank, saved_world - 1)
        if same_world:
            for name, engine in engines.items():
                _load_engine(engine, local, name, universal=False)
        else:
            universal_root = local + "_universal"
            leader, _ = self._node()
            if rank == leader:
                for name in engines:
                    _convert_to_universal(os.path.join(local, name), os.path.join(universal_root, name))
            dist.barrier()
            for name, engine in engines.items():
                _load_engine(engine, universal_root, name, universal=True)
        if ema is not None and meta.get("has_ema"):
            if same_world:
                ema.load_state_dict(_torch_load(os.path.join(local, f"ema_rank{rank}.pt"), "EMA shard"))
            else:
                shards = [_torch_load(os.path.join(local, f"ema_rank{r}.pt"), "EMA shard") for r in range(saved_world)]
                ema.load_full_state_dict(assemble_full_state_dict(shards), shards[0]["num_updates"],
                                         shards[0]["last_step"])
        elif ema is not None:
            log.warning("checkpoint %s has no EMA: the EMA restarts from the loaded weights", storage.redact(url))
            ema.reset(last_step=step)
        if loader is not None and meta.get("has_loader"):
            loader.load_state_dict(_torch_load(os.path.join(local, f"loader_rank{src_rank}.pt"), "loader state"))
        # RNG last: nothing after this may draw random numbers before the first training step.
        set_rng_state(_torch_load(os.path.join(local, f"rng_rank{src_rank}.pt"), "RNG state"), generators)
        self._consecutive_failures = 0
        # The resumed step is already durable: a run restarted at its last step must not write it again.
        self.last_saved_step = step
        return meta

    def _download(self, url: str, local: str, files: Mapping[str, int], saved_world: int, same_world: bool) -> None:
        """One process per node fetches the files its ranks need (all of them on a world change)."""
        leader, ranks = self._node()
        error = None
        if self.info.rank == leader:
            try:
                for rel, size in sorted(files.items()):
                    shared = not _OWNER.search(rel.rsplit("/", 1)[-1])
                    needed = not same_world or shared or file_owner(rel) in ranks
                    path = os.path.join(local, rel)
                    if not needed or (os.path.exists(path) and os.path.getsize(path) == size):
                        continue
                    storage.get_file(storage.join(url, rel), path, self.storage_cfg)
                    if os.path.getsize(path) != size:
                        raise CheckpointError(f"{storage.redact(storage.join(url, rel))} has {os.path.getsize(path)} "
                                              f"bytes but the manifest says {size}: the checkpoint is corrupt")
            except (CheckpointError, storage.StorageError, FileNotFoundError) as exc:
                error = storage.redact(exc)
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(f"downloading checkpoint {storage.redact(url)} failed: {errors[0]}. If files are "
                                  "missing the checkpoint is damaged: resume from an earlier step_<N>")


def _lower_thread_priority() -> None:
    """Run the upload thread at a lower CPU priority than the training loop (Linux: per-thread
    niceness), so hashing/signing/serialising the upload takes idle cores, not the loop's."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _listdir_or_empty(url: str, cfg: Optional[storage.StorageConfig]) -> List[str]:
    try:
        return storage.listdir(url, cfg)
    except FileNotFoundError:
        return []


def _refuse_decoupled_engine(name: str, engine: Any) -> None:
    # The decoupled engine commits files (and its own `latest`) later, inside engine.step():
    # uploading right after save_checkpoint would ship partial files.
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is not None and "Decoupled" in type(ckpt_engine).__name__:
        raise ValueError(f"engine {name!r} uses DeepSpeed's decoupled checkpoint engine, whose files are committed "
                         "after save_checkpoint returns; disable it (checkpoint.writer.decoupled=false in the "
                         "DeepSpeed config): ldm_scale already uploads in the background")


def _load_engine(engine: Any, load_dir: str, tag: str, universal: bool) -> None:
    from ldm_scale.train.engine import load_engine_checkpoint

    try:
        path = load_engine_checkpoint(engine, load_dir, tag, universal=universal)
    except Exception as exc:  # name the checkpoint and the fix
        raise CheckpointError(f"DeepSpeed could not load engine {tag!r} from {load_dir}: {type(exc).__name__}: "
                              f"{exc}. The files are damaged or from another model/optimizer config; resume from an "
                              "earlier step_<N> or start a new run id") from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint for engine {tag!r} in {load_dir}")


def _convert_to_universal(src: str, dst: str) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` (a separate process: it forks workers)."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    from ldm_scale.train.engine import universal_conversion_command

    proc = subprocess.run(universal_conversion_command(src, dst), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckpointError(f"converting {src} to a universal checkpoint for the new world size failed:\n"
                              f"{proc.stderr[-3000:]}")



def consolidated_fp32_state_dict(step_dir: str, engine_name: str) -> Dict[str, torch.Tensor]:
    """Full fp32 state dict of one engine's module from a local checkpoint directory (any ZeRO
    stage, any world size; one process, no collectives)."""
    tag_dir = os.path.join(step_dir, engine_name)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir} does not exist: the checkpoint has no engine {engine_name!r}")
    if not any("zero_pp_rank_" in f for f in os.listdir(tag_dir)):  # ZeRO disabled: full module on rank 0
        state = _torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "model states")["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    from ldm_scale.train.engine import fp32_state_dict_from_zero_checkpoint

    return fp32_state_dict_from_zero_checkpoint(step_dir, engine_name)
