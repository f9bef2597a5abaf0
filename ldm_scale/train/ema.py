"""Exponential moving average of the trained weights, kept in CPU memory and sharded over ranks.

The EMA follows CompVis ``LitEma`` (latent-diffusion ``ldm/modules/ema.py``): after the n-th
optimizer step (n = 1 for the first update)

    decay_n = min(decay, (1 + n) / (10 + n))          (warm-up; plain ``decay`` when disabled)
    ema     <- decay_n * ema + (1 - decay_n) * theta

and the EMA starts as a copy of the weights it tracks. It is updated once per *optimizer* step,
never per micro-batch: :meth:`CpuEma.update` takes the optimizer step counter and ignores repeated
calls for the same step, so a loop may call it after every micro-batch.

Where the EMA lives
-------------------
* ZeRO-3 (parameters carry ``ds_tensor``): each rank keeps the EMA of its own fp32 partition, read
  with ``engine.local_fp32_partition`` (DeepSpeed's: the optimizer's fp32 master partition, no
  gather, no bf16 rounding). Memory per rank: 4 bytes x params / world.
* Anything else (ZeRO-0/1/2, or a plain module): every rank holds the full parameters, and the EMA is
  still sharded: rank r owns a contiguous run of whole parameters holding about 1/world of the
  elements. We chose sharding over "rank 0 keeps everything" because the 1.45B model's 872M-parameter
  UNet has a 3.5 GB fp32 EMA and its update reads/writes ~10 GB of memory per step: on rank 0 alone that is
  W times the memory and CPU time of the sharded version and makes rank 0 the straggler, while the
  sharded version costs nothing extra in code (the shard format is the same as under ZeRO-3, so
  checkpoints, resharding and export share one path). Under bf16 ZeRO-1/2 the module weights are the
  bf16 copies of the fp32 masters, so the EMA averages those (their rounding error averages out
  over the EMA horizon; under ZeRO-3 the fp32 masters themselves are used).

Overlap with compute
--------------------
``update()`` enqueues non-blocking device->host copies of the current weights into a pinned staging
buffer on the EMA's own CUDA stream (ordered after the optimizer step that produced the weights;
the compute stream is not held up by them, and only the next optimizer step waits for them, through
a pre-step hook on the wrapped torch optimizer: :meth:`CpuEma.attach_to`) and hands the lerp to one
worker thread, which waits on a CUDA event for the copies and then updates the fp32 EMA with a
single ``lerp_`` over one flat buffer. On CPU the copy is a plain memcpy
(needed anyway: the next optimizer step overwrites the weights in place). The next ``update()``,
``state_dict()`` or ``close()`` first waits for the pending lerp.

Sampling with the EMA
---------------------
:meth:`CpuEma.swapped_in` loads the EMA into the live parameters for the duration of a ``with``
block and restores the trained weights afterwards (CompVis' ``ema_scope`` around ``log_images``),
so periodic sample grids and end-of-run scores show the weights that are exported.

A full EMA state dict is assembled only on request (:meth:`CpuEma.full_state_dict`, a collective of
flat fp32 tensors in bounded chunks, to the ranks that need it: all of them under ZeRO-1/2, rank 0
under ZeRO-3) or offline from the per-rank shards of a checkpoint (:func:`assemble_full_state_dict`).

Why one module of ~550 lines: :class:`CpuEma` is one object with one shard layout, and its update
(staging copies, the worker thread, the pre-step wait), its checkpoint state (save, load, re-split
to a new world size) and the swap for sampling all read and write that layout; the free functions
below it (owner split, chunk placement, assembly of a full state dict) are its format, used by the
export too. The DeepSpeed calls it needs are in ``train/engine.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as torch_dist

from ldm_scale.dist import DistInfo, get_dist_info, is_initialized
from ldm_scale.formats import EMA_SHARD_FORMAT

SHARD_FORMAT = EMA_SHARD_FORMAT  # ldm_scale/formats.py


@dataclass
class EmaConfig:
    """EMA of the trained weights, fp32 on the CPU (CompVis defaults: decay 0.9999 with warm-up)."""

    enabled: bool = True
    decay: float = 0.9999
    # CompVis warm-up min(decay, (1 + n) / (10 + n)), n = updates so far (LitEma's use_num_upates).
    use_num_updates: bool = True
    update_every: int = 1  # optimizer steps between updates (1 = CompVis)
    # Run the lerp on a worker thread (overlaps the next forward/backward); False: inline.
    async_update: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}; CompVis uses 0.9999")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {self.update_every}")


def coerce_config(cfg: Any) -> EmaConfig:
    """An :class:`EmaConfig` from ours, an equivalent dataclass or an OmegaConf node."""
    if isinstance(cfg, EmaConfig):
        return cfg
    return EmaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EmaConfig) if hasattr(cfg, f.name)})


def ema_decay(num_updates: int, decay: float, warmup: bool = True) -> float:
    """Decay used by the ``num_updates``-th update (1-based), CompVis ``LitEma.forward``."""
    if num_updates < 1:
        raise ValueError(f"num_updates counts this update and starts at 1, got {num_updates}")
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@dataclass(frozen=True)
class EmaSlice:
    """Elements ``[start, start + numel)`` of the flattened parameter ``name`` of shape ``shape``."""

    name: str
    start: int
    numel: int
    shape: tuple[int, ...]


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_id")


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    # Under ZeRO-3 `param.shape` is the empty placeholder; the real shape is `ds_shape`.
    return tuple(param.ds_shape) if _is_zero3(param) else tuple(param.shape)


def _zero3_slice(name: str, param: torch.nn.Parameter, rank: int) -> EmaSlice:
    """This rank's part of a ZeRO-3 parameter: DeepSpeed splits the flattened tensor into
    `world` equal partitions of `ds_tensor.ds_numel` elements (the last one padded)."""
    part = int(param.ds_tensor.ds_numel)
    total = int(param.ds_numel)
    start = min(rank * part, total)
    return EmaSlice(name, start, max(0, min(part, total - start)), _full_shape(param))


def whole_param_owners(numels: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each parameter: contiguous runs with ~1/world of the elements each.

    Parameter i goes to the rank whose element range contains the parameter's first element, so
    ranks own contiguous, ordered runs and a rank may own none when parameters are few and large.
    """
    total = sum(numels)
    owners, offset = [], 0
    for n in numels:
        owners.append(min(world_size - 1, offset * world_size // total) if total else 0)
        offset += n
    return owners


class CpuEma:
    """CPU-resident, rank-sharded EMA of a set of parameters (see module docstring).

    Args:
        params: the module whose trainable parameters are tracked (e.g. the engine's module), or
            ``(name, parameter)`` pairs; only parameters with ``requires_grad`` are tracked. Build
            after ``deepspeed.initialize`` so ZeRO-3 partitions and their fp32 masters exist.
        cfg: decay settings.
        dist_info: topology (default: from the environment).
        start_step: optimizer step the weights correspond to (0 for a fresh run); the first update
            happens for the next larger step.
    """

    def __init__(self, params: Union[torch.nn.Module, Iterable[tuple[str, torch.nn.Parameter]]], cfg: Any,
                 dist_info: Optional[DistInfo] = None, start_step: int = 0):
        cfg = coerce_config(cfg)
        cfg.validate()
        self.cfg = cfg
        self.dist_info = dist_info or get_dist_info()
        named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
        params = [(n, p) for n, p in named if p.requires_grad]
        if not params:
            raise ValueError("CpuEma got no trainable parameters: pass the parameters of the trained "
                             "module (e.g. engine.module.named_parameters())")
        zero3 = [_is_zero3(p) for _, p in params]
        if any(zero3) and not all(zero3):
            raise ValueError("CpuEma got a mix of ZeRO-3 partitioned and ordinary parameters; "
                             "pass the parameters of one DeepSpeed engine's module")
        self.layout = "zero3" if all(zero3) else "params"
        rank, world = self.dist_info.rank, self.dist_info.world_size

        self.slices: list[EmaSlice] = []
        self._sources: list[Callable[[], torch.Tensor]] = []
        if self.layout == "zero3":
            from ldm_scale.train.engine import local_fp32_partition

            for name, p in params:
                sl = _zero3_slice(name, p, rank)
                if sl.numel == 0:
                    continue
                self.slices.append(sl)
                self._sources.append(
                    lambda p=p, n=sl.numel: local_fp32_partition(p).detach().reshape(-1)[:n])
        else:
            owners = whole_param_owners([p.numel() for _, p in params], world)
            for (name, p), owner in zip(params, owners):
                if owner != rank:
                    continue
                self.slices.append(EmaSlice(name, 0, p.numel(), tuple(p.shape)))
                self._sources.append(lambda p=p: p.detach().reshape(-1))
        self._tracked = params
        self.all_names = [n for n, _ in params]
        # Parameter identities let an exporter name EMA entries in another module's namespace.
        self.tracked_params = [p for _, p in params]

        numel = sum(s.numel for s in self.slices)
        pin = torch.cuda.is_available() and any(p.is_cuda for _, p in params)
        self._ema = torch.zeros(numel, dtype=torch.float32)
        # Pinned staging lets the device->host copies run asynchronously with compute.
        self._staging = torch.zeros(numel, dtype=torch.float32, pin_memory=pin)
        self._staging_views = self._views(self._staging)
        # The device->host copies run on their own stream: on the compute stream they would delay
        # the next step's kernels by the whole copy (~15-20 ms per step for the 1.45B UNet at 8 GPUs).
        self._copy_stream = torch.cuda.Stream() if pin else None
        self._copied: Optional[Any] = None  # event: the last copies are done (the weights may change)
        self._pending: Optional[Future] = None
        self._lock = threading.Lock()
        self.reset(last_step=start_step)
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-ema")
                          if cfg.async_update else None)

    # -- updating -----------------------------------------------------------------------------
    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for sl in self.slices:
            views.append(flat[offset:offset + sl.numel])
            offset += sl.numel
        return views

    def _copy_sources_into_staging(self) -> Optional[Any]:
        if self._copy_stream is None:  # CPU: a plain memcpy, done when this returns
            for view, source in zip(self._staging_views, self._sources):
                view.copy_(source(), non_blocking=True)
            return None
        compute = torch.cuda.current_stream()
        self._copy_stream.wait_stream(compute)  # after the optimizer step that produced the weights
        with torch.cuda.stream(self._copy_stream):
            for view, source in zip(self._staging_views, self._sources):
                view.copy_(source(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()  # on the copy stream: the lerp thread waits for it
        self._copied = event
        return event

    def fence(self) -> None:
        """Make the compute stream wait for the last device->host copies (no host wait): call
        before anything overwrites the tracked weights, i.e. before the next optimizer step. The
        engine adapter registers it as a pre-step hook of the wrapped optimizer
        (:meth:`attach_to`); forward and backward of the next step overlap the copies."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def attach_to(self, optimizer: Any) -> None:
        """Call :meth:`fence` before every step of the torch optimizer that updates the tracked
        weights (or their fp32 masters, under ZeRO-3): ``optimizer`` is the innermost
        ``torch.optim.Optimizer`` (the engine adapter finds it)."""
        if self._copy_stream is not None:
            optimizer.register_step_pre_hook(lambda *_: self.fence())

    def update(self, optimizer_step: int) -> bool:
        """Fold the current weights into the EMA if ``optimizer_step`` advanced since the last call.

        Call after ``engine.step()`` with ``engine.global_steps``: calls for micro-batches inside a
        gradient-accumulation window see the same step and are no-ops. Returns whether it updated.
        """
        if optimizer_step <= self.last_step or optimizer_step % self.cfg.update_every:
            return False
        self.wait()  # the staging buffer is free only once the previous lerp has read it
        self.last_step = int(optimizer_step)
        self.num_updates += 1
        weight = 1.0 - ema_decay(self.num_updates, self.cfg.decay, self.cfg.use_num_updates)
        event = self._copy_sources_into_staging()
        if self._executor is None:
            self._lerp(weight, event)
        else:
            self._pending = self._executor.submit(self._lerp, weight, event)
        return True

    def _lerp(self, weight: float, event: Optional[Any]) -> None:
        if event is not None:
            event.synchronize()
        with self._lock:
            # ema + w * (theta - ema) == decay * ema + (1 - decay) * theta, one pass over memory.
            self._ema.lerp_(self._staging, weight)

    def decay_at(self, optimizer_step: int) -> float:
        """Decay of the update made at ``optimizer_step`` (n = step // update_every, for logging)."""
        n = max(1, int(optimizer_step) // self.cfg.update_every)
        return ema_decay(n, self.cfg.decay, self.cfg.use_num_updates)

    def reset(self, last_step: int) -> None:
        """Restart the EMA from the current weights (e.g. after loading a checkpoint without one)."""
        self.wait()
        self._copy_sources_into_staging()
        if self._staging.is_pinned():
            torch.cuda.synchronize()
        with self._lock:
            self._ema.copy_(self._staging)
        self.num_updates = 0
        self.last_step = int(last_step)

    def wait(self) -> None:
        """Block until the pending update (if any) has finished; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- state --------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self._ema.numel()

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's EMA slices as flat tensors keyed by parameter name (views, do not modify)."""
        self.wait()
        return {sl.name: v for sl, v in zip(self.slices, self._views(self._ema))}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: what ``ema_rank<R>.pt`` of a checkpoint holds."""
        self.wait()
        with self._lock:
            values = self._ema.clone()
        return {
            "format": SHARD_FORMAT,
            "decay": self.cfg.decay,
            "use_num_updates": self.cfg.use_num_updates,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "rank": self.dist_info.rank,
            "world_size": self.dist_info.world_size,
            "layout": self.layout,
            "names": list(self.all_names),
            "slices": [(s.name, s.start, s.numel, list(s.shape)) for s in self.slices],
            "values": values,
        }

    def _check_names(self, names: Sequence[str], source: str) -> None:
        if list(names) != list(self.all_names):
            missing = sorted(set(self.all_names) - set(names))
            extra = sorted(set(names) - set(self.all_names))
            raise ValueError(
                f"EMA in {source} tracks different parameters than this model "
                f"(missing here: {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unknown here: {extra[:3]}{'...' if len(extra) > 3 else ''}); resume with the model "
                "config that wrote the checkpoint or start a new run")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's own shard (same world size and layout as when it was saved)."""
        self.wait()
        _check_format(state)
        self._check_names(state["names"], "the checkpoint")
        mine = [(s.name, s.start, s.numel, list(s.shape)) for s in self.slices]
        saved = [(n, int(a), int(b), list(sh)) for n, a, b, sh in state["slices"]]
        if saved != mine:
            raise ValueError("EMA shard layout differs from this rank's (world size or ZeRO stage "
                             "changed): load with load_full_state_dict(assemble_full_state_dict(...))")
        with self._lock:
            self._ema.copy_(state["values"])
        self.num_updates = int(state["num_updates"])
        self.last_step = int(state["last_step"])

    def load_full_state_dict(self, full: dict[str, torch.Tensor], num_updates: int,
                             last_step: int) -> None:
        """Take this rank's slices from a full EMA state dict (resharding to a new world size)."""
        self.wait()
        self._check_names(list(full), "the checkpoint")
        with self._lock:
            for sl, view in zip(self.slices, self._views(self._ema)):
                tensor = full[sl.name]
                if tuple(tensor.shape) != sl.shape:
                    raise ValueError(f"EMA tensor {sl.name} has shape {tuple(tensor.shape)} in the "
                                     f"checkpoint but {sl.shape} in this model")
                view.copy_(tensor.reshape(-1)[sl.start:sl.start + sl.numel])
        self.num_updates = int(num_updates)
        self.last_step = int(last_step)

    def _rank_slices(self, rank: int) -> list[EmaSlice]:
        """The slices rank ``rank`` holds: the rule every rank applied to itself in ``__init__``, so
        any rank knows every other rank's layout and only the values need to travel."""
        if self.layout == "zero3":
            return [sl for sl in (_zero3_slice(n, p, rank) for n, p in self._tracked) if sl.numel > 0]
        owners = whole_param_owners([p.numel() for _, p in self._tracked], self.dist_info.world_size)
        return [EmaSlice(n, 0, p.numel(), tuple(p.shape)) for (n, p), owner in zip(self._tracked, owners)
                if owner == rank]

    def full_state_dict(self, dst: Optional[int] = 0,
                        chunk_numel: int = 1 << 26) -> Optional[dict[str, torch.Tensor]]:
        """Assemble the full fp32 EMA (a collective: every rank must call it, from the main thread).

        Returns the state dict on rank ``dst`` (on every rank when ``dst`` is None) and None elsewhere.
        The shards travel as flat fp32 tensors (``all_gather`` / ``gather``, ``chunk_numel``
        elements per call, on the device under NCCL), not as pickled objects: no serialisation, and
        a bounded device buffer whatever the model size.
        """
        self.wait()
        world, rank = self.dist_info.world_size, self.dist_info.rank
        if not is_initialized() or world == 1:
            return assemble_full_state_dict([self.state_dict()])
        layouts = [self._rank_slices(r) for r in range(world)]
        sizes = [sum(sl.numel for sl in layout) for layout in layouts]
        receive = dst is None or rank == dst
        flat = ({n: torch.empty(math.prod(_full_shape(p)), dtype=torch.float32) for n, p in self._tracked}
                if receive else {})
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch_dist.get_backend() == "nccl" else torch.device("cpu"))
        longest = max(sizes)
        for start in range(0, longest, chunk_numel):
            n = min(chunk_numel, longest - start)
            send = torch.zeros(n, dtype=torch.float32, device=device)
            with self._lock:
                mine = self._ema[start:start + n]
                send[:mine.numel()].copy_(mine)
            parts = [torch.empty_like(send) for _ in range(world)] if receive else None
            if dst is None:
                torch_dist.all_gather(parts, send)
            else:
                torch_dist.gather(send, parts, dst=dst)
            if receive:
                for r, part in enumerate(parts):
                    _place_chunk(flat, layouts[r], start, part[:max(0, min(n, sizes[r] - start))].cpu())
        if not receive:
            return None
        return {n: flat[n].view(_full_shape(p)) for n, p in self._tracked}

    @contextlib.contextmanager
    def swapped_in(self, chunk_numel: int = 1 << 26) -> Iterator[None]:
        """Run the ``with`` block with the EMA weights in the tracked parameters (a collective).

        The trained weights are restored on exit, also when the block raises, so the next optimizer
        step continues from them: under ZeRO-1/2 from a CPU copy of the module weights, under ZeRO-3
        from the fp32 master partitions, which the optimizer owns and this never touches. Cost: the
        full fp32 EMA is assembled on every rank's CPU for the block (4 bytes x tracked parameters)
        plus, outside ZeRO-3, a CPU copy of the module weights. Under ZeRO-3 parameters are gathered
        ``chunk_numel`` elements at a time (``GatheredParameters``, modified on rank 0, then
        re-partitioned by DeepSpeed), so no rank ever materialises the whole model on the device.
        """
        named = list(zip(self.all_names, self.tracked_params))
        # ZeRO-3: only rank 0 writes the gathered parameters (modifier_rank=0), so only it needs the
        # values; ZeRO-1/2: every rank holds the whole module and needs all of them.
        full = self.full_state_dict(dst=0 if self.layout == "zero3" else None)
        if self.layout == "zero3":
            self._zero3_assign(named, lambda name, p: full[name] if full is not None else None, chunk_numel)
            del full
            try:
                yield
            finally:
                # Partitions back from the optimizer's fp32 masters (what the next step starts from).
                self._zero3_restore(named, chunk_numel)
            return
        backup = {name: p.detach().to("cpu", copy=True) for name, p in named}
        with torch.no_grad():
            for name, p in named:
                p.copy_(full[name].reshape(p.shape))
        del full
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(backup[name])

    @staticmethod
    def _zero3_chunks(named: list, chunk_numel: int) -> Iterator[list]:
        chunk, size = [], 0
        for item in named:
            chunk.append(item)
            size += int(item[1].ds_numel)
            if size >= chunk_numel:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _zero3_assign(self, named: list, value: Callable[[str, torch.nn.Parameter], torch.Tensor],
                      chunk_numel: int) -> None:
        """Write ``value(name, param)`` (called on every rank, in order: it may be a collective) into
        ZeRO-3 parameters, ``chunk_numel`` gathered elements at a time."""
        from ldm_scale.train.engine import gathered_parameters

        rank0 = self.dist_info.rank == 0
        for chunk in self._zero3_chunks(named, chunk_numel):
            params = [p for _, p in chunk]
            # Rank 0 writes the gathered full tensors; on exit DeepSpeed broadcasts them and every
            # rank keeps its partition (persistent small parameters stay whole, updated too).
            with gathered_parameters(params, modifier_rank=0), torch.no_grad():
                for name, p in chunk:
                    tensor = value(name, p)
                    if rank0:
                        p.data.copy_(tensor.reshape(p.shape))

    def _zero3_restore(self, named: list, chunk_numel: int) -> None:
        from ldm_scale.train.engine import full_fp32_param

        # The optimizer's fp32 masters are the trained weights (the partitions are their casts).
        self._zero3_assign(named, lambda name, p: full_fp32_param(p), chunk_numel)


def _place_chunk(flat: dict[str, torch.Tensor], slices: Sequence[EmaSlice], chunk_start: int,
                 values: torch.Tensor) -> None:
    """Copy ``values`` (elements ``chunk_start ..`` of one rank's flat EMA, whose layout is
    ``slices``) into the full flattened tensors ``flat``."""
    offset, end = 0, chunk_start + values.numel()
    for sl in slices:
        lo, hi = max(offset, chunk_start), min(offset + sl.numel, end)
        if lo < hi:
            flat[sl.name][sl.start + lo - offset:sl.start + hi - offset] = values[lo - chunk_start:hi - chunk_start]
        offset += sl.numel
        if offset >= end:
            break


def _check_format(state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != SHARD_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not an ldm_scale EMA shard (format {found!r}, expected {SHARD_FORMAT!r})")


def assemble_full_state_dict(shards: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full fp32 EMA ``{name: tensor}`` from every rank's shard (any order); checks coverage."""
    if not shards:
        raise ValueError("no EMA shards given")
    for shard in shards:
        _check_format(shard)
    world = {int(s["world_size"]) for s in shards}
    ranks = sorted(int(s["rank"]) for s in shards)
    if len(world) != 1 or ranks != list(range(world.pop())):
        raise ValueError(f"EMA shards are incomplete or mixed: got ranks {ranks} of world sizes "
                         f"{sorted({int(s['world_size']) for s in shards})}")
    names = list(shards[0]["names"])
    shapes: dict[str, tuple[int, ...]] = {}
    flat: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {n: 0 for n in names}
    for shard in shards:
        offset = 0
        values = shard["values"]
        for name, start, numel, shape in shard["slices"]:
            shape = tuple(int(d) for d in shape)
            if name not in flat:
                shapes[name] = shape
                flat[name] = torch.empty(math.prod(shape), dtype=torch.float32)
            flat[name][start:start + numel] = values[offset:offset + numel]
            covered[name] += numel
            offset += numel
    short = [n for n in names if n not in flat or covered[n] != flat[n].numel()]
    if short:
        raise ValueError(f"EMA shards do not cover parameters {short[:3]}: a rank's ema file is "
                         "missing or from another checkpoint")
    return {name: flat[name].view(shapes[name]) for name in names}
