"""fsspec filesystems per scheme (s3fs / gcsfs with their own retry loops off) and the one retry loop."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, Optional, TypeVar

import fsspec

from ldm_scale.storage.config import StorageConfig, _effective
from ldm_scale.storage.redaction import redact
from ldm_scale.storage.urls import describe_endpoint, endpoint_of, is_local, local_path, protocol

log = logging.getLogger(__name__)
T = TypeVar("T")



class StorageError(OSError):
    """A storage call failed after its retries; the message names the (redacted) URL."""


def _s3_options(cfg: StorageConfig) -> dict:
    endpoint, _ = endpoint_of("s3://", cfg)
    # botocore's own retry loop would multiply ours; one attempt per call, bounded timeouts.
    config_kwargs = {
        "connect_timeout": cfg.connect_timeout_s,
        "read_timeout": cfg.timeout_s,
        "retries": {"max_attempts": 1, "mode": "standard"},
    }
    opts: dict = {"anon": cfg.anon, "config_kwargs": config_kwargs}
    if endpoint:
        opts["endpoint_url"] = endpoint
    if cfg.profile:
        opts["profile"] = cfg.profile
    if cfg.region:
        opts["client_kwargs"] = {"region_name": cfg.region}
    return opts


def _fs_options(proto: str, cfg: StorageConfig) -> dict:
    if proto == "s3":
        return _s3_options(cfg)
    if proto in ("http", "https"):
        import aiohttp  # fsspec's http implementation depends on it

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                                                   sock_read=cfg.timeout_s)}}
    if proto == "gs":
        return _gs_options(cfg)
    return {}


def _gs_options(cfg: StorageConfig) -> dict:
    import aiohttp  # gcsfs's transport

    opts: dict = {"session_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                                                      sock_read=cfg.timeout_s)}}
    endpoint, _ = endpoint_of("gs://", cfg)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if cfg.anon:
        opts["token"] = "anon"
    return opts


_GCS_CLASS = None


def _gcs_class():
    """gcsfs's JSON-API filesystem with its retry decorators unwrapped (see the module docstring):
    ``with_retries`` and the resumable reader do the retrying, as configured."""
    global _GCS_CLASS
    if _GCS_CLASS is None:
        from gcsfs.core import GCSFileSystem

        unwrapped = {name: getattr(GCSFileSystem, name).__wrapped__
                     for name in ("_request", "_get_file_request", "_get_file_concurrent")
                     if hasattr(getattr(GCSFileSystem, name, None), "__wrapped__")}
        _GCS_CLASS = type("SingleTryGCSFileSystem", (GCSFileSystem,), {"__module__": __name__, **unwrapped})
    return _GCS_CLASS


def __getattr__(name: str):
    # Lets pickle find the lazily built class by name (gcsfs is imported only when gs:// is used).
    if name == "SingleTryGCSFileSystem":
        return _gcs_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def filesystem(url: str, cfg: Optional[StorageConfig] = None) -> "fsspec.AbstractFileSystem":
    """The fsspec filesystem for ``url``'s scheme, built in (and cached for) the calling process."""
    cfg = _effective(cfg)
    proto = protocol(url)
    try:
        opts = _fs_options(proto, cfg)
        fs = _gcs_class()(**opts) if proto == "gs" else fsspec.filesystem(proto, **opts)
    except ImportError as e:
        extra = {"gs": "gcsfs", "s3": "s3fs", "http": "aiohttp", "https": "aiohttp"}.get(proto, proto)
        raise StorageError(f"no filesystem for {proto}:// URLs ({e}); install `{extra}`") from e
    except ValueError as e:
        raise StorageError(f"unsupported URL scheme {proto}:// in {redact(url)}: {e}") from e
    if proto == "s3":
        fs.retries = 1  # s3fs's internal loop: one try, ours does the retrying
    return fs


def _fs_path(url: str) -> str:
    return local_path(url) if is_local(url) else url


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, ValueError, TypeError, StorageError)):
        return True
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return True
    msg = str(exc)
    return any(s in msg for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                  "NoSuchBucket", "NoSuchKey", " 404", "403 Forbidden"))


def _sleep_for(attempt: int, cfg: StorageConfig) -> float:
    base = min(cfg.max_backoff_s, cfg.backoff_s * (2 ** attempt))
    return base * random.uniform(0.75, 1.25)


def _endpoint_hint(url: str, cfg: StorageConfig) -> str:
    where = describe_endpoint(url, cfg)
    return f" [{where}]" if where else ""


def with_retries(fn: Callable[[], T], what: str, url: str, cfg: Optional[StorageConfig] = None) -> T:
    """Call ``fn`` with the configured retries; a final failure raises :class:`StorageError`
    naming ``what``, the redacted URL and, for object stores, the endpoint with the config key or
    environment variable that set it (the original exception is chained)."""
    cfg = _effective(cfg)
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc):
                if isinstance(exc, FileNotFoundError):
                    raise FileNotFoundError(f"{what}: not found: {redact(url)}") from exc
                if isinstance(exc, StorageError):
                    raise
                if isinstance(exc, (ValueError, TypeError)):
                    raise
                raise StorageError(f"{what} failed for {redact(url)}{_endpoint_hint(url, cfg)}: {redact(exc)}") from exc
            if attempt >= cfg.retries:
                endpoint, origin = endpoint_of(url, cfg)
                setting = f" ({origin}={redact(endpoint)})" if endpoint else ""
                raise StorageError(
                    f"{what} failed for {redact(url)}{_endpoint_hint(url, cfg)} after {attempt + 1} attempt(s) "
                    f"({cfg.key('retries')}={cfg.retries}): {type(exc).__name__}: {redact(exc)}. "
                    f"Check that the endpoint is reachable{setting} and the credentials in the environment."
                ) from exc
            delay = _sleep_for(attempt, cfg)
            log.warning("%s failed for %s (%s: %s); retry %d/%d in %.2fs", what, redact(url),
                        type(exc).__name__, redact(exc), attempt + 1, cfg.retries, delay)
            time.sleep(delay)
            attempt += 1
