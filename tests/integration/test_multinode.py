"""Plain multi-node without SLURM: two torchrun agents (--nnodes 2, one process each) meet through a
c10d rendezvous on 127.0.0.1 and train launch/train.py together (gloo, ZeRO-2).

The stop signal reaches only one of the two workers (nodes receive signals at different times); both
must agree to stop at the same step, write one checkpoint and exit cleanly. A second pair of agents
resumes that checkpoint and finishes the run.
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
from tests.fixtures.torchrun import REPO_ROOT, child_env, torchrun_cmd
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MAX_STEPS = 3


def start_agents(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents as two "nodes" sharing one rendezvous endpoint on loopback."""
    log_dir.mkdir(parents=True)
    cmd = torchrun_cmd(args, nproc=1, nnodes=2, port=free_port(), extra=["--rdzv-id=multinode-test"])
    return [subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=open(log_dir / f"agent{i}.log", "w"),
                             stderr=subprocess.STDOUT) for i in range(2)]


def finish(agents: list[subprocess.Popen], log_dir: Path, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
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


def training_worker(agent_pid: int, timeout: float) -> int:
    """PID of the agent's worker once it handles SIGUSR1 (ldm_scale.preemption.install ran)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = []
        for task in Path(f"/proc/{agent_pid}/task").glob("*"):
            children += (task / "children").read_text().split() if (task / "children").exists() else []
        for pid in map(int, children):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
            if b"launch/train.py" in cmdline and catches(pid, signal.SIGUSR1):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker of agent {agent_pid} installed a SIGUSR1 handler within {timeout}s")


def test_two_nodes_on_loopback_stop_together_checkpoint_and_resume(tmp_path):
    output_dir = tmp_path / "runs"
    args = [TRAIN_SCRIPT, *tiny_overrides(write_shards(tmp_path / "data"), output_dir, MAX_STEPS),
            "run_id=multinode"]
    run_dir, ckpt_dir = output_dir / "multinode", output_dir / "checkpoints" / "multinode"

    agents = start_agents(args, tmp_path / "first")
    try:
        os.kill(training_worker(agents[1].pid, timeout=300), signal.SIGUSR1)
    finally:
        first = finish(agents, tmp_path / "first")
    stopped = json.loads((run_dir / "result.json").read_text())
    assert 1 <= stopped["step"] < MAX_STEPS, (stopped, first)
    assert (ckpt_dir / "latest").read_text().strip() == f"step_{stopped['step']}"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2, plan  # one process per agent: the world spans both "nodes"

    agents = start_agents(args, tmp_path / "second")
    second = finish(agents, tmp_path / "second")
    resumed = [log for log in second if f"(step {stopped['step']}, saved on 2 ranks, now 2)" in log]
    assert resumed, second
    done = json.loads((run_dir / "result.json").read_text())
    assert done["step"] == MAX_STEPS and done["samples_seen"] == MAX_STEPS * 4
    assert (ckpt_dir / "latest").read_text().strip() == f"step_{MAX_STEPS}"
