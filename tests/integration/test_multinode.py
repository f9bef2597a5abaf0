"""Plain multi-node without SLURM: two torchrun agents (--nnodes 2, one process each) meet through a
c10d rendezvous on 127.0.0.1 and train launch/train.py together (gloo, ZeRO-2).

The stop signal reaches only one of the two workers (nodes receive signals at different times); both
must agree to stop at the same step, write one checkpoint and exit cleanly. A second pair of agents
resumes that checkpoint; one of its workers is then killed (a crashed process or GPU), and torchrun
(--max-restarts 1) restarts the worker group on both "nodes", which resumes from the latest periodic
checkpoint and finishes the run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.s3 import free_port
from tests.fixtures.torchrun import kill_group, start_group, torchrun_cmd
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MAX_STEPS = 8  # leaves several steps after the checkpoint at step 2 for the kill to land in


def start_agents(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents as two "nodes" sharing one rendezvous endpoint on loopback."""
    log_dir.mkdir(parents=True)
    cmd = torchrun_cmd(args, nproc=1, nnodes=2, max_restarts=1, port=free_port(), extra=["--rdzv-id=multinode-test"])
    return [start_group(cmd, stdout=open(log_dir / f"agent{i}.log", "w"), stderr=subprocess.STDOUT)
            for i in range(2)]


def finish(agents: list[subprocess.Popen], log_dir: Path, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for agent in agents:
            kill_group(agent)  # a timed-out agent, and any worker left behind by a finished one
    logs = [(log_dir / f"agent{i}.log").read_text() for i in range(2)]
    assert [a.returncode for a in agents] == [0, 0], "\n\n".join(log[-6000:] for log in logs)
    return logs


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signum - 1)))


def training_worker(agent_pid: int, timeout: float, ready=lambda pid: True) -> int:
    """PID of the agent's launch/train.py worker once `ready(pid)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = []
        for task in Path(f"/proc/{agent_pid}/task").glob("*"):
            children += (task / "children").read_text().split() if (task / "children").exists() else []
        for pid in map(int, children):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
            if b"launch/train.py" in cmdline and ready(pid):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no ready worker under agent {agent_pid} within {timeout}s")


def wait_for_checkpoint_after(ckpt_dir: Path, step: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = ckpt_dir / "latest"
        if latest.exists() and int(latest.read_text().strip().split("_")[1]) > step:
            return int(latest.read_text().strip().split("_")[1])
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint after step {step} within {timeout}s")


def test_two_nodes_on_loopback_stop_together_resume_and_survive_a_worker_crash(tmp_path):
    output_dir = tmp_path / "runs"
    args = [TRAIN_SCRIPT, *tiny_overrides(write_shards(tmp_path / "data"), output_dir, MAX_STEPS),
            "checkpoint.every_steps=2", "run_id=multinode"]
    run_dir, ckpt_dir = output_dir / "multinode", output_dir / "checkpoints" / "multinode"

    # 1. The stop signal reaches one worker only; both stop at the same step with one checkpoint.
    agents = start_agents(args, tmp_path / "first")
    try:
        handles_usr1 = lambda pid: catches(pid, signal.SIGUSR1)  # noqa: E731 (preemption.install ran)
        os.kill(training_worker(agents[1].pid, timeout=300, ready=handles_usr1), signal.SIGUSR1)
    finally:
        first = finish(agents, tmp_path / "first")
    stopped = json.loads((run_dir / "result.json").read_text())["step"]
    assert 1 <= stopped < 2, first  # the first check after the signal; no periodic checkpoint before
    assert (ckpt_dir / "latest").read_text().strip() == f"step_{stopped}"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2, plan  # one process per agent: the world spans both "nodes"

    # 2. New agents resume; a worker dies after the next periodic checkpoint; torchrun restarts both.
    agents = start_agents(args, tmp_path / "second")
    try:
        saved = wait_for_checkpoint_after(ckpt_dir, stopped, timeout=300)
        os.kill(training_worker(agents[1].pid, timeout=30), signal.SIGKILL)
    finally:
        second = finish(agents, tmp_path / "second")
    for log in second:
        resumes = [int(line.split("(step ")[1].split(",")[0]) for line in log.splitlines() if "resuming from" in line]
        assert len(resumes) == 2 and resumes[0] == stopped and resumes[1] >= saved, log[-6000:]
    done = json.loads((run_dir / "result.json").read_text())
    assert done["step"] == MAX_STEPS and done["samples_seen"] == MAX_STEPS * 4
    assert (ckpt_dir / "latest").read_text().strip() == f"step_{MAX_STEPS}"
