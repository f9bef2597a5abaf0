"""The ``key=value`` command line of the sampling and evaluation entry points.

``eval/fid.py``, ``eval/recon.py``, ``data_tools/reference_stats.py`` and ``launch/sample.py`` take
OmegaConf dotlist overrides (``n_samples=50000 extractor.name=inception``) of a typed config
dataclass. :func:`compose_config` merges them onto the schema, so a misspelt key or a wrong type fails
before any work starts, with a one-line message naming the key; :func:`config_from_argv` adds the
shell behaviour the ``eval/`` and ``data_tools/`` scripts share (``--help``, exit with the message),
and :func:`report_input_errors` the one for input the run cannot use (a missing checkpoint, a file
that is no export, an export of the wrong kind): one line on stderr, exit status 2, as
``launch/sample.py``.

A schema may define ``check()`` (cross-field validation raising ``ValueError``); it runs after the
merge. OmegaConf is imported lazily, as everywhere in the library outside ``config.py``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Mapping, Optional, Sequence, Type, TypeVar

T = TypeVar("T")

# A preset maps the merged config (e.g. a work directory it names) to its own overrides.
Preset = Callable[[Any], List[str]]


def compose_config(schema: Type[T], overrides: Sequence[str], *,
                   presets: Optional[Mapping[str, Preset]] = None) -> T:
    """``schema`` with ``key=value`` ``overrides`` applied, as a dataclass instance.

    With ``presets``, the schema's ``preset`` field names one whose overrides are applied first
    (explicit overrides still win). Raises ``ValueError`` naming the offending key (and, for an
    unknown key, the valid ones at that level) or the failed ``check()``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    overrides = list(overrides)
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value overrides, got {bad}; see --help")
    base = OmegaConf.structured(schema)
    try:
        user = OmegaConf.from_dotlist(overrides)
        merged = OmegaConf.merge(base, user)
        if presets is not None and merged.preset is not None:
            if merged.preset not in presets:
                raise ValueError(f"unknown preset {merged.preset!r}; known: {sorted(presets)}")
            merged = OmegaConf.merge(base, OmegaConf.from_dotlist(presets[merged.preset](merged)), user)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # OmegaConf's message is several lines (key, types); the first states the problem.
        message = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        if isinstance(exc, ConfigKeyError) and key is not None:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(base, parent) if parent else base
            message += f" (valid keys{' of ' + parent if parent else ''}: {', '.join(node.keys())})"
        elif key and key not in message:
            message += f" (key {key})"
        raise ValueError(message) from None
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def config_from_argv(argv: Sequence[str], schema: Type[T], *, program: str, doc: str,
                     compose: Optional[Callable[[List[str]], T]] = None) -> T:
    """The config an entry point's arguments describe (``compose``, default :func:`compose_config`).

    ``-h`` / ``--help`` prints ``doc`` and the schema's defaults and exits 0; bad arguments exit with
    ``<program>: <problem>`` on stderr (status 1), never a traceback.
    """
    if any(a in ("-h", "--help") for a in argv):
        from omegaconf import OmegaConf

        print(doc + "\nDefaults:\n" + OmegaConf.to_yaml(OmegaConf.structured(schema)))
        raise SystemExit(0)
    try:
        return compose(list(argv)) if compose is not None else compose_config(schema, argv)
    except ValueError as exc:
        raise SystemExit(f"{program}: {exc}") from None


def input_errors() -> tuple:
    """What the loading and evaluation code raises for input it cannot use: ``ValueError`` (a file
    that is no export or of the wrong kind, a bad setting), the file errors of a missing or
    unreadable path, and a storage call that failed after its retries."""
    from ldm_scale.storage import StorageError

    return ValueError, FileNotFoundError, IsADirectoryError, PermissionError, StorageError


def report_input_errors(program: str, run: Callable[[], T]) -> T:
    """``run()``; an :func:`input_errors` exception becomes ``<program>: error: <message>`` on one
    line of stderr and exit status 2 (as ``launch/sample.py``), not a traceback. Other exceptions
    are bugs and keep theirs."""
    try:
        return run()
    except input_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
