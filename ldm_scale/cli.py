"""The command line of every entry point but training: Hydra composition of ``conf/commands/<command>.yaml``.

``eval/fid.py``, ``eval/recon.py``, ``launch/sample.py`` and ``data_tools/reference_stats.py`` each
have a primary config in ``conf/commands/`` (``fid.yaml``, ``recon.yaml``, ``sample.yaml``,
``reference_stats.yaml``) whose first default is the command's typed schema, registered here in
Hydra's ConfigStore as ``<command>_schema``; they share the groups ``sampler/``, ``extractor/``,
``metrics/`` and ``preset/``, and the types of the training config (``SamplerConfig`` is the training
run's ``eval.sampler``, ``LoggerConfig`` its ``logger``, ``StorageConfig`` its ``storage``). So a
command line is Hydra's: ``sampler=plms sampler.steps=50 metrics=full preset=quickstart``; a misspelt
key, a wrong type or a choice outside its Enum fails at compose time, with the same one-line
messages as ``launch/train.py`` (``ldm_scale.config.describe_composition_error``).

Why a sub-tree rather than ``conf/`` itself: Hydra reads an override whose key names a config
group as a group selection, so with the training tree's ``data/`` group ``data=<shard URLs>`` (the
input of ``eval/recon.py`` and ``data_tools/reference_stats.py``) is refused ("Could not override
'data'. No match in the defaults list").

Training goes through ``@hydra.main``; these commands go through Hydra's compose API, because they
are also called in-process (tests, ``launch/quickstart.py``) with an argument list, and need no
Hydra run directory or logging set-up: the tree and the override grammar are the same.

One addition to Hydra's grammar, measured on the values these commands take: Hydra parses
``prompt=a cat, a dog`` as a sweep, and rejects ``prompt=it's`` and the brace patterns of shard URLs
(``data=s3://b/{00000..00099}.tar``), three of eight typical values. An override of a field the
schema types as a string is therefore passed to Hydra quoted (:func:`quote_free_text`), so free text
and URLs reach the config verbatim, as the README's commands write them.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, List, Sequence, Type, TypeVar

T = TypeVar("T")

COMMANDS_DIR = Path(__file__).resolve().parents[1] / "conf" / "commands"


def _field_type(schema: type, dotted: str) -> Any:
    """The annotated type of ``dotted`` (``extractor.name``) in the dataclass ``schema``, or None."""
    kind: Any = schema
    for part in dotted.split("."):
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return None
        kind = hints[part]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:  # Optional[X] -> X
            kind = args[0]
    return kind


def quote_free_text(override: str, schema: type) -> str:
    """``key=value`` with ``value`` in Hydra's single quotes when ``key`` is a ``str`` field of
    ``schema`` and the value is not quoted already (see the module docstring); anything else as is."""
    key, sep, value = override.partition("=")
    if not sep or key.startswith(("+", "~")) or value[:1] in ("'", '"') or value == "null":
        return override
    if _field_type(schema, key) is not str:
        return override
    # Hydra's quoted strings: a quote is escaped as \', and only backslashes right before a quote
    # (or before the closing one) are escaped themselves.
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"{key}='{escaped}'"


def _register(name: str, schema: type) -> None:
    """``schema`` as ``<name>_schema``, the first default of ``conf/commands/<name>.yaml``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


def compose_command(name: str, schema: Type[T], overrides: Sequence[str] = ()) -> T:
    """``conf/<name>.yaml`` with ``overrides`` (Hydra syntax), typed by ``schema``; then its
    ``check()`` (cross-field validation), if it has one.

    Raises ``ValueError`` with one line naming the problem and the key (closest valid key for a
    typo, the valid names for a bad choice, the options for a bad group).
    """
    from hydra.errors import HydraException

    from ldm_scale import config as config_lib

    overrides = list(overrides)
    bad = [a for a in overrides if "=" not in a and not a.startswith("~")]
    if bad:
        raise ValueError(f"arguments must be key=value overrides, got {bad}; see --help")
    _register(name, schema)
    try:
        composed = config_lib.compose([quote_free_text(o, schema) for o in overrides], COMMANDS_DIR, config_name=name)
    except HydraException as exc:
        raise ValueError(config_lib.describe_composition_error(exc)) from None
    cfg = config_lib.to_object(composed, schema=schema)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def config_groups(name: str) -> List[str]:
    """``group: option1, option2 (default: option)`` for each config group ``conf/commands/<name>.yaml`` lists."""
    from omegaconf import OmegaConf

    lines = []
    for entry in OmegaConf.load(COMMANDS_DIR / f"{name}.yaml").get("defaults", []):
        if not isinstance(entry, dict) and not OmegaConf.is_dict(entry):
            continue
        for group, default in dict(entry).items():
            group = str(group).removeprefix("optional ").split("@")[0].lstrip("/")
            options = sorted(p.stem for p in (COMMANDS_DIR / group).glob("*.yaml"))
            if options:
                lines.append(f"  {group}: {', '.join(options)} (default: {default})")
    return lines


def help_text(name: str, schema: type, doc: str) -> str:
    """``--help``: the command's docstring, its config groups and the composed defaults."""
    from omegaconf import OmegaConf

    from ldm_scale import config as config_lib

    _register(name, schema)
    defaults = OmegaConf.to_yaml(config_lib.compose([], COMMANDS_DIR, config_name=name))
    groups = "\n".join(config_groups(name)) or "  (none)"
    return (f"{doc.rstrip()}\n\nConfig groups (select with group=option):\n{groups}\n\n"
            f"Keys and defaults (conf/commands/{name}.yaml; override with key=value):\n{defaults}")


def config_from_argv(argv: Sequence[str], name: str, schema: Type[T], *, program: str, doc: str) -> T:
    """The config an entry point's arguments describe.

    ``-h`` / ``--help`` prints :func:`help_text` and exits 0; bad arguments exit with
    ``<program>: <problem>`` on stderr and status 2 (a usage error, as ``launch/train.py``), never a
    traceback, and before any checkpoint is read or any sample generated.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(name, schema, doc))
        raise SystemExit(0)
    try:
        return compose_command(name, schema, argv)
    except ValueError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def start_command(argv: Sequence[str] | None, name: str, schema: Type[T], *, program: str, doc: str) -> T:
    """What every command does first: timestamped INFO logging, library warnings off
    (``LDM_SCALE_SHOW_LIBRARY_WARNINGS=1`` shows them), then :func:`config_from_argv` of ``argv``
    (``sys.argv[1:]`` when None)."""
    import logging

    from ldm_scale.logging import setup_console

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    setup_console()
    return config_from_argv(sys.argv[1:] if argv is None else argv, name, schema, program=program, doc=doc)


def input_errors() -> tuple:
    """What the loading and evaluation code raises for input it cannot use: ``ValueError`` (a file
    that is no export or of the wrong kind, a bad setting), the file errors of a missing or
    unreadable path, and a storage call that failed after its retries."""
    from ldm_scale.storage import StorageError

    return ValueError, FileNotFoundError, IsADirectoryError, PermissionError, StorageError


def report_input_errors(program: str, run: Callable[[], T]) -> T:
    """``run()``; an :func:`input_errors` exception becomes ``<program>: error: <message>`` on one
    line of stderr and exit status 2, not a traceback. Other exceptions are bugs and keep theirs."""
    try:
        return run()
    except input_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
