"""The publish protocol: how a locally written checkpoint becomes the run's `latest`, and how a
reader finds one.

Writer side (:class:`Publisher`, one per rank). After ``save`` has written the step directory
locally, a single upload thread per rank puts the files this rank *owns* (``layout.file_owner``) to
storage and writes ``DONE/rank<R>.json``. Rank 0's thread then polls storage until every rank's
DONE file exists, checks that every listed object is really there, writes ``COMPLETE`` (the merged
manifest), then ``latest``, then prunes old checkpoints (``layout.steps_to_delete``). A rank whose
upload fails writes ``FAILED/rank<R>`` so rank 0 stops waiting.

The upload threads issue no collectives: they would race with the training loop's collectives on
the same process group. The only cross-rank confirmation is through storage. Whether an upload
failed is agreed with one all-reduce on the main thread at the next ``save``/``wait``
(:meth:`Publisher.finish_previous`), so every rank takes the same decision.

Reader side (functions): ``latest_url``, ``complete_steps``, ``resume_target`` and
``read_checkpoint`` (the COMPLETE and format checks every resume makes first).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ldm_scale import dist, storage
from ldm_scale.train.checkpoint.layout import (CKPT_FORMAT, CLIENT_STATE, COMPLETE, DONE, FAILED, LATEST,
                                               CheckpointConfig, CheckpointError, local_steps_to_delete,
                                               parse_step, step_tag, steps_to_delete)

log = logging.getLogger(__name__)

UPLOAD_NICENESS = 10


class Publisher:
    """Uploads, confirms, publishes and prunes one rank's checkpoints of one run.

    Args:
        cfg: the checkpoint config (timeouts, retention, ``max_failed_saves``).
        run_url: ``<root>/<run_id>``; local_run_dir: this node's staging folder of the run.
        info: topology; storage_cfg: for every storage call (None: the process default).
    """

    def __init__(self, cfg: CheckpointConfig, run_url: str, local_run_dir: str, info: dist.DistInfo,
                 storage_cfg: Optional[storage.StorageConfig]):
        self.cfg, self.run_url, self.local_run_dir = cfg, run_url, local_run_dir
        self.info, self.storage_cfg = info, storage_cfg
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload",
                                            initializer=_lower_thread_priority)
        self._pending: Optional[Future] = None
        self._pending_step: Optional[int] = None
        self.consecutive_failures = 0  # agreed across ranks

    def step_url(self, step: int) -> str:
        return storage.join(self.run_url, step_tag(step))

    def local_step_dir(self, step: int) -> str:
        return os.path.join(self.local_run_dir, step_tag(step))

    @property
    def pending(self) -> bool:
        """Whether this rank's last checkpoint is still uploading (or confirming, on rank 0)."""
        return self._pending is not None and not self._pending.done()

    # -- main thread ----------------------------------------------------------------------------
    def submit(self, step: int, files: Mapping[str, int], *, node_leader: bool) -> None:
        """Upload ``files`` (``{relative path: size}``, this rank's) of ``step`` in the background.
        Call :meth:`finish_previous` first: one upload at a time."""
        assert self._pending is None, "finish_previous() before submit()"
        self._pending_step = step
        self._pending = self._executor.submit(self._upload_job, step, dict(files), node_leader)

    def finish_previous(self) -> None:
        """Wait for this rank's previous upload and agree with all ranks whether it failed
        (every rank, main thread: one all-reduce)."""
        if self._pending is None:
            return
        ok = self._pending.result()
        step = self._pending_step
        self._pending, self._pending_step = None, None
        if self._agree_any(not ok):
            self.consecutive_failures += 1
            msg = (f"checkpoint {step_tag(step)} was not uploaded (see the errors above); `latest` still points "
                   f"at the previous complete checkpoint ({self.consecutive_failures} failed in a row)")
            if self.consecutive_failures >= self.cfg.max_failed_saves:
                raise RuntimeError(msg + f"; stopping after checkpoint.max_failed_saves="
                                   f"{self.cfg.max_failed_saves}. Check the storage endpoint and credentials")
            log.error(msg)
        else:
            self.consecutive_failures = 0

    def wait(self) -> None:
        """Block until the pending checkpoint's upload, COMPLETE and `latest` are durable (every
        rank, main thread). Raises if the upload failed on any rank."""
        step = self._pending_step
        failures = self.consecutive_failures
        self.finish_previous()
        dist.barrier()  # rank 0's job (COMPLETE, latest) is part of its pending upload
        if self.consecutive_failures > failures:
            raise RuntimeError(f"checkpoint {step_tag(step)} could not be uploaded to "
                               f"{storage.redact(self.run_url)}: see the errors logged above")

    def close(self) -> None:
        """Finish the pending upload and stop the upload thread (every rank)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _agree_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (main thread only)."""
        t = torch.tensor([1.0 if flag else 0.0], device=dist.default_device(self.info))
        dist.all_reduce_sum(t)
        return bool(t.item() > 0)

    # -- upload thread: no collectives in here ------------------------------------------------------
    def _upload_job(self, step: int, files: Mapping[str, int], node_leader: bool) -> bool:
        """Upload this rank's files, write DONE; rank 0 then confirms all ranks, writes COMPLETE and
        `latest`, and prunes."""
        local, remote = self.local_step_dir(step), self.step_url(step)
        cfg = self.storage_cfg
        try:
            t0 = time.monotonic()
            for rel in sorted(files):
                storage.put_file(os.path.join(local, rel), storage.join(remote, rel), cfg)
            storage.write_text(storage.join(remote, DONE, f"rank{self.info.rank}.json"),
                               json.dumps({"files": dict(files)}), cfg)
            log.info("checkpoint %s: rank %d uploaded %d files (%.1f MB) in %.1fs", step_tag(step), self.info.rank,
                     len(files), sum(files.values()) / 1e6, time.monotonic() - t0)
            if self.info.rank == 0:
                self._confirm_and_publish(step)
            if node_leader:
                self._prune_local(step)
            return True
        except Exception as exc:  # reported on the main thread, training may go on
            log.error("checkpoint %s: upload from rank %d failed: %s", step_tag(step), self.info.rank,
                      storage.redact(exc))
            try:
                storage.write_text(storage.join(remote, FAILED, f"rank{self.info.rank}"), storage.redact(exc), cfg)
            except Exception as marker_exc:  # storage is down; rank 0 then times out instead
                log.debug("could not write the FAILED marker: %s", storage.redact(marker_exc))
            return False

    def _confirm_and_publish(self, step: int) -> None:
        remote, cfg = self.step_url(step), self.storage_cfg
        world = self.info.world_size
        deadline = time.monotonic() + self.cfg.confirm_timeout_s
        while True:
            names = {u.rsplit("/", 1)[-1] for u in listdir_or_empty(storage.join(remote, DONE), cfg)}
            if all(f"rank{r}.json" in names for r in range(world)):
                break
            failed = listdir_or_empty(storage.join(remote, FAILED), cfg)
            if failed:
                raise RuntimeError(f"ranks {[u.rsplit('/', 1)[-1] for u in failed]} failed to upload")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(names)}/{world} ranks confirmed their upload within "
                                   f"checkpoint.confirm_timeout_s={self.cfg.confirm_timeout_s}")
            time.sleep(self.cfg.poll_interval_s)
        manifest: Dict[str, int] = {}
        for r in range(world):
            manifest.update(json.loads(storage.read_text(storage.join(remote, DONE, f"rank{r}.json"), cfg))["files"])
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
        for url in listdir_or_empty(self.run_url, cfg):
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
        if not os.path.isdir(self.local_run_dir):
            return
        steps = [s for s in (parse_step(n) for n in os.listdir(self.local_run_dir)) if s is not None]
        for step in local_steps_to_delete(steps, uploaded, self.cfg.keep_local):
            if step == uploaded or storage.exists(storage.join(self.step_url(step), COMPLETE), self.storage_cfg):
                shutil.rmtree(self.local_step_dir(step), ignore_errors=True)


