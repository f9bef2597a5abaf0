"""Run ownership: one live run per run id, recorded by a lease in the checkpoint root.

Two jobs started with the same run id (a resubmitted job while the first still runs, a copied
command) would otherwise interleave: both append to ``metrics.jsonl``, both stage checkpoints in
the same folder and publish each other's ``latest``. So before anything is written, rank 0 takes
the lease ``<checkpoint.root>/<run_id>/LEASE`` and renews it while the run lives.

The protocol works on any store ``ldm_scale.storage`` speaks (local disk, S3, GCS), none of which
offers a portable compare-and-swap, so it is *write, settle, read back*:

1. read ``LEASE``; if it names another owner that is alive, refuse (:class:`LeaseHeldError`, naming
   the owner's host, pid, start time and last renewal). The owner counts as gone when its last
   renewal is older than ``timeout_s``, when it ran on this host under a pid that no longer exists,
   or when it belongs to the same launcher job (torchrun restarting its workers, a requeued SLURM
   job), i.e. an earlier attempt of this very run;
2. write our own record (with a random token), wait ``settle_s``, read it back: if another
   starter's write landed last, that starter owns the run and we refuse. Two starters collide only
   if one reads before the other has written and reads back before the other's write lands; the
   settle wait (several store round trips) makes that window far smaller than any human or
   scheduler gap between two submissions;
3. a daemon thread renews the record every ``renew_every_s``; each renewal first reads it back
   and, if the token is no longer ours (a takeover after we stalled past the timeout), flags the
   loss: the loop checks :meth:`RunLease.check` every step and stops before writing anything more;
4. :meth:`release` deletes the lease on every exit path the process survives (finish, preemption,
   error); after a kill -9 the stale lease is taken over as in step 1.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ldm_scale import storage

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE"


@dataclass
class LeaseConfig:
    """Run ownership (docs/checkpoints.md, "Run lease")."""

    enabled: bool = True
    timeout_s: float = 120.0  # a lease not renewed for this long belongs to a dead run
    renew_every_s: float = 20.0
    settle_s: float = 1.0  # write -> wait -> read back, to detect a simultaneous start


class LeaseHeldError(RuntimeError):
    """Another live run owns this run id."""


def launcher_job() -> Optional[str]:
    """An id shared by every attempt of one launched job: SLURM's job id, or torchrun's
    rendezvous id when it was given one (``--rdzv_id``; ``none`` is torchrun's default)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm:{job}"
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return f"torchrun:{run}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_gone(record: Dict[str, Any], now: float, timeout_s: float, host: str, job: Optional[str]) -> Optional[str]:
    """Why the lease ``record`` no longer protects a live run (a phrase for the log), or None."""
    age = now - float(record.get("renewed_at", 0.0))
    if age > timeout_s:
        return f"not renewed for {age:.0f} s (timeout {timeout_s:.0f} s)"
    if record.get("host") == host and not _pid_alive(int(record.get("pid", -1))):
        return f"pid {record.get('pid')} no longer exists on this host"
    if job is not None and record.get("job") == job:
        return f"it is an earlier attempt of the same launcher job ({job})"
    return None


def describe(record: Dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started_at", 0.0))))
    return (f"host {record.get('host')} pid {record.get('pid')} (started {started}, renewed "
            f"{now - float(record.get('renewed_at', 0.0)):.0f} s ago, job {record.get('job') or '-'})")


def _remove_if_empty(url: str) -> None:
    """A run that wrote nothing but its lease (refused, or failed at start) leaves no empty
    directory behind on local disk (object stores have no directories)."""
    if storage.is_local(url):
        try:
            os.rmdir(storage.local_path(url))
        except OSError:  # not empty (the run wrote checkpoints), or already gone
            pass


class RunLease:
    """The lease of one run; rank 0 only (other ranks never touch it)."""

    def __init__(self, cfg: LeaseConfig, run_url: str, storage_cfg: Optional[storage.StorageConfig] = None):
        self.cfg = cfg
        self.url = storage.join(run_url, LEASE_FILE)
        self.storage_cfg = storage_cfg
        self.host = socket.gethostname()
        self.job = launcher_job()
        self.token = uuid.uuid4().hex
        self.record = {"token": self.token, "host": self.host, "pid": os.getpid(), "job": self.job,
                       "started_at": time.time(), "renewed_at": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    def _read(self) -> Optional[Dict[str, Any]]:
        if not storage.exists(self.url, self.storage_cfg):
            return None
        try:
            return json.loads(storage.read_text(self.url, self.storage_cfg))
        except (ValueError, FileNotFoundError):  # torn or just deleted: nobody holds it
            return None

    def _write(self) -> None:
        self.record["renewed_at"] = time.time()
        storage.write_text(self.url, json.dumps(self.record, sort_keys=True), self.storage_cfg)

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeldError`; starts the renewal thread."""
        shown = storage.redact(self.url)
        current = self._read()
        if current is not None and current.get("token") != self.token:
            why = owner_gone(current, time.time(), self.cfg.timeout_s, self.host, self.job)
            if why is None:
                raise LeaseHeldError(
                    f"run id is in use: {shown} is held by a live run on {describe(current, time.time())}. "
                    "Use another run_id, stop that run first, or wait for its lease to expire "
                    f"(checkpoint.lease.timeout_s={self.cfg.timeout_s:.0f})")
            log.warning("taking over the lease %s from %s: %s", shown, describe(current, time.time()), why)
        self._write()
        time.sleep(self.cfg.settle_s)
        back = self._read()
        if back is None or back.get("token") != self.token:
            other = describe(back, time.time()) if back else "a run that released it at once"
            raise LeaseHeldError(f"run id is in use: another run started at the same time and holds {shown} "
                                 f"({other}). Use another run_id")
        log.info("holding the run lease %s (renewed every %.0f s)", shown, self.cfg.renew_every_s)
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.cfg.renew_every_s):
            try:
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    self.lost = f"taken over by {describe(current, time.time())}"
                    log.error("run lease %s was %s", storage.redact(self.url), self.lost)
                    return
                self._write()
            except Exception as exc:  # storage hiccup: the next renewal retries; the timeout is long
                log.warning("could not renew the run lease %s: %s", storage.redact(self.url), storage.redact(exc))

    def check(self) -> None:
        """Raise if the lease was lost (another run took over): nothing more may be written."""
        if self.lost is not None:
            raise LeaseHeldError(f"this run lost its lease {storage.redact(self.url)} ({self.lost}); it stopped "
                                 "without writing more. It had stalled past checkpoint.lease.timeout_s")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lost is not None:
            return
        try:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                storage.rm(self.url, cfg=self.storage_cfg)
                _remove_if_empty(storage.parent(self.url))
        except Exception as exc:  # the lease then expires by its timeout
            log.warning("could not release the run lease %s: %s", storage.redact(self.url), storage.redact(exc))
