"""The ``storage`` block (:class:`StorageConfig`), the shards' overrides of it, and the process-wide default."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union





@dataclass
class StorageConfig:
    """How to reach object storage (the ``storage`` block). Never holds credentials."""

    endpoint_url: Optional[str] = None  # S3-compatible endpoint; None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    region: Optional[str] = None
    profile: Optional[str] = None  # AWS shared-config profile name (credentials stay in ~/.aws); None: AWS_PROFILE / default
    anon: bool = False  # unsigned requests (public buckets; GCS emulators)
    retries: int = 3  # extra attempts after the first failure of one call (0 = fail at once)
    backoff_s: float = 0.5  # first sleep; doubles per attempt, with +-25% jitter
    max_backoff_s: float = 20.0
    connect_timeout_s: float = 10.0  # TCP connect of one request: bounds how long an unreachable endpoint takes
    timeout_s: float = 60.0  # read timeout of one request
    gcs_endpoint_url: Optional[str] = None  # GCS JSON-API endpoint; None: STORAGE_EMULATOR_HOST / Google

    def key(self, name: str) -> str:
        """The config key that set field ``name`` (for messages): ``storage.<name>`` here."""
        return f"storage.{name}"


@dataclass
class ResolvedStorageConfig(StorageConfig):
    """A :class:`StorageConfig` that remembers which key set each field (``data.storage.retries``,
    ``--endpoint-url``, ...): made by :func:`resolve`, so that errors name the right key."""

    keys: Dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.keys.get(name, f"storage.{name}")


@dataclass
class StorageOverrides:
    """``data.storage``: per-field overrides of ``storage.*`` for the shards only; None = inherit
    (see :class:`StorageConfig` for each field's meaning)."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    profile: Optional[str] = None
    anon: Optional[bool] = None
    retries: Optional[int] = None
    backoff_s: Optional[float] = None
    max_backoff_s: Optional[float] = None
    connect_timeout_s: Optional[float] = None
    timeout_s: Optional[float] = None
    gcs_endpoint_url: Optional[str] = None


def resolve(override: Union[StorageOverrides, StorageConfig, None], base: Optional[StorageConfig] = None,
            key: str = "data.storage") -> StorageConfig:
    """The storage settings a component uses: each field of ``override`` that is set (not None),
    else ``base``'s (default: the process-wide block from :func:`configure`, i.e. ``storage.*``).
    ``key`` names ``override`` in messages. A complete :class:`StorageConfig` given in code is
    used whole. Call it in the parent process: workers receive the result, not the global."""
    if isinstance(override, StorageConfig):
        return override
    base = base if base is not None else _default_cfg
    values: Dict[str, Any] = {}
    keys: Dict[str, str] = {}
    for f in dataclasses.fields(StorageConfig):
        own = getattr(override, f.name, None)
        values[f.name] = getattr(base, f.name) if own is None else own
        keys[f.name] = base.key(f.name) if own is None else f"{key}.{f.name}"
    return ResolvedStorageConfig(**values, keys=keys)


def config_problems(block: Union[StorageConfig, StorageOverrides], key: str) -> List[str]:
    """One message per out-of-range field of a ``storage`` / ``data.storage`` block (None: unset)."""
    out = []
    for name, ok, need in (("retries", lambda v: v >= 0, ">= 0"), ("backoff_s", lambda v: v >= 0, ">= 0"),
                           ("max_backoff_s", lambda v: v >= 0, ">= 0"), ("connect_timeout_s", lambda v: v > 0, "> 0"),
                           ("timeout_s", lambda v: v > 0, "> 0")):
        value = getattr(block, name)
        if value is not None and not ok(value):
            out.append(f"{key}.{name}={value}: must be {need}")
    return out


_default_cfg = StorageConfig()
_cfg_lock = threading.Lock()


def configure(cfg: StorageConfig) -> None:
    """Set the process-wide default used when a call passes no ``cfg`` (the launcher calls this once)."""
    global _default_cfg
    with _cfg_lock:
        _default_cfg = cfg


def get_config() -> StorageConfig:
    return _default_cfg


def _effective(cfg: Union[StorageConfig, StorageOverrides, None]) -> StorageConfig:
    """What a call runs with: ``cfg``, or the process-wide block; overrides (``data.storage``
    passed as is) are resolved over that block."""
    if cfg is None:
        return _default_cfg
    return cfg if isinstance(cfg, StorageConfig) else resolve(cfg)
