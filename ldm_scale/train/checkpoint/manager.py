"""The checkpoint manager: save and resume orchestration over a mapping of states.

``CheckpointManager.save(step, states, client_state=...)`` and ``resume(states)`` take
``states: Mapping[str, state]`` (kinds in ``protocol.py``, ldm_scale's adapters in ``states.py``)
and know no component types. Each state is saved and loaded by its kind, in the mapping's order,
on every rank.

Saving (every rank, main thread): the step directory goes to ``<local_dir>/<run_id>-<hash>/step_<N>/``
(``layout.py``): directory states write their files (DeepSpeed's ``save_checkpoint``, a collective,
local directories only), per-rank states ``<name>_rank<R>.pt``, rank 0 ``client_state.json``
(the caller's numbers, client states' entries, what the states ``describe``, and the format,
step, run id and world size). Then ``publish.Publisher`` uploads in the background and writes
``latest`` last.

Resuming (every rank): rank 0 resolves ``latest`` (or an explicit URL), reads ``COMPLETE`` and
``client_state.json``, and asks every state to ``check`` them; the same clear error is raised on
every rank before anything is loaded or written. One process per node downloads what the node
needs (skipping files already staged with the right size), then every rank loads each state. On
a different world size directory states are converted first (node leader, then a barrier) and
per-rank states load through ``load_resharded``; a per-rank state without it is refused up front.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ldm_scale import dist, storage
from ldm_scale.train.checkpoint import publish
from ldm_scale.train.checkpoint.layout import (CKPT_FORMAT, CLIENT_STATE, CheckpointError, check_state_name,
                                               coerce_config, file_owner, is_shared, local_files, local_run_dir,
                                               rank_file, torch_load, write_local, write_text_file)
from ldm_scale.train.checkpoint.protocol import AbsentAware, Described, Reshardable, state_kind
from ldm_scale.train.checkpoint.states import standard_states

log = logging.getLogger(__name__)


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
        self.local_run_dir = local_run_dir(self.cfg.local_dir, storage.redact(self.run_url), run_id)
        self._publisher = publish.Publisher(self.cfg, self.run_url, self.local_run_dir, self.info, storage_cfg)
        self._node_group: Optional[Tuple[int, List[int]]] = None  # (leader rank, ranks on this node)
        self.last_saved_step: Optional[int] = None

    # -- small helpers ------------------------------------------------------------------------
    def step_url(self, step: int) -> str:
        return self._publisher.step_url(step)

    def local_step_dir(self, step: int) -> str:
        return self._publisher.local_step_dir(step)

    @property
    def upload_pending(self) -> bool:
        """Whether this rank's last checkpoint is still uploading (or confirming, on rank 0)."""
        return self._publisher.pending

    def due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def _node(self) -> Tuple[int, List[int]]:
        """(leader rank, ranks) of the processes sharing this node's local_dir (collective, cached)."""
        if self._node_group is None:
            key = (socket.gethostname(), os.path.realpath(os.path.dirname(self.local_run_dir) or "."))
            keys = dist.all_gather_object(key)
            ranks = [r for r, k in enumerate(keys) if k == key]
            self._node_group = (min(ranks), ranks)
        return self._node_group

    def _states(self, states: Optional[Mapping[str, Any]], components: Mapping[str, Any]) -> Dict[str, Tuple[str, Any]]:
        """``{name: (kind, state)}``, checked before anything is written. ``components``
        (``engines=``, ``ema=``, ``loader=``, ``generators=``) is the shorthand for
        ``states=standard_states(...)``."""
        given = {k: v for k, v in components.items() if v is not None}
        if states is not None and given:
            raise TypeError(f"pass either states= or the components {sorted(given)}, not both")
        if states is None:
            states = standard_states(engines=given.pop("engines", {}), **given)
        out = {}
        for name, state in states.items():
            check_state_name(name)
            out[name] = (state_kind(name, state), state)
        return out

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, states: Optional[Mapping[str, Any]] = None, *, client_state: Mapping[str, Any],
             engines: Optional[Mapping[str, Any]] = None, ema: Any = None, loader: Any = None,
             generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
        """Checkpoint ``step`` (every rank, main thread, the same ``states`` on every rank).
        ``client_state``: the caller's JSON numbers for ``client_state.json`` (rank 0's are kept).
        Returns once the local files are written; the upload continues in the background
        (``cfg.async_upload``)."""
        kinds = self._states(states, {"engines": engines, "ema": ema, "loader": loader, "generators": generators})
        self._publisher.finish_previous()  # one all-reduce: every rank agrees on the last upload
        step = int(step)
        rank = self.info.rank
        leader, _ = self._node()
        local = self.local_step_dir(step)
        # A directory left by a crash at this step (possibly another world size) must not leak
        # stale files into the new checkpoint; the barrier keeps other ranks from writing first.
        if rank == leader and os.path.exists(local):
            shutil.rmtree(local, ignore_errors=True)
        dist.barrier()
        os.makedirs(local, exist_ok=True)

        # Same order on every rank: states may issue collectives while saving.
        for name, (kind, state) in kinds.items():
            if kind == "directory":
                state.save_files(local, step)
            elif kind == "rank":
                value = state.state_dict()
                write_local(os.path.join(local, rank_file(name, rank)), lambda p, v=value: torch.save(v, p))
        if rank == 0:
            meta = self._client_state(step, kinds, client_state)
            text = json.dumps(meta, indent=1, sort_keys=True, default=str)
            write_local(os.path.join(local, CLIENT_STATE), lambda p: write_text_file(p, text))
        mine = {rel: size for rel, size in local_files(local).items() if file_owner(rel) == rank}
        self.last_saved_step = step
        self._publisher.submit(step, mine, node_leader=rank == leader)
        if not self.cfg.async_upload:
            self.wait()

    def _client_state(self, step: int, kinds: Mapping[str, Tuple[str, Any]],
                      client_state: Mapping[str, Any]) -> Dict[str, Any]:
        meta = dict(client_state)
        for kind, state in kinds.values():
            if kind == "client":
                meta.update(state.client_state())
        meta.update({"format": CKPT_FORMAT, "step": step, "run_id": self.run_id,
                     "world_size": self.info.world_size})
        for _, state in kinds.values():
            if isinstance(state, Described):
                meta.update(state.describe())
        meta["saved_at"] = time.time()
        return meta

    def wait(self) -> None:
        """Block until this checkpoint's upload, COMPLETE and `latest` are durable (every rank,
        main thread). Raises if the upload failed on any rank."""
        self._publisher.wait()

    def close(self) -> None:
        """Finish pending uploads and stop the upload thread (every rank)."""
        self._publisher.close()

    def prune(self, latest: int) -> List[int]:
        """Apply the retention policy to this run's checkpoints on storage; returns deleted steps."""
        return self._publisher.prune(latest)

    # -- resuming -----------------------------------------------------------------------------
    def latest_url(self) -> Optional[str]:
        """URL of the step directory `latest` points at, or None (this process only)."""
        return publish.latest_url(self.run_url, self.storage_cfg)

    def complete_steps(self) -> List[int]:
        """Steps of this run's checkpoints that are COMPLETE on storage, ascending (this process)."""
        return publish.complete_steps(self.run_url, self.storage_cfg)

    def resume_step(self) -> Optional[int]:
        """The step of the checkpoint :meth:`resume` would load (its metadata only), or None; every
        rank gets rank 0's answer, or the same CheckpointError (a staged run picks its stage by it)."""
        found: Tuple[Optional[int], Optional[str]] = (None, None)
        if self.info.rank == 0:
            try:
                url = publish.resume_target(self.cfg.resume, self.run_url, self.storage_cfg)
                if url is not None:
                    found = (int(publish.read_checkpoint(url, self.storage_cfg)[0]["step"]), None)
            except (CheckpointError, storage.StorageError) as exc:
                found = (None, storage.redact(exc))
        step, error = dist.broadcast_object(found)
        if error is not None:
            raise CheckpointError(error)
        return step

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

    def _read_and_validate(self, url: str, kinds: Mapping[str, Tuple[str, Any]]) -> Tuple[dict, dict]:
        """Rank 0: the checkpoint's client state and manifest, once every state accepts them."""
        shown = storage.redact(url)
        meta, manifest = publish.read_checkpoint(url, self.storage_cfg)
        for _, state in kinds.values():
            problem = state.check(meta) if isinstance(state, Described) else None
            if problem:
                raise CheckpointError(f"checkpoint {shown} {problem}")
        saved_world = int(meta["world_size"])
        if saved_world != self.info.world_size:
            for name, (kind, state) in kinds.items():
                if kind == "rank" and rank_file(name, 0) in manifest["files"] and not isinstance(state, Reshardable):
                    raise CheckpointError(
                        f"checkpoint {shown} was saved on {saved_world} ranks and its state {name!r} cannot be "
                        f"loaded on {self.info.world_size}; resume it on {saved_world} ranks")
        return meta, manifest

    def resume(self, states: Optional[Mapping[str, Any]] = None, *, url: Optional[str] = None,
               engines: Optional[Mapping[str, Any]] = None, ema: Any = None, loader: Any = None,
               generators: Optional[Mapping[str, torch.Generator]] = None) -> Optional[Dict[str, Any]]:
        """Load the checkpoint ``cfg.resume`` selects (or ``url``: a rollback) into ``states``
        (every rank, the same ``states`` on every rank).

        Returns the saved client state (``step``, ``samples_seen``, ``wandb_run_id``, ``config``,
        task entries, ...) or None when there is nothing to resume.
        """
        kinds = self._states(states, {"engines": engines, "ema": ema, "loader": loader, "generators": generators})
        found: Tuple[Optional[str], Optional[dict], Optional[dict], Optional[str]] = (None, None, None, None)
        if self.info.rank == 0:
            try:
                url = url or publish.resume_target(self.cfg.resume, self.run_url, self.storage_cfg)
                if url is not None:
                    meta, manifest = self._read_and_validate(url, kinds)
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
        self._download(url, local, manifest["files"], same_world)
        for name, (kind, state) in kinds.items():
            if kind == "directory":
                self._load_directory(state, local, same_world)
            elif kind == "client":
                state.load_client_state(meta)
            else:
                self._load_rank_state(name, state, local, manifest["files"], step, saved_world, storage.redact(url))
        self._publisher.consecutive_failures = 0
        # The resumed step is already durable: a run restarted at its last step must not write it again.
        self.last_saved_step = step
        return meta

    def _load_directory(self, state: Any, local: str, same_world: bool) -> None:
        if same_world:
            state.load_files(local, converted=False)
            return
        converted = local + "_universal"
        leader, _ = self._node()
        if self.info.rank == leader:  # one conversion per node: every rank of it reads the result
            state.convert_files(local, converted)
        dist.barrier()
        state.load_files(converted, converted=True)

    def _load_rank_state(self, name: str, state: Any, local: str, files: Mapping[str, int], step: int,
                         saved_world: int, shown: str) -> None:
        if rank_file(name, 0) not in files:  # the checkpoint was written without this state
            if isinstance(state, AbsentAware):
                state.load_absent(step, shown)
            return

        def read(r: int) -> Any:
            return torch_load(os.path.join(local, rank_file(name, r)), f"{name!r} state")

        rank = self.info.rank
        if saved_world == self.info.world_size:
            state.load_state_dict(read(rank))
        else:
            state.load_resharded(read, saved_world=saved_world, rank=rank)

    def _download(self, url: str, local: str, files: Mapping[str, int], same_world: bool) -> None:
        """One process per node fetches the files its ranks need (all of them on a world change)."""
        leader, ranks = self._node()
        error = None
        if self.info.rank == leader:
            try:
                for rel, size in sorted(files.items()):
                    needed = not same_world or is_shared(rel) or file_owner(rel) in ranks
                    path = os.path.join(local, rel)
                    if not needed or (os.path.exists(path) and os.path.getsize(path) == size):
                        continue
                    storage.get_file(storage.join(url, rel), path, self.storage_cfg)
                    if os.path.getsize(path) != size:
                        raise CheckpointError(f"{storage.redact(storage.join(url, rel))} has {os.path.getsize(path)} "
                                              f"bytes but the manifest says {size}: the checkpoint is corrupt")
            except (CheckpointError, storage.StorageError, FileNotFoundError) as exc:
                error = storage.redact(exc)
        # Every rank learns whether its node's download worked (and waits for it) before loading.
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(f"downloading checkpoint {storage.redact(url)} failed: {errors[0]}. If files are "
                                  "missing the checkpoint is damaged: resume from an earlier step_<N>")
