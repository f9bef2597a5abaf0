"""launch/slurm.py against a real single-node SLURM cluster (tests/fixtures/slurm.py).

The CLI validates the training config, renders the sbatch script and submits it; the job runs one
torchrun agent per node (two nodes on this host, one process each, gloo, ZeRO-2; one node with two
processes when the fixture can only make one) training the tiny quickstart model, with the c10d
rendezvous on the first node's name.
Once training has started, the stop signal is sent the way SLURM's ``--signal=B:USR1@N`` sends it
before the time limit (to the batch shell: ``scancel --signal=USR1 --batch``). The job must write a
checkpoint, requeue itself, resume under the same run id from that checkpoint and complete, leaving
its logs per node and per instance in the run directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures.torchrun import run_python
from tests.integration.tiny_training import events, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MAX_STEPS = 3
RUN_ID = "slurm-quickstart"


def wait_for(path: Path, timeout: float, cluster, job_id: int) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            logs = {p.name: p.read_text(errors="replace")[-4000:] for p in path.parent.parent.glob("**/*.log")}
            raise AssertionError(f"{path} did not appear within {timeout}s; job {cluster.job_info(job_id)}\n"
                                 f"{logs}\n{cluster.logs()}")
        time.sleep(0.5)


def test_quickstart_job_checkpoints_on_signal_requeues_resumes_and_completes(slurm_cluster, tmp_path):
    output_dir = tmp_path / "runs"
    overrides = tiny_overrides(write_shards(tmp_path / "data"), output_dir, MAX_STEPS)
    nodes = len(slurm_cluster.nodes)
    submitted = run_python(
        ["launch/slurm.py", f"nodes={nodes}", "gpus_per_node=0", f"nproc_per_node={2 // nodes}", "cpus_per_task=2",
         f"partition={slurm_cluster.partition}", "time=00:15:00", "signal_seconds=120", "max_restarts=0",
         f"run_id={RUN_ID}", *overrides],
        env=slurm_cluster.env, timeout=300).check()
    job_id = int(submitted.stdout.split("submitted job ")[1].split(":")[0])
    run_dir, logs = output_dir / RUN_ID, output_dir / RUN_ID / "slurm"
    assert (logs / "job.sbatch").read_text().startswith("#!/bin/bash")

    # Rank 0 writes config.yaml after installing the stop handler: training has started.
    wait_for(run_dir / "config.yaml", 300, slurm_cluster, job_id)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))

    marker = logs / f"preempted.{job_id}.0.json"
    wait_for(marker, 300, slurm_cluster, job_id)
    record = json.loads(marker.read_text())
    assert record["signal"] == "SIGUSR1" and 1 <= record["step"] < MAX_STEPS, record
    stopped_at = record["step"]

    # The batch script requeued the job; it restarts after cred_expire (10 s in the fixture's cluster).
    info = slurm_cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400,
                                      predicate=lambda i: i.get("Restarts") == "1")

    batch_log = (logs / f"{job_id}.batch.log").read_text()
    second = "".join((logs / f"{job_id}.1.node{n}.log").read_text() for n in range(nodes))  # one per node and instance
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, batch_log, second[-4000:])
    # What the batch script did, from its event log (data, not log wording): instance 0 started with
    # the rendezvous on the first node, got the signal, saw its job step end cleanly and requeued
    # because the stop checkpoint was written; instance 1 started once and ended cleanly.
    job_events = [json.loads(line) for line in (logs / "job_events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["restart"]) for e in job_events] == [
        ("start", 0), ("signal", 0), ("step_end", 0), ("requeue", 0), ("start", 1), ("step_end", 1)], job_events
    assert {e["job_id"] for e in job_events} == {job_id}
    assert all(e["rendezvous"].startswith(f"{slurm_cluster.nodes[0]}:") for e in job_events if e["event"] == "start")
    assert [e["status"] for e in job_events if e["event"] == "step_end"] == [0, 0]
    assert next(e for e in job_events if e["event"] == "requeue")["reason"] == "checkpointed"
    # The stop checkpoint: the marker is written only once it is durable on every rank, and names it.
    assert record["checkpoint"].endswith(f"step_{stopped_at}"), record
    # Instance 1: same run id, resumed from that checkpoint on 2 ranks, finished without a marker.
    # The run's event log holds exactly one resume: the requeued instance's, from the stop checkpoint.
    resumes = [e for e in events(run_dir) if e["event"] == "resume"]
    assert [(e["step"], e["saved_world_size"], e["world_size"], e["slurm_restart"]) for e in resumes] == [
        (stopped_at, 2, 2, "1")], resumes
    assert not (logs / f"preempted.{job_id}.1.json").exists()
    ckpt = output_dir / "checkpoints" / RUN_ID
    assert (ckpt / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["run_id"] == RUN_ID and result["step"] == MAX_STEPS
    assert result["resumed_from"] == stopped_at and result["stop_reason"] == "completed"
