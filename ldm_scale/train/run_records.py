"""What a training run writes about itself in its run directory, beside the metrics: the event log
(``events.jsonl``: resumes, as data), ``result.json`` (how the run stopped and how to continue it)
and the HTML report (``ldm_scale/report.py``). Rank 0 writes all three.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ldm_scale import dist, storage

log = logging.getLogger(__name__)

STOP_COMPLETED = "completed"


def resume_command(run_id: str) -> str:
    """The command line that continues this run (same launcher in front): this process's Hydra
    overrides with the run id pinned, secrets redacted."""
    args = [a for a in sys.argv[1:] if not a.startswith("run_id=")] + [f"run_id={run_id}"]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "launch/train.py"
    return storage.redact(" ".join(shlex.quote(a) for a in [script, *args]))


def write_run_report(run_dir: Path) -> None:
    """The run's HTML report (``python -m ldm_scale.report``); a failure to render it is logged, and
    never fails a run whose checkpoints and metrics are already written."""
    from ldm_scale import report

    try:
        log.info("run report: %s", report.write_report(str(run_dir)))
    except Exception as exc:  # noqa: BLE001 - the report is a view of the run, not part of it
        log.warning("run report not written (%s: %s); render it later with python -m ldm_scale.report %s",
                    type(exc).__name__, exc, run_dir)


EVENTS_FILE = "events.jsonl"  # in the run directory: one JSON line per resume, appended by rank 0


def record_event(info: dist.DistInfo, run_dir: Path, event: str, **fields: Any) -> None:
    """Append ``{"event", "time", "restart", **fields}`` to the run's event log (rank 0), so what
    happened to a run across restarts and requeues is data, not log wording to parse."""
    if not info.is_main:
        return
    record = {"event": event, "time": round(time.time(), 3),
              "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
              "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"), **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class RunSummary:
    """What ``result.json`` records about how a run stopped (rank 0 writes it: :meth:`write`)."""

    run_id: str
    step: int
    samples_seen: int
    stop_reason: str
    resumed_from: Optional[int] = None
    final: Dict[str, float] = field(default_factory=dict)  # end-of-run metrics
    sample_weights: Optional[str] = None  # "ema" | "raw": what grids and scores sampled with
    rollbacks: List[Dict[str, Any]] = field(default_factory=list)
    skipped_evals: Dict[str, str] = field(default_factory=dict)  # configured but not run: why

    def as_dict(self) -> Dict[str, Any]:
        summary: Dict[str, Any] = {"run_id": self.run_id, "step": self.step, "samples_seen": self.samples_seen,
                                   "stop_reason": self.stop_reason, "resumed_from": self.resumed_from}
        if self.sample_weights is not None:
            summary["sample_weights"] = self.sample_weights
        summary.update(self.final)
        if self.skipped_evals:
            summary["skipped_evals"] = dict(self.skipped_evals)
        if self.rollbacks:
            summary["rollbacks"] = list(self.rollbacks)
        if self.stop_reason != STOP_COMPLETED:
            summary["resume_command"] = resume_command(self.run_id)
        return summary

    def write(self, info: dist.DistInfo, run_dir: Path) -> None:
        """``result.json`` and the last log line (rank 0): how the run stopped, how to continue it,
        and which configured evaluations were not run and why."""
        if not info.is_main:
            return
        summary = self.as_dict()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.stop_reason == STOP_COMPLETED:
            log.info("finished at step %d: %s", self.step, summary)
        else:
            log.warning("stopped at step %d (%s); continue with: %s", self.step, self.stop_reason,
                        summary["resume_command"])
