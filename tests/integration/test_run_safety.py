"""Run safety through the real entry point (`torchrun launch/train.py`, tiny text-to-image LDM on CPU):
divergence through the gradients, an injected loss spike rolled back, two runs with one run id (local
disk and a real S3 server), SIGTERM, kill -9 replays and lost checkpoints."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.torchrun import kill_group, run_torchrun, start_group, torchrun_cmd
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("safety_data"))


def overrides(data_url: str, out: Path, run_id: str, max_steps: int, *extra: str, root: str | None = None) -> list:
    args = [a for a in tiny_overrides(data_url, out, max_steps) if not a.startswith(("train.log_every", "checkpoint."))]
    return [TRAIN_SCRIPT, *args, f"run_id={run_id}", "train.log_every=1", f"checkpoint.root={root or out / 'ckpt'}",
            f"checkpoint.local_dir={out}/staging", "checkpoint.export_final=false", "checkpoint.lease.settle_s=0.2",
            *extra]


def rows(out: Path, run_id: str) -> list[dict]:
    path = out / run_id / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def result(out: Path, run_id: str) -> dict:
    return json.loads((out / run_id / "result.json").read_text())


def wait_for(predicate, agent: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert agent.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def model_states(step_dir: Path) -> dict:
    return torch.load(step_dir / "model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def test_divergence_through_the_gradients_stops_the_run_without_checkpointing_it(data_url, tmp_path):
    """optim.lr=1e10: the loss stays finite while DeepSpeed skips every update for overflow."""
    out = tmp_path / "runs"
    res = run_torchrun(overrides(data_url, out, "diverge", 30, "optim.lr=1e10", "optim.warmup_steps=0",
                                 "checkpoint.every_steps=1", "train.max_consecutive_unhealthy=4"), timeout=600)
    assert res.returncode != 0
    summary = result(out, "diverge")
    assert summary["stop_reason"] == "unhealthy:grad_overflow" and "run_id=diverge" in summary["resume_command"]
    last = summary["step"]
    assert last < 30
    ckpt = out / "ckpt" / "diverge"
    assert (ckpt / "latest").read_text() == f"step_{last}"
    assert sorted(int(p.name[5:]) for p in ckpt.glob("step_*")) == list(range(max(1, last - 2), last + 1))
    assert "4 optimizer steps in a row were unhealthy" in res.stdout + res.stderr
    for name, tensor in model_states(ckpt / f"step_{last}")["module"].items():
        assert torch.isfinite(tensor.float()).all(), name
    logged = rows(out, "diverge")
    assert [r["step"] for r in logged] == list(range(1, last + 1))
    assert all(r["train/skipped_steps"] == 0 for r in logged)  # the skips all came after the last healthy step


def test_a_nonfinite_loss_is_a_skipped_step_that_stops_the_run(data_url, tmp_path):
    out = tmp_path / "runs"
    # Loss x 1e39 overflows float32 to inf from the 4th micro-batch on.
    res = run_torchrun(overrides(data_url, out, "nan", 30, "train.debug_spike.start_batch=3",
                                 "train.debug_spike.num_batches=100", "train.debug_spike.factor=1e39",
                                 "checkpoint.every_steps=0", "train.max_consecutive_unhealthy=3"), timeout=600)
    assert res.returncode != 0
    summary = result(out, "nan")
    assert summary["stop_reason"] == "unhealthy:nonfinite_loss" and summary["step"] == 3
    assert not (out / "ckpt" / "nan" / "latest").exists()  # no final checkpoint of a failed run


def test_an_injected_loss_spike_rolls_back_to_the_last_good_checkpoint_and_skips_its_data(data_url, tmp_path):
    out = tmp_path / "runs"
    # Micro-batches 6 and 7 (steps 7 and 8) carry a loss x 1000; window 3, patience 2: the rule fires
    # at step 8 and rolls back to step_6, skipping the 2 micro-batches drawn since.
    res = run_torchrun(overrides(data_url, out, "spike", 12, "train.spike.enabled=true", "train.spike.window=3",
                                 "train.spike.patience=2", "train.spike.factor=3", "train.debug_spike.start_batch=6",
                                 "train.debug_spike.num_batches=2", "train.debug_spike.factor=1000",
                                 "checkpoint.every_steps=2", "checkpoint.keep_last=5"), timeout=600).check()
    summary = result(out, "spike")
    assert summary["stop_reason"] == "completed" and summary["step"] == 12
    (event,) = summary["rollbacks"]
    assert {k: event[k] for k in ("spike_start", "spike_end", "rolled_back_to", "skipped_micro_batches")} == {
        "spike_start": 7, "spike_end": 8, "rolled_back_to": 6, "skipped_micro_batches": 2}
    assert event["loss"] > 3 * event["median"]
    assert "rolled back to step 6" in res.stdout + res.stderr
    logged = rows(out, "spike")
    assert [r["step"] for r in logged] == list(range(1, 13))  # one row per step, the spiky rows replaced
    losses = [r["train/loss"] for r in logged]
    assert max(losses) < 3 * sorted(losses)[len(losses) // 2]
    assert logged[-1]["train/rollbacks"] == 1
    # The spiky weights were never published: step_8 is a checkpoint of the replayed step 8.
    saved = json.loads((out / "ckpt" / "spike" / "step_8" / "client_state.json").read_text())
    assert saved["data_position"] == 10 and saved["spike"]["rollbacks"] == 1


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_second_run_with_the_same_run_id_is_refused_and_sigterm_stops_the_first_cleanly(
        store, data_url, tmp_path, request):
    out = tmp_path / "runs"
    root = None
    nproc = 2 if store == "local" else 1
    if store == "s3":
        server = request.getfixturevalue("s3_server")
        root = server.url("ckpt")
    first = overrides(data_url, out, "shared", 100000, "checkpoint.every_steps=0", root=root)
    with open(tmp_path / "first.log", "w") as log:
        agent = start_group(torchrun_cmd(first, nproc=nproc), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(rows(out, "shared")) >= 2, agent, "the first run logged two steps")
            config_before = (out / "shared" / "config.yaml").stat().st_mtime_ns
            second = run_torchrun(overrides(data_url, out, "shared", 5, root=root), nproc=nproc, timeout=600)
            assert agent.poll() is None, "the first run must still be alive while the second one starts"
            text = second.stdout + second.stderr
            assert second.returncode != 0
            assert "run id is in use" in text and "pid " in text and "held by a live run" in text
            assert (out / "shared" / "config.yaml").stat().st_mtime_ns == config_before  # nothing written
            # A plain `kill` of the torchrun agent: it forwards SIGTERM, the workers checkpoint and exit.
            os.kill(agent.pid, signal.SIGTERM)
            agent.wait(timeout=300)
        finally:
            kill_group(agent)
    summary = result(out, "shared")
    assert summary["stop_reason"] == "preempted:SIGTERM", (tmp_path / "first.log").read_text()[-4000:]
    stopped = summary["step"]
    assert "run_id=shared" in summary["resume_command"]
    steps = [r["step"] for r in rows(out, "shared")]
    assert steps == list(range(1, stopped + 1))  # one writer: every step exactly once
    if store == "s3":
        client = server.client()
        latest = client.get_object(Bucket=server.bucket, Key="ckpt/shared/latest")["Body"].read().decode()
        assert latest == f"step_{stopped}"
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=server.bucket, Prefix="ckpt/shared/")["Contents"]]
        assert f"ckpt/shared/step_{stopped}/COMPLETE" in keys and "ckpt/shared/LEASE" not in keys
        return
    ckpt = out / "ckpt" / "shared"
    assert (ckpt / "latest").read_text() == f"step_{stopped}" and (ckpt / f"step_{stopped}" / "COMPLETE").exists()
    assert not (ckpt / "LEASE").exists()  # released on the way out
    # The same command continues it, and the log still holds every step once.
    run_torchrun(overrides(data_url, out, "shared", stopped + 2, "checkpoint.every_steps=0"), timeout=600).check()
    assert result(out, "shared")["stop_reason"] == "completed"
    assert [r["step"] for r in rows(out, "shared")] == list(range(1, stopped + 3))


def test_a_stale_lease_is_taken_over_and_logged(data_url, tmp_path):
    out = tmp_path / "runs"
    lease = out / "ckpt" / "stale" / "LEASE"
    lease.parent.mkdir(parents=True)
    lease.write_text(json.dumps({"token": "x", "host": "gone-host", "pid": 1, "job": None,
                                 "started_at": time.time() - 7200, "renewed_at": time.time() - 3600}))
    res = run_torchrun(overrides(data_url, out, "stale", 2), nproc=1, timeout=600).check()
    assert "taking over the lease" in res.stdout + res.stderr and "gone-host" in res.stdout + res.stderr
    assert result(out, "stale")["stop_reason"] == "completed" and not lease.exists()


def test_kill9_replay_keeps_one_row_per_step_and_lost_checkpoints_are_not_silently_restarted(data_url, tmp_path):
    out = tmp_path / "runs"
    args = overrides(data_url, out, "replay", 8, "checkpoint.every_steps=3")
    with open(tmp_path / "killed.log", "w") as log:
        agent = start_group(torchrun_cmd(args, nproc=1), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(rows(out, "replay")) >= 5, agent, "step 5 was logged")
        finally:
            kill_group(agent)  # kill -9 of the agent and its worker: the lease stays behind
    assert (out / "ckpt" / "replay" / "LEASE").exists()
    assert (out / "ckpt" / "replay" / "latest").read_text() == "step_3"
    # Same host, dead pid: the lease is taken over; steps 4.. are replayed and logged once.
    run_torchrun(args, nproc=1, timeout=600).check()
    assert [r["step"] for r in rows(out, "replay")] == list(range(1, 9))

    # The store loses the run's checkpoints: resume=auto refuses instead of starting from step 0.
    shutil.rmtree(out / "ckpt" / "replay")
    config_before = (out / "replay" / "config.yaml").read_bytes()
    longer = overrides(data_url, out, "replay", 10, "checkpoint.every_steps=3")
    res = run_torchrun(longer, nproc=1, timeout=600)
    assert res.returncode != 0
    assert "records training up to step 8" in res.stdout + res.stderr and "checkpoint.resume=never" in res.stdout + res.stderr
    assert (out / "replay" / "config.yaml").read_bytes() == config_before
    assert [r["step"] for r in rows(out, "replay")] == list(range(1, 9))
    # Asked for explicitly, a fresh start rewrites the history.
    run_torchrun([*longer, "checkpoint.resume=never"], nproc=1, timeout=600).check()
    assert [r["step"] for r in rows(out, "replay")] == list(range(1, 11))
    assert all(math.isfinite(r["train/loss"]) for r in rows(out, "replay"))
