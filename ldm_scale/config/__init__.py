"""The training configuration: typed Hydra schemas, composition, and one ``validate()``.

Every component owns its dataclass next to its code; this module composes them into
:class:`Config`, registers it in Hydra's ConfigStore as ``schema`` (``conf/config.yaml`` lists it
first in its defaults), so an unknown key or a wrong type fails at compose time; a key added with
``+key=`` / ``++key=`` (which Hydra lets past the schema) fails in :func:`to_object`
(:func:`unknown_keys`), with the closest valid key.

:func:`validate` is the single place for derived arithmetic and cross-field checks (global batch =
micro-batch x accumulation x world, image/latent sizes, conditioning vs model, required URLs,
finite numbers), and for the files the configuration names (``model.first_stage_ckpt``). It runs
before any model is built or anything is written and reports *all* problems at once, each naming
the key and the fix (one problem: one line).

Modules, by job: ``schema`` (the dataclasses), ``compose`` (ConfigStore registration, composition,
unknown-key and choice messages), ``validate`` (the derived :class:`Plan` and every check),
``record`` (run id, resolved config on disk). Callers use the names re-exported here.
"""
from __future__ import annotations

from ldm_scale.config.schema import (  # noqa: F401
    CONF_DIR,
    RUN_ID_ENV,
    ConfigError,
    Task,
    TASKS,
    ScaleFactorMode,
    LoggerBackend,
    LoggerMode,
    ModelConfig,
    TrainConfig,
    LoggerConfig,
    EvalConfig,
    Config,
)
from ldm_scale.config.compose import (  # noqa: F401
    register_configs,
    compose,
    to_object,
    unknown_keys,
    choice_problems,
    describe_composition_error,
)
from ldm_scale.config.validate import (  # noqa: F401
    Plan,
    check_autoencoder_plan,
    check_first_stage_ckpt,
    validate,
)
from ldm_scale.config.record import (  # noqa: F401
    resolve_run_id,
    resolved_dict,
    write_resolved,
)

__all__ = [
    "CONF_DIR",
    "RUN_ID_ENV",
    "ConfigError",
    "Task",
    "TASKS",
    "ScaleFactorMode",
    "LoggerBackend",
    "LoggerMode",
    "ModelConfig",
    "TrainConfig",
    "LoggerConfig",
    "EvalConfig",
    "Config",
    "register_configs",
    "compose",
    "to_object",
    "unknown_keys",
    "choice_problems",
    "describe_composition_error",
    "Plan",
    "check_autoencoder_plan",
    "check_first_stage_ckpt",
    "validate",
    "resolve_run_id",
    "resolved_dict",
    "write_resolved",
]
