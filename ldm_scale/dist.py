"""Process topology from the launcher's environment, and the few collectives the library needs.

Ranks are read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK) or, when a job is started by ``srun`` directly, from SLURM's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID). Nothing here assumes a single node.
Only torch is imported, so library code can call these helpers freely.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def get_dist_info() -> DistInfo:
    """Topology of this process; a plain `python` run is rank 0 of 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a hand-set env)
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_rank = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", default=world)
        node_rank = _env_int("GROUP_RANK", "NODE_RANK", default=rank // max(local_world, 1))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:  # srun without torchrun
        rank = int(os.environ["SLURM_PROCID"])
        world = int(os.environ["SLURM_NTASKS"])
        local_rank = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", default=world)
        node_rank = _env_int("SLURM_NODEID", default=rank // max(local_world, 1))
    else:
        return DistInfo()
    num_nodes = max(1, -(-world // max(local_world, 1)))
    return DistInfo(rank, world, local_rank, local_world, node_rank, num_nodes)


def default_device(info: DistInfo | None = None) -> torch.device:
    """The CUDA device of this local rank when CUDA exists, else CPU."""
    info = info or get_dist_info()
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(name: Optional[str], info: DistInfo | None = None) -> torch.device:
    """A command's ``device=`` setting: None or ``auto`` is :func:`default_device`; ``cuda`` on a
    machine without CUDA is refused with the fix instead of failing at the first tensor."""
    if name is None or name == "auto":
        return default_device(info)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available: use device=cpu or device=auto")
    return device


INIT_TIMEOUT_ENV = "LDM_SCALE_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 600.0  # torchrun's own rendezvous join timeout
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT")


class RendezvousTimeout(TimeoutError):
    """A rank waited longer than the init timeout for its peers to join the process group."""


def init_distributed(timeout_s: float = 1800.0, init_timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group once (NCCL on CUDA, gloo on CPU); returns the topology.

    Under a launcher the ranks meet in the store at MASTER_ADDR:MASTER_PORT, under a key prefix that
    this worker group agrees on (:func:`agree_generation`). Every wait of that rendezvous is bounded
    by ``init_timeout_s`` (default: ``$LDM_SCALE_INIT_TIMEOUT_S``, else 600 s) and fails with
    :class:`RendezvousTimeout` naming what it waited for; ``timeout_s`` bounds each collective later.

    A plain ``python`` run is rank 0 of a world of 1 with a real (one-process) group: the launcher
    variables are exported, with a free MASTER_PORT, because DeepSpeed falls back to MPI discovery
    (and fails without mpi4py) when any is missing. When the job came from srun without torchrun, the
    torch variables are exported from SLURM's so that DeepSpeed and torch see one consistent view.
    """
    info = get_dist_info()
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if torch_dist.is_initialized():
        return info
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device(info))
    timeout = datetime.timedelta(seconds=timeout_s)
    if info.world_size == 1:
        store = torch_dist.HashStore()  # no peer has to find this process: no port to bind or clash over
    else:
        store = _worker_group_store(info, _init_timeout_s(init_timeout_s), timeout)
    torch_dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=info.rank,
                                  world_size=info.world_size)
    # Why at exit, and for every entry point: a process that leaves with the group up runs gloo's
    # (or NCCL's) destructors during static teardown, where a still-joinable worker std::thread
    # calls std::terminate ("terminate called without an active exception", SIGABRT) after the run
    # finished; a CI run lost a passing test to exactly that. atexit handlers run after Python's
    # threads are joined and before that teardown; destroying the group is local (no collective),
    # so it is safe when a peer is already gone.
    atexit.register(shutdown)
    global _GROUP_WAS_UP
    _GROUP_WAS_UP = True
    return info


_GROUP_WAS_UP = False  # set by init_distributed: this process has run gloo/NCCL threads


def shutdown() -> None:
    """Destroy the default process group if it is up (idempotent; registered at exit by init)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def exit_code_of(main: Callable[[], Any]) -> int:
    """Run an entry point's ``main`` and return its exit status the way ``sys.exit`` would set it:
    a return value or ``SystemExit`` code (None: 0; an int; anything else is printed, status 1); an
    uncaught exception prints its traceback, status 1; Ctrl-C 130."""
    try:
        result = main()
    except SystemExit as exc:
        result = exc.code
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - an entry point's last resort, as the interpreter's own
        traceback.print_exc()
        return 1
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)
    return 1


def exit_process(code: int) -> NoReturn:
    """Leave an entry point with status ``code``, skipping interpreter finalisation when this
    process ran a process group.

    Why: gloo (and NCCL) keep C++ worker threads and pending work objects that hold tensors. When
    they are destroyed during interpreter finalisation or static teardown, a still-joinable
    ``std::thread`` or a GIL acquisition from a dying interpreter aborts the process ("terminate
    called without an active exception", SIGABRT) after the run has finished and written
    everything: the launcher then reports the job as failed and kills its peers. Destroying the
    group at exit (``shutdown``, registered by ``init_distributed``) made this rare but did not end
    it: a CI run lost a passing 2-rank resume test to it again, after ``finished at step 120`` and
    the run report. Libraries that keep references to groups (DeepSpeed's) keep the C++ objects
    alive past ``destroy_process_group``, so their destructors still run in finalisation. pytorch
    #179291 tried a fix inside c10d and was abandoned.

    So: every Python-level exit step runs here, in the order the interpreter would run it (the
    ``threading`` shutdown joins non-daemon threads and runs ``concurrent.futures``' joins, then
    the ``atexit`` handlers: the group's destruction, logging's flush, W&B's, multiprocessing's
    child cleanup), the standard streams are flushed, and ``os._exit`` ends the process without
    running finalisers or C++ static destructors, the one stage where the abort happens. A process
    that never initialised a group exits through ``sys.exit`` as usual.
    """
    if not _GROUP_WAS_UP:
        sys.exit(code)
    try:
        # The interpreter's own first exit step (joins non-daemon threads, runs the hooks that
        # concurrent.futures registers with threading); private, present in every CPython >= 3.9.
        threading_shutdown = getattr(threading, "_shutdown", None)
        if threading_shutdown is not None:
            threading_shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run_entry_point(main: Callable[[], Any]) -> NoReturn:
    """``raise SystemExit(main())`` for entry points that may run a process group: the status of
    :func:`exit_code_of`, left through :func:`exit_process`."""
    exit_process(exit_code_of(main))


def _init_timeout_s(explicit: float | None) -> float:
    if explicit is not None:
        return float(explicit)
    return float(os.environ.get(INIT_TIMEOUT_ENV) or DEFAULT_INIT_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_group_store(info: DistInfo, init_timeout_s: float, timeout: datetime.timedelta):
    """The launcher's store at MASTER_ADDR:MASTER_PORT, under this worker group's generation prefix.

    torchrun (c10d rendezvous, torch 2.14) hands every round of its rendezvous the same store (a
    TCPStore in the node-rank-0 agent) and torch does not prefix the workers' keys per round: without
    a prefix of our own a restarted worker reads the dead workers' gloo/NCCL addresses.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise RuntimeError(f"ldm_scale.dist: rank {info.rank} of {info.world_size} needs MASTER_ADDR and "
                           "MASTER_PORT (torchrun sets them; export them yourself under a bare srun)")
    where = f"the store at {addr}:{port}"
    if info.local_rank == 0:
        log.info("rank %d of %d: rendezvous in %s, waiting up to %.0f s (%s)", info.rank, info.world_size,
                 where, init_timeout_s, INIT_TIMEOUT_ENV)
    # torchrun's own choice: a client of the agent's store, or (store sharing off) rank 0 serves one.
    from torch.distributed.rendezvous import _create_c10d_store

    try:
        store = _create_c10d_store(addr, int(port), info.rank, info.world_size,
                                   datetime.timedelta(seconds=init_timeout_s))
        generation = agree_generation(store, info.rank, info.world_size, init_timeout_s, where=where)
    except torch_dist.DistError as exc:  # the store itself went unreachable or silent
        raise RendezvousTimeout(f"ldm_scale.dist: rank {info.rank} of {info.world_size} lost {where} within "
                                f"{init_timeout_s:.0f} s ({INIT_TIMEOUT_ENV}): {exc}") from exc
    store.set_timeout(timeout)  # later store users (new_group) keep the collective timeout
    return torch_dist.PrefixStore(f"ldm_scale/generation_{generation}", store)


def agree_generation(store, rank: int, world_size: int, timeout_s: float, *, where: str = "the store",
                     poll_s: float = 0.05) -> int:
    """A number that every rank of this worker group gets and that no earlier group in `store` got.

    torchrun does not tell its workers the rendezvous round, and ``TORCHELASTIC_RESTART_COUNT``
    counts only the local agent's failures: after one node's worker dies, that node's agent restarts
    with count 1 while an agent that restarts its healthy workers for the membership change keeps 0,
    so keys derived from the count differ between nodes (their workers then wait for each other
    until the timeout). ``TORCHELASTIC_RUN_ID`` is the same for every round. What torchrun does
    guarantee is that every worker of a round has exited before any worker of the next round starts
    (each agent stops its workers before it rejoins, and a round completes once all agents joined).

    So: every rank draws a ticket from one counter in the store. Rank 0's ticket is the generation;
    it announces it again and again, each time with a fresh ticket, until all ranks confirmed. A rank
    accepts only an announcement whose ticket is newer than its own: its writer was alive after this
    rank started, so it is this group's rank 0, not a leftover of a dead one. Each wait ends at
    ``timeout_s`` with :class:`RendezvousTimeout`.
    """
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    ticket = store.add("ldm_scale/ticket", 1)

    def give_up(waiting_for: str) -> RendezvousTimeout:
        return RendezvousTimeout(
            f"ldm_scale.dist: rank {rank} of {world_size} waited {time.monotonic() - started:.0f} s in {where} "
            f"for {waiting_for}; raise {INIT_TIMEOUT_ENV} (or init_timeout_s) if ranks start further apart")

    if rank == 0:
        generation = ticket
        joined = f"ldm_scale/generation_{generation}/joined"
        while store.add(joined, 0) < world_size - 1:
            if time.monotonic() > deadline:
                missing = [r for r in range(1, world_size)
                           if not store.check([f"ldm_scale/generation_{generation}/rank_{r}"])]
                raise give_up(f"ranks {missing} to join generation {generation}")
            store.set("ldm_scale/announce", f"{generation} {store.add('ldm_scale/ticket', 1)}")
            time.sleep(poll_s)
        store.set(f"ldm_scale/generation_{generation}/ready", "1")
        log.info("rank 0 of %d: worker group generation %d agreed in %.1f s", world_size, generation,
                 time.monotonic() - started)
        return generation

    while True:
        if store.check(["ldm_scale/announce"]):
            generation, announced_at = map(int, store.get("ldm_scale/announce").decode().split())
            if announced_at > ticket:
                break
        if time.monotonic() > deadline:
            raise give_up("rank 0 to announce this worker group's generation")
        time.sleep(poll_s)
    store.set(f"ldm_scale/generation_{generation}/rank_{rank}", "1")
    store.add(f"ldm_scale/generation_{generation}/joined", 1)
    # Why wait once more: gloo's connect would otherwise wait out the collective timeout if rank 0
    # gave up on a missing peer; after "ready" every rank is known to be alive and in this generation.
    # (A server-side wait, not polling: the key is new, and thousands of ranks may be waiting.)
    try:
        store.wait([f"ldm_scale/generation_{generation}/ready"],
                   datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
    except torch_dist.DistStoreError:
        raise give_up(f"the other ranks to join generation {generation}") from None
    return generation


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


_collective_timeout_s: list = [None]  # the timeout last set by set_collective_timeout (None: init's)


def set_collective_timeout(seconds: float) -> None:
    """From now on, a collective that does not complete within ``seconds`` fails (NCCL: the watchdog
    aborts the communicator; gloo: the call raises), on every process group of this process: the
    default one and those DeepSpeed created for its data-parallel reductions."""
    if not is_initialized():
        return
    timeout = datetime.timedelta(seconds=seconds)
    from torch.distributed import distributed_c10d

    # No public list of groups: the private world map is the only place that holds DeepSpeed's too.
    for group in list(distributed_c10d._world.pg_map):
        torch_dist.set_timeout(timeout, group=group)
    _collective_timeout_s[0] = seconds


@contextlib.contextmanager
def collective_timeout(seconds: float | None):
    """``set_collective_timeout(seconds)`` inside the block and the previous timeout after it (None:
    no change). For the slow collective phases of a run (checkpoints, sampling) once the training
    steps run under a tight timeout."""
    previous = _collective_timeout_s[0]
    if seconds is None or previous is None or seconds == previous:
        yield
        return
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        set_collective_timeout(previous)


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process); returns the tensor for chaining."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (e.g. a run id, so all ranks agree on directories)."""
    if not is_initialized():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out
