"""Training checkpoints: save locally on every rank, upload in the background, mark `latest` last.

Layout on storage (any URL ``ldm_scale.storage`` understands: local path, ``s3://``, ``gs://``)::

    <root>/<run_id>/
        latest                       text "step_<N>": written only after every rank's upload is confirmed
        step_<N>/
            <engine name>/...        DeepSpeed's files of each engine (``engine.save_checkpoint``)
            ema_rank<R>.pt           this rank's CPU-EMA shard (``train/ema.py``)
            loader_rank<R>.pt        data-loader position (``ShardLoader.state_dict``)
            rng_rank<R>.pt           python / numpy / torch / cuda RNG states (+ named generators)
            client_state.json        step, samples seen, W&B run id, resolved config, task numbers,
                                     plus what resuming checks: world size, ZeRO stages, parameter shapes
            DONE/rank<R>.json        rank R's uploaded files and sizes
            COMPLETE                 merged manifest, written by rank 0 once all DONE files exist

The modules, by job:

- ``layout.py``: names, file ownership, retention, the config and the error type (pure);
- ``protocol.py``: what a checkpointed component implements (``Stateful`` and its kinds);
- ``states.py``: ldm_scale's components as states (engines, EMA, loader, RNG) and their order;
- ``publish.py``: upload thread, DONE -> COMPLETE -> `latest`, pruning; finding a checkpoint;
- ``manager.py``: ``CheckpointManager``, save / resume orchestration over ``states``.

Usage (``train/loop.py``)::

    states = standard_states(engines=task.engines, ema=ema, loader=loader, task=task)
    resumed = manager.resume(states) or {}
    ...
    manager.save(step, states, client_state={"step": step, ...})
"""
from ldm_scale.train.checkpoint.layout import (CKPT_FORMAT, CLIENT_STATE, COMPLETE, LATEST, STEP_PREFIX,
                                               CheckpointConfig, CheckpointError, coerce_config, file_owner,
                                               parse_step, rank_file, step_tag, steps_to_delete)
from ldm_scale.train.checkpoint.manager import CheckpointManager
from ldm_scale.train.checkpoint.protocol import (AbsentAware, ClientStateful, Described, DirectoryStateful,
                                                 Reshardable, Stateful)
from ldm_scale.train.checkpoint.publish import UPLOAD_NICENESS
from ldm_scale.train.checkpoint.states import (EmaState, EngineStates, LoaderState, RngState,
                                               consolidated_fp32_state_dict, describe_shape_mismatch,
                                               param_shapes, rng_state, set_rng_state, standard_states)

__all__ = [
    "CKPT_FORMAT", "CLIENT_STATE", "COMPLETE", "LATEST", "STEP_PREFIX", "UPLOAD_NICENESS",
    "CheckpointConfig", "CheckpointError", "CheckpointManager", "coerce_config", "file_owner", "parse_step",
    "rank_file", "step_tag", "steps_to_delete",
    "Stateful", "Reshardable", "DirectoryStateful", "ClientStateful", "Described", "AbsentAware",
    "EngineStates", "EmaState", "LoaderState", "RngState", "standard_states", "consolidated_fp32_state_dict",
    "describe_shape_mismatch", "param_shapes", "rng_state", "set_rng_state",
]
