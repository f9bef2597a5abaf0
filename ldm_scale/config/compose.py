"""Hydra registration and composition of the training tree, and the one-line messages of a bad
key, type or choice (shared by every command, ``ldm_scale/cli.py``)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import typing
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ldm_scale.choices import plain_choices
from ldm_scale.models.registry import AUTOENCODERS, FLAVOURS
from ldm_scale.config.schema import CONF_DIR, Config, ConfigError

def register_configs() -> None:
    """Register the schema so ``conf/config.yaml``'s first default (``schema``) types the tree, and
    the model registries as typed group options: ``model=<flavour>`` (an :class:`LDMSpec` at
    ``model.ldm``) and ``autoencoder=<name>`` (a :class:`FirstStageConfig` at ``model.autoencoder``).
    The registries stay the one place a flavour is written."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, spec in FLAVOURS.items():
        store.store(group="model", name=name, node={"ldm": copy.deepcopy(spec)}, package="model")
    for name, first_stage in AUTOENCODERS.items():
        store.store(group="autoencoder", name=name, node=copy.deepcopy(first_stage), package="model.autoencoder")


def compose(overrides: Sequence[str] = (), config_dir: Optional[Path] = None, *,
            config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (tests, tools, and the
    commands of ``ldm_scale/cli.py``).

    ``launch/train.py`` goes through ``@hydra.main`` instead; both paths give the same tree.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str((config_dir or CONF_DIR).resolve()), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def to_object(cfg: DictConfig, schema: type = None) -> Any:  # type: ignore[assignment]
    """The composed tree as typed dataclasses (``schema``, default :class:`Config`); unset required
    values (``???``) and keys the schema lacks (added with ``+key=``) raise :class:`ConfigError`."""
    schema = schema or Config
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            example = (" data.urls=\"['s3://bucket/laion/{00000..41407}.tar']\" model.first_stage_ckpt=s3://bucket/ae/"
                       "kl_f8.pt checkpoint.root=s3://bucket/checkpoints") if schema is Config else ""
            raise ConfigError("required values are not set: " + ", ".join(missing) + ". Set them on the command "
                              "line" + (", e.g." + example if example else ""))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # e.g. an interpolation ${...} that names no key
        message = str(exc).strip().splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(message + (f" (key {key})" if key and key not in message else "")) from None
    if not isinstance(obj, schema):
        raise ConfigError(f"the composed config is not typed by {schema.__name__}: its conf/*.yaml must list "
                          "the schema first in its defaults")
    plain_choices(obj)  # choices as plain strings from here on (ldm_scale/choices.py says why)
    unknown = unknown_keys(obj)
    if unknown:
        raise ConfigError("; ".join(unknown))
    return obj


def _closest_key(key: str, valid: Sequence[str], prefix: str) -> str:
    """``did you mean <prefix><closest>?`` (difflib), or the valid keys at that level."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    return f"valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"


def _unknown_key_message(full_key: str, schema: type) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(schema)]
    return f"unknown config key {full_key}: {_closest_key(leaf, valid, parent + '.' if parent else '')}"


def _nodes(value: Any, path: str = ""):
    """``(path, value)`` of ``value`` and everything under it: dataclass fields, dict keys, list items."""
    yield path, value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _nodes(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nodes(v, f"{path}[{i}]")


def unknown_keys(cfg: Any) -> List[str]:
    """One message per attribute of the dataclass tree ``cfg`` that its schema does not declare.

    Struct mode rejects a misspelt ``key=value`` at compose time, but Hydra applies ``+key=`` and
    ``++key=`` inside ``open_dict`` (struct lifted), and ``OmegaConf.to_object`` then sets a key the
    dataclass lacks as a plain attribute that nothing reads: ``+train.max_step=10`` (Hydra's own hint
    after the typo) would be accepted and ignored.
    """
    problems = []
    for path, node in _nodes(cfg):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            declared = {f.name for f in dataclasses.fields(node)}
            for extra in (k for k in vars(node) if k not in declared):
                problems.append(_unknown_key_message(f"{path}.{extra}" if path else extra, type(node)))
    return problems


def choice_problems(cfg: Any) -> List[str]:
    """One message per choice field (typed by an :class:`~enum.Enum`) of the dataclass tree ``cfg``
    whose value is not one of its members.

    Composition already refuses such a value (OmegaConf checks enum fields); this catches a config
    built or changed in code (tests, tools), which no compose step checked, in one place for every
    choice rather than a hand-written list per field."""
    problems = []
    for path, node in _nodes(cfg):
        if not (dataclasses.is_dataclass(node) and not isinstance(node, type)):
            continue
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            kind, value = hints.get(f.name), getattr(node, f.name)
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and value not in set(kind):
                valid = [m.value for m in kind]
                problems.append(f"{path + '.' if path else ''}{f.name}={value!r}: expected one of {valid}")
    return problems


def describe_composition_error(exc: BaseException) -> str:
    """One line for a Hydra composition error (a typo in an override or an experiment file, a wrong
    type, a missing config group option): the problem, the full key, and the closest valid key."""
    # Hydra raises from (overrides) or while handling (config files) OmegaConf's error.
    inner = exc.__cause__ or exc.__context__
    cause = inner if isinstance(inner, OmegaConfBaseException) else exc
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key and dataclasses.is_dataclass(schema):
        where = str(exc).split(":", 1)[0] + ": " if str(exc).startswith("In '") else ""  # In 'experiment/x'
        return where + _unknown_key_message(key, schema)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key and key not in message:
        message += f" (key {key})"
    options = getattr(exc, "options", None)  # MissingConfigException: the group's options
    missing = getattr(exc, "missing_cfg_file", None)
    if options and missing:
        message += f": {_closest_key(Path(missing).name, list(options), '')}"
    return message
