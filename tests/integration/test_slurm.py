"""launch/slurm.py against a real single-node SLURM cluster (tests/fixtures/slurm.py).

The rendered sbatch script runs one torchrun agent on the node (2 CPU processes, gloo). A short run
completes with a checkpoint and per-node logs; a running job that receives the stop signal
(``scancel --signal=USR1 --batch``, what SLURM's ``--signal=B:USR1@N`` sends before the time limit)
checkpoints, requeues itself and resumes under the same run id.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures.torchrun import REPO_ROOT, run_python

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STANDIN = str(REPO_ROOT / "tests" / "integration" / "standin_train.py")


def submit(cluster, tmp_path: Path, run_id: str, train_args: list[str]) -> tuple[int, Path]:
    """Submit through the real CLI; returns (job id, run directory)."""
    args = ["launch/slurm.py", "nodes=1", "gpus_per_node=0", "nproc_per_node=2", "cpus_per_task=2",
            f"partition={cluster.partition}", "time=00:10:00", "signal_seconds=60", f"run_id={run_id}",
            "max_restarts=0", f"train_script={STANDIN}", "check_config=false",
            f"output_dir={tmp_path / 'runs'}", *train_args]
    result = run_python(args, env=cluster.env, timeout=120).check()
    job_id = int(result.stdout.split("submitted job ")[1].split(":")[0])
    run_dir = tmp_path / "runs" / run_id
    assert (run_dir / "slurm" / "job.sbatch").exists()
    return job_id, run_dir


def wait_for_text(path_glob, needle: str, timeout: float, cluster) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in path_glob():
            text = path.read_text(errors="replace")
            if needle in text:
                return text
        time.sleep(0.5)
    found = {str(p): p.read_text(errors="replace")[-3000:] for p in path_glob()}
    raise AssertionError(f"{needle!r} did not appear within {timeout}s in {found}\n{cluster.logs()}")


def test_sbatch_job_trains_checkpoints_and_logs_per_node(slurm_cluster, tmp_path):
    job_id, run_dir = submit(slurm_cluster, tmp_path, "slurm-short",
                             ["steps=6", "step_seconds=0", "checkpoint_every=3", "run_dir=" + str(tmp_path / "ckpt")])
    info = slurm_cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=180)
    logs = run_dir / "slurm"
    batch_log = (logs / f"{job_id}.batch.log").read_text()
    node_log = (logs / f"{job_id}.0.node0.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, batch_log, node_log)
    assert "rendezvous localhost:" in batch_log and "job step ended with status 0" in batch_log
    assert "rank 0 finished step 6" in node_log and "rank 1 finished step 6" in node_log
    ckpt = tmp_path / "ckpt" / "slurm-short"
    assert (ckpt / "latest").read_text().strip() == "step_6"
    assert sorted(p.name for p in (ckpt / "step_6").iterdir()) == ["rank0.json", "rank1.json"]
    assert not list(logs.glob("preempted.*"))


def test_stop_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    job_id, run_dir = submit(slurm_cluster, tmp_path, "slurm-preempt",
                             ["steps=60", "step_seconds=0.25", "run_dir=" + str(ckpt_dir)])
    logs = run_dir / "slurm"
    slurm_cluster.wait_for_job(job_id, ("RUNNING",), timeout=60)
    wait_for_text(lambda: logs.glob(f"{job_id}.0.node0.log"), "start_step 0", 120, slurm_cluster)
    time.sleep(1.0)

    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))

    # The first instance checkpoints, writes the marker and requeues itself (Restarts=1) ...
    marker = logs / f"preempted.{job_id}.0.json"
    wait_for_text(lambda: [marker] if marker.exists() else [], '"step"', 120, slurm_cluster)
    record = json.loads(marker.read_text())
    assert record["signal"] == "SIGUSR1" and 0 < record["step"] < 60
    # SLURM holds a requeued job for ~2 minutes (BeginTime); release it now to keep the test short.
    slurm_cluster.wait_for_job(job_id, ("PENDING",), timeout=60, predicate=lambda i: i.get("Restarts") == "1")
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    # ... and the requeued instance resumes from that step under the same run id, then completes.
    info = slurm_cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=240,
                                      predicate=lambda i: i.get("Restarts") == "1")
    batch_log = (logs / f"{job_id}.batch.log").read_text()
    first = (logs / f"{job_id}.0.node0.log").read_text()
    second = (logs / f"{job_id}.1.node0.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, batch_log, second)
    assert "USR1 received" in batch_log and f"requeueing job {job_id} (run slurm-preempt)" in batch_log
    assert batch_log.count("run slurm-preempt") >= 2  # both instances announce the same run id
    assert f"rank 0 preempted by SIGUSR1 at step {record['step']}" in first
    assert f"rank 1 preempted by SIGUSR1 at step {record['step']}" in first
    assert f"start_step {record['step']}" in second and "rank 0 finished step 60" in second
    assert (ckpt_dir / "slurm-preempt" / "latest").read_text().strip() == "step_60"