def _lower_thread_priority() -> None:
    """Run the upload thread at a lower CPU priority than the training loop (Linux: per-thread
    niceness), so hashing/signing/serialising the upload takes idle cores, not the loop's."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def listdir_or_empty(url: str, cfg: Optional[storage.StorageConfig]) -> List[str]:
    try:
        return storage.listdir(url, cfg)
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------
# Reader side (one process; the manager broadcasts what rank 0 found)
# ---------------------------------------------------------------------------------------------
def latest_url(run_url: str, cfg: Optional[storage.StorageConfig]) -> Optional[str]:
    """URL of the step directory `latest` points at, or None."""
    latest = storage.join(run_url, LATEST)
    if not storage.exists(latest, cfg):
        return None
    tag = storage.read_text(latest, cfg).strip()
    if parse_step(tag) is None:
        raise CheckpointError(f"{storage.redact(latest)} holds {tag[:40]!r}, not a step_<N> tag: the marker is "
                              "corrupt; point checkpoint.resume at a step directory to resume")
    return storage.join(run_url, tag)


def complete_steps(run_url: str, cfg: Optional[storage.StorageConfig]) -> List[int]:
    """Steps of the run's checkpoints that are COMPLETE on storage, ascending."""
    steps = []
    for url in listdir_or_empty(run_url, cfg):
        step = parse_step(url)
        if step is not None and storage.exists(storage.join(url, COMPLETE), cfg):
            steps.append(step)
    return sorted(steps)


def resume_target(mode: str, run_url: str, cfg: Optional[storage.StorageConfig]) -> Optional[str]:
    """The step URL ``checkpoint.resume`` selects: ``never`` -> None, ``auto`` -> this run's `latest`
    (or None), a step URL as given, a run URL -> its `latest`."""
    if mode == "never":
        return None
    if mode == "auto":
        return latest_url(run_url, cfg)
    url = mode.rstrip("/")
    if parse_step(url) is None:  # a run directory: use its `latest`
        marker = storage.join(url, LATEST)
        if not storage.exists(marker, cfg):
            raise CheckpointError(f"checkpoint.resume={storage.redact(url)} is neither a step_<N> directory nor a "
                                  "run directory with a `latest` marker")
        url = storage.join(url, storage.read_text(marker, cfg).strip())
    return url


def read_checkpoint(url: str, cfg: Optional[storage.StorageConfig]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(client state, COMPLETE manifest)`` of a published training checkpoint; a missing,
    incomplete, unreadable or foreign one is a :class:`CheckpointError` saying what to do."""
    shown = storage.redact(url)
    complete_url = storage.join(url, COMPLETE)
    if not storage.exists(complete_url, cfg):
        if not storage.exists(storage.join(url, CLIENT_STATE), cfg) and not listdir_or_empty(url, cfg):
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
    return meta, manifest
