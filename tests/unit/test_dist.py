"""ldm_scale.dist: topology from the environment, the world of one, and how restarted workers meet.

torchrun (c10d rendezvous) keeps one store for all rounds of a job and tells its workers only a
per-node restart count, so the workers of a restarted group must agree on fresh keys themselves
(`dist.agree_generation`). The worker-process tests stand in for torchrun: the test hosts the store
the way the node-rank-0 agent does, and starts each "node's" worker with the environment torchrun gives.
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as torch_dist

from ldm_scale import dist
from tests.fixtures.torchrun import (
    REPO_ROOT,
    child_env,
    kill_group,
    run_python,
    start_group,
)

pytestmark = pytest.mark.usefixtures("no_stray_processes")

WORKER = """
import json, sys, torch
from ldm_scale import dist
info = dist.init_distributed(init_timeout_s=float(sys.argv[1]))
total = dist.all_reduce_sum(torch.tensor([info.rank + 1.0]))
print(json.dumps({"rank": info.rank, "sum": total.item()}), flush=True)
"""


def agent_store() -> torch_dist.TCPStore:
    """A store like the one torchrun's node-rank-0 agent serves to all rounds of its workers."""
    return torch_dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=30))


def start_worker(store: torch_dist.TCPStore, rank: int, restart_count: int, init_timeout_s: float = 60):
    """One worker of a 2-rank group, environment as torchrun sets it (agent store shared)."""
    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "unit-test",
           "TORCHELASTIC_RESTART_COUNT": str(restart_count), "TORCHELASTIC_MAX_RESTARTS": "3"}
    return start_group([sys.executable, "-c", WORKER, str(init_timeout_s)], env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(workers, timeout: float = 120) -> list[dict]:
    results = []
    try:
        for proc in workers:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a worker is still waiting after {timeout} s (ranks looking for each "
                                     "other under different keys)") from None
            assert proc.returncode == 0, err[-4000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in workers:
            kill_group(proc)
    return results


def test_restarted_workers_meet_whatever_restart_count_their_agents_report():
    """The crash case: after node 0's worker dies, node 0's agent restarts with count 1, node 1's agent
    restarts its healthy worker for the membership change and keeps count 0. Keys derived from the
    count differ, so node 0's new worker waits for a peer under attempt_1 while node 1's reads the
    dead workers' addresses under attempt_0 (the hang in issue 11)."""
    store = agent_store()
    assert finish([start_worker(store, 0, 0), start_worker(store, 1, 0)]) == [
        {"rank": 0, "sum": 3.0}, {"rank": 1, "sum": 3.0}]  # round 0; its workers exit, their keys stay
    late_leader = start_worker(store, 1, restart_count=0)  # the membership-change restart, started first
    time.sleep(1.0)
    assert [r["sum"] for r in finish([start_worker(store, 0, restart_count=1), late_leader])] == [3.0, 3.0]


def test_a_round_that_never_completed_leaves_nothing_that_misleads_the_next():
    """A worker that gave up (its peer never came) leaves a ticket behind; the next round still meets,
    and the lone worker's error says what it waited for and which setting bounds the wait."""
    store = agent_store()
    lone = start_worker(store, 1, restart_count=0, init_timeout_s=3)
    _, err = lone.communicate(timeout=120)
    kill_group(lone)
    assert lone.returncode != 0
    assert "RendezvousTimeout" in err and "rank 1 of 2 waited" in err and "for rank 0 to announce" in err, err[-3000:]
    assert dist.INIT_TIMEOUT_ENV in err
    assert [r["sum"] for r in finish([start_worker(store, 1, 1), start_worker(store, 0, 2)])] == [3.0, 3.0]


def run_ranks(store, world_size: int, start_order: list[int], timeout_s: float = 20, gap_s: float = 0.0):
    """agree_generation on threads, one per rank, started in `start_order` `gap_s` apart."""
    results: dict[int, object] = {}

    def rank_fn(rank: int) -> None:
        try:
            results[rank] = dist.agree_generation(store, rank, world_size, timeout_s, poll_s=0.01)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            results[rank] = exc

    threads = []
    for rank in start_order:
        threads.append(threading.Thread(target=rank_fn, args=(rank,)))
        threads[-1].start()
        time.sleep(gap_s)
    for thread in threads:
        thread.join(timeout=timeout_s + 10)
    return [results[r] for r in range(world_size)]


@pytest.mark.parametrize("start_order", [[0, 1, 2], [2, 1, 0], [1, 0, 2]])
def test_every_round_agrees_on_a_new_generation_in_any_start_order(start_order):
    store = torch_dist.HashStore()
    seen = []
    for _ in range(3):  # three rounds in one store, as torchrun keeps it across restarts
        generations = run_ranks(store, 3, start_order, gap_s=0.05)
        assert len(set(generations)) == 1 and isinstance(generations[0], int), generations
        seen.append(generations[0])
    assert len(set(seen)) == 3, seen


def test_a_dead_rank_0s_announcement_is_not_taken_for_the_current_one():
    store = torch_dist.HashStore()
    [old, _] = run_ranks(store, 2, [0, 1])  # the dead round's announcement stays in the store
    results: list[object] = []
    follower = threading.Thread(target=lambda: results.append(dist.agree_generation(store, 1, 2, 20, poll_s=0.01)))
    follower.start()
    time.sleep(0.5)
    assert not results, "rank 1 took the dead rank 0's generation"
    new = dist.agree_generation(store, 0, 2, 20, poll_s=0.01)
    follower.join(timeout=20)
    assert results == [new] and new != old


def test_rank_0_names_the_ranks_that_never_joined():
    with pytest.raises(dist.RendezvousTimeout, match=r"rank 0 of 3 waited .* for ranks \[1, 2\] to join generation"):
        dist.agree_generation(torch_dist.HashStore(), 0, 3, timeout_s=0.3, poll_s=0.01)


def test_plain_python_is_rank_0_of_a_world_of_one_that_deepspeed_accepts():
    """Without launcher variables: a real one-process group, and the variables DeepSpeed checks
    before it falls back to MPI discovery ("No module named 'mpi4py'"). The group is destroyed by
    the exit handlers init registers (a process leaving with gloo's threads up can SIGABRT)."""
    code = """
import atexit, json, os
import torch.distributed as torch_dist
from ldm_scale import dist
assert dist.get_dist_info() == dist.DistInfo()
info = dist.init_distributed()
import deepspeed.comm
deepspeed.comm.init_distributed(dist_backend="gloo")
print(json.dumps({"same_info": info == dist.get_dist_info() == dist.DistInfo(), "world": torch_dist.get_world_size(),
                  "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}))
up = torch_dist.is_initialized()
atexit._run_exitfuncs()  # what interpreter exit runs
print(json.dumps({"up_before_exit": up, "up_after_exit": torch_dist.is_initialized()}))
"""
    result = run_python(["-c", code], timeout=300).check()
    report, teardown = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert teardown == {"up_before_exit": True, "up_after_exit": False}
    assert report["same_info"] and report["world"] == 1
    env = report["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_launcher_variables_give_the_topology(monkeypatch):
    for name in (*dist.LAUNCHER_ENV, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert dist.get_dist_info() == dist.DistInfo()
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "1")
    assert dist.get_dist_info() == dist.DistInfo(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                                 node_rank=1, num_nodes=2)


def test_children_of_an_initialised_process_do_not_inherit_its_rank(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "12345")
    env = child_env()
    assert "RANK" not in env and "MASTER_PORT" not in env and env["PYTHONPATH"].startswith(str(REPO_ROOT))


def test_every_command_resolves_device_the_same_way():
    """sample.py, fid.py and recon.py take ``device=`` through dist.resolve_device."""
    assert dist.resolve_device(None) == dist.resolve_device("auto") == dist.default_device()
    assert dist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda requested but CUDA is not available: use device=cpu"):
            dist.resolve_device("cuda")
