"""Process topology from the launcher's environment, and the few collectives the library needs.

Ranks are read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK) or, when a job is started by ``srun`` directly, from SLURM's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID). Nothing here assumes a single node.
Only torch is imported, so library code can call these helpers freely.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


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


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group once (NCCL on CUDA, gloo on CPU).

    Returns the topology; a single process without launcher variables stays uninitialised.
    When the job came from srun without torchrun, the torch variables are exported from SLURM's so
    that DeepSpeed and torch.distributed see one consistent view.
    """
    info = get_dist_info()
    if info.world_size == 1 and "RANK" not in os.environ:
        return info
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device(info))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _per_attempt_store(info, timeout)
        if store is None:
            torch_dist.init_process_group(backend=backend, timeout=timeout)
        else:
            torch_dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=info.rank,
                                          world_size=info.world_size)
    return info


def _per_attempt_store(info: DistInfo, timeout: datetime.timedelta):
    """torchrun's store under a prefix unique to this restart attempt, or None outside torchrun.

    torchrun keeps one store across ``--max-restarts`` restarts of the worker group and torch does
    not prefix the keys per attempt: a restarted worker can read the dead workers' gloo/NCCL
    addresses and fail with "Connection refused" (seen with torch 2.14, both rendezvous backends).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.rank,
                               info.world_size, timeout)
    return torch_dist.PrefixStore(f"ldm_scale/attempt_{attempt}", store)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


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
