"""ldm_scale's components as checkpoint states (``protocol.py``): engines, EMA, loader, RNG.

Each adapter owns what the manager must not know: how its component is saved, what resuming on
another world size means for it, and what ``client_state.json`` records to refuse a checkpoint of
another model. ``standard_states`` puts them in the order they are saved and loaded:

    engines (EngineStates) -> ema (EmaState) -> loader (LoaderState) -> task -> rng (RngState)

Engines first: an EMA that the checkpoint lacks restarts from the loaded weights. RNG last:
nothing after it may draw random numbers before the first training step. The task is a
``ClientStateful`` as it is (``client_state`` / ``load_client_state``).

DeepSpeed is reached only through ``train/engine.py`` (loading with the universal switch, the
universal conversion command, fp32 consolidation); ``save_checkpoint`` and
``zero_optimization_stage`` are methods of the engine object, called here without importing it.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ldm_scale.train import engine as ds_engine
from ldm_scale.train.checkpoint.layout import CheckpointError, torch_load
from ldm_scale.train.ema import CpuEma, assemble_full_state_dict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Engines: a directory state
# ---------------------------------------------------------------------------------------------
def param_shapes(module: nn.Module) -> Dict[str, List[int]]:
    """Parameter name -> full shape (ZeRO-3 keeps the real shape in ``ds_shape``)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def describe_shape_mismatch(saved: Mapping[str, Sequence[int]], mine: Mapping[str, Sequence[int]]) -> Optional[str]:
    """A one-line description of how two parameter-shape maps differ, or None when equal."""
    missing = [n for n in saved if n not in mine]
    extra = [n for n in mine if n not in saved]
    changed = [n for n in saved if n in mine and list(saved[n]) != list(mine[n])]
    if not (missing or extra or changed):
        return None
    parts = []
    if changed:
        n = changed[0]
        parts.append(f"{len(changed)} shapes differ (first: {n} is {list(saved[n])} in the checkpoint, "
                     f"{list(mine[n])} here)")
    if missing:
        parts.append(f"{len(missing)} checkpoint parameters missing here (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} parameters not in the checkpoint (first: {extra[0]})")
    return "; ".join(parts)


class EngineStates:
    """The task's DeepSpeed engines, ``{name: engine}``: each writes ``<step_dir>/<name>/`` with
    ``engine.save_checkpoint`` (a collective). On another world size the node leader converts each
    folder with ``ds_to_universal`` and every rank loads the universal checkpoint. Records each
    engine's ZeRO stage and parameter shapes under ``engines`` in ``client_state.json``."""

    def __init__(self, engines: Mapping[str, Any]):
        for name, engine in engines.items():
            _refuse_decoupled_engine(name, engine)
        self.engines = dict(engines)

    def save_files(self, step_dir: str, step: int) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(step_dir, tag=name, client_state={"ldm_scale_step": step})

    def load_files(self, files_dir: str, *, converted: bool) -> None:
        for name, engine in self.engines.items():
            _load_engine(engine, files_dir, name, universal=converted)

    def convert_files(self, step_dir: str, out_dir: str) -> None:
        for name in self.engines:
            _convert_to_universal(os.path.join(step_dir, name), os.path.join(out_dir, name))

    def describe(self) -> Dict[str, Any]:
        return {"engines": {name: {"zero_stage": int(engine.zero_optimization_stage()),
                                   "param_shapes": param_shapes(engine.module)}
                            for name, engine in self.engines.items()}}

    def check(self, saved: Mapping[str, Any]) -> Optional[str]:
        saved_engines = saved.get("engines", {})
        if set(saved_engines) != set(self.engines):
            return (f"holds engines {sorted(saved_engines)} but this run has {sorted(self.engines)}: it was written "
                    "by another task; resume it with the same task config or start a new run id")
        for name, engine in self.engines.items():
            diff = describe_shape_mismatch(saved_engines[name]["param_shapes"], param_shapes(engine.module))
            if diff:
                return (f"was written for a different model ({name}: {diff}). Resume it with the model config it "
                        "was trained with (saved under 'config' in client_state.json), or start a new run id / "
                        "pass checkpoint.resume=never")
        return None


def _refuse_decoupled_engine(name: str, engine: Any) -> None:
    # The decoupled engine commits files (and its own `latest`) later, inside engine.step():
    # uploading right after save_checkpoint would ship partial files.
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is not None and "Decoupled" in type(ckpt_engine).__name__:
        raise ValueError(f"engine {name!r} uses DeepSpeed's decoupled checkpoint engine, whose files are committed "
                         "after save_checkpoint returns; disable it (checkpoint.writer.decoupled=false in the "
                         "DeepSpeed config): ldm_scale already uploads in the background")


def _load_engine(engine: Any, load_dir: str, tag: str, universal: bool) -> None:
    try:
        path = ds_engine.load_engine_checkpoint(engine, load_dir, tag, universal=universal)
    except Exception as exc:  # name the checkpoint and the fix
        raise CheckpointError(f"DeepSpeed could not load engine {tag!r} from {load_dir}: {type(exc).__name__}: "
                              f"{exc}. The files are damaged or from another model/optimizer config; resume from an "
                              "earlier step_<N> or start a new run id") from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint for engine {tag!r} in {load_dir}")


