"""Graceful stop on a signal: checkpoint, exit cleanly, let the scheduler requeue the job.

SLURM sends a signal some time before a job's time limit (``--signal=B:USR1@300``) or when an
operator asks for it (``scancel --signal=USR1 --batch <job>``). The contract with the training loop:

1. ``install(cfg)`` early in the entry point: the handler only sets a flag (nothing else is safe
   inside a signal handler, and a step must not be interrupted half way).
2. ``requested(step)`` once per optimizer step, on every rank, at the same point of the step. Every
   ``check_every`` steps the ranks all-reduce their flags, so they all see the same answer at the
   same step even when the signal reached only some of them (nodes receive it at different times).
3. When it returns True: write a checkpoint and wait until it is durable (``latest`` written), then
   ``acknowledge(step)`` and leave the loop; the process exits with ``EXIT_STATUS``.

``acknowledge`` writes the marker file named by ``$LDM_SCALE_PREEMPT_MARKER`` (set by the sbatch
script of ``launch/slurm.py``); the batch script requeues the job (``scontrol requeue``) when the
marker exists after the job step ends, and the requeued job resumes from ``latest`` under the same
run id. The exit status is 0 on purpose: torchrun restarts workers that exit non-zero (when
``--max-restarts`` > 0) and reports any worker failure as its own exit 1, so a special status could
never reach the batch script; the marker is the channel.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import List, Optional

import torch

from ldm_scale import dist

EXIT_STATUS = 0
"""Status of every rank after a preemption checkpoint (see the module docstring for why 0)."""

MARKER_ENV = "LDM_SCALE_PREEMPT_MARKER"
"""Environment variable naming the file ``acknowledge`` writes (rank 0) for the batch script."""


@dataclass
class PreemptionConfig:
    """How the training loop reacts to a stop signal.

    check_every: all-reduce the stop flag every N optimizer steps. Each check is a tiny collective
    (and, on GPU, a host sync), so N > 1 keeps it off the critical path; the worst-case delay is
    N steps, which must fit in the signal's lead time together with writing one checkpoint.
    """

    enabled: bool = True
    # SIGTERM too: a plain `kill`, Kubernetes and `scancel` without --signal send it, then SIGKILL
    # after a grace period (torchrun's agent: 30 s; SLURM KillWait; terminationGracePeriodSeconds).
    signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    check_every: int = 10


class _State:
    def __init__(self) -> None:
        self.installed: bool = False
        self.check_every: int = 1
        self.signal_name: Optional[str] = None  # set by the handler (or request())
        self.received_at: Optional[float] = None
        self.previous: dict[int, object] = {}


_state = _State()


def _handler(signum: int, frame: Optional[FrameType]) -> None:
    # Only record: the step in progress finishes, and the loop acts at its next synchronised check.
    if _state.signal_name is None:
        _state.signal_name = signal.Signals(signum).name
        _state.received_at = time.time()


def _parse_signal(name: str) -> signal.Signals:
    key = name.strip().upper()
    if not key.startswith("SIG"):
        key = "SIG" + key
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"preemption.signals: unknown signal {name!r}; use names like 'SIGUSR1' or 'USR2'") from None


def install(cfg: Optional[PreemptionConfig] = None) -> None:
    """Install the stop-flag handler for ``cfg.signals``; call from the main thread, once per process.

    Call it as early as possible: until it runs, the signal's default action applies (USR1 would
    kill the process; under ``launch/slurm.py`` the agent ignores USR1, which the workers inherit,
    so an early signal is ignored rather than fatal).
    """
    cfg = cfg or PreemptionConfig()
    if cfg.check_every < 1:
        raise ValueError(f"preemption.check_every must be >= 1, got {cfg.check_every}")
    if not cfg.enabled:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("preemption.install() must run in the main thread (Python delivers signals there)")
    for name in cfg.signals:
        signum = _parse_signal(name)
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"preemption.signals: {signum.name} cannot be caught")
        previous = signal.signal(signum, _handler)
        _state.previous.setdefault(int(signum), previous)
    _state.check_every = cfg.check_every
    _state.installed = True


def uninstall() -> None:
    """Restore the handlers replaced by ``install`` and clear the flag (tests, repeated train() calls)."""
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]
    _state.previous.clear()
    _state.installed = False
    _state.signal_name = None
    _state.received_at = None


def request(reason: str = "requested") -> None:
    """Ask for a stop from code (same path as a signal), e.g. a wall-clock budget."""
    if _state.signal_name is None:
        _state.signal_name = reason
        _state.received_at = time.time()


def signal_received() -> Optional[str]:
    """Name of the signal this process received (no communication), or None."""
    return _state.signal_name


def requested(step: int) -> bool:
    """Whether all ranks stop after this step: the same answer on every rank at the same step.

    Must be called by every rank at every optimizer step with the same ``step`` (it is a collective
    on the steps where ``step % check_every == 0``, and False without communication otherwise).
    """
    if step % _state.check_every != 0:
        return False
    local = 1.0 if _state.signal_name is not None else 0.0
    if not dist.is_initialized():
        return local > 0
    # Sum, not max: it is the collective dist.py offers, and any positive sum means "some rank got it".
    flag = torch.tensor([local], device=dist.default_device())
    dist.all_reduce_sum(flag)
    return bool(flag.item() > 0)


def acknowledge(step: int, checkpoint: str = "") -> Optional[Path]:
    """Record that the stop checkpoint at ``step`` is durable: rank 0 writes the requeue marker.

    Call after the checkpoint (and its ``latest`` pointer) is complete on every rank. Returns the
    marker path on rank 0 when ``$LDM_SCALE_PREEMPT_MARKER`` is set, else None.
    """
    dist.barrier()  # every rank's part of the checkpoint is written before the job may be requeued
    marker = os.environ.get(MARKER_ENV)
    if not marker or not dist.get_dist_info().is_main:
        return None
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "checkpoint": checkpoint, "signal": _state.signal_name,
              "received_at": _state.received_at, "acknowledged_at": time.time()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)  # atomic: the batch script never reads a half-written marker
    return path