def _convert_to_universal(src: str, dst: str) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` (a separate process: it forks workers)."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    proc = subprocess.run(ds_engine.universal_conversion_command(src, dst), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise CheckpointError(f"converting {src} to a universal checkpoint for the new world size failed:\n"
                              f"{proc.stderr[-3000:]}")


def consolidated_fp32_state_dict(step_dir: str, engine_name: str) -> Dict[str, torch.Tensor]:
    """Full fp32 state dict of one engine's module from a local checkpoint directory (any ZeRO
    stage, any world size; one process, no collectives)."""
    tag_dir = os.path.join(step_dir, engine_name)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir} does not exist: the checkpoint has no engine {engine_name!r}")
    if not any("zero_pp_rank_" in f for f in os.listdir(tag_dir)):  # ZeRO disabled: full module on rank 0
        state = torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "model states")["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return ds_engine.fp32_state_dict_from_zero_checkpoint(step_dir, engine_name)


# ---------------------------------------------------------------------------------------------
# Per-rank states
# ---------------------------------------------------------------------------------------------
class EmaState:
    """The CPU EMA: ``ema_rank<R>.pt`` is rank R's shard. On another world size every saved shard is
    read, reassembled and re-split; a checkpoint without an EMA restarts it from the loaded weights."""

    def __init__(self, ema: CpuEma):
        self.ema = ema

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.state_dict()  # waits for a pending asynchronous update first

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.load_state_dict(state)

    def load_resharded(self, read: Callable[[int], Any], *, saved_world: int, rank: int) -> None:
        shards = [read(r) for r in range(saved_world)]
        self.ema.load_full_state_dict(assemble_full_state_dict(shards), shards[0]["num_updates"],
                                      shards[0]["last_step"])

    def load_absent(self, step: int, source: str) -> None:
        log.warning("checkpoint %s has no EMA: the EMA restarts from the loaded weights", source)
        self.ema.reset(last_step=step)

    def describe(self) -> Dict[str, Any]:
        return {"has_ema": True, "ema_names": list(self.ema.all_names)}

    def check(self, saved: Mapping[str, Any]) -> Optional[str]:
        if saved.get("has_ema") and list(saved.get("ema_names") or []) != list(self.ema.all_names):
            return ("has an EMA of different parameters than this model; resume with the same model config or "
                    "start a new run id")
        return None


class LoaderState:
    """The data position (``ShardLoader`` or anything with ``state_dict`` / ``load_state_dict``).
    Its ``state_dict`` may be a collective. On another world size rank R loads saved rank
    ``min(R, saved_world - 1)``'s state: it records what every rank finished, and the loader
    re-splits the rest of the epoch over the new topology."""

    def __init__(self, loader: Any):
        self.loader = loader

    def state_dict(self) -> Any:
        return self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.loader.load_state_dict(state)

    def load_resharded(self, read: Callable[[int], Any], *, saved_world: int, rank: int) -> None:
        self.loader.load_state_dict(read(min(rank, saved_world - 1)))

    def describe(self) -> Dict[str, Any]:
        return {"has_loader": True}

    def check(self, saved: Mapping[str, Any]) -> Optional[str]:
        return None


def rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def set_rng_state(state: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name])


class RngState:
    """python / numpy / torch / CUDA RNG states plus named ``torch.Generator`` s. On another world
    size rank R continues saved rank ``min(R, saved_world - 1)``'s streams. A checkpoint without
    them is refused (every checkpoint this code writes has them)."""

    def __init__(self, generators: Optional[Mapping[str, torch.Generator]] = None):
        self.generators = dict(generators or {})

    def state_dict(self) -> Dict[str, Any]:
        return rng_state(self.generators)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(state, self.generators)

    def load_resharded(self, read: Callable[[int], Any], *, saved_world: int, rank: int) -> None:
        set_rng_state(read(min(rank, saved_world - 1)), self.generators)

    def load_absent(self, step: int, source: str) -> None:
        raise CheckpointError(f"checkpoint {source} has no RNG states (rng_rank<R>.pt): it is damaged; resume from "
                              "an earlier step_<N> with checkpoint.resume=<url>")


def standard_states(*, engines: Mapping[str, Any], ema: Optional[CpuEma] = None, loader: Any = None,
                    task: Any = None, generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """The training run's states in save/load order (module docstring). ``task``: a
    ``ClientStateful`` (``client_state`` / ``load_client_state``), e.g. ``LDMTask``."""
    states: Dict[str, Any] = {"engines": EngineStates(engines)}
    if ema is not None:
        states["ema"] = EmaState(ema)
    if loader is not None:
        states["loader"] = LoaderState(loader)
    if task is not None:
        states["task"] = task
    states["rng"] = RngState(generators)
    return states
