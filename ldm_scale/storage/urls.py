"""What a URL names: its scheme, local path, parent, joined children, and the endpoint that serves it."""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple


from ldm_scale.storage.config import StorageConfig, _effective
from ldm_scale.storage.redaction import redact




_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def protocol(url: str) -> str:
    """``"file"`` for local paths, else the URL scheme (``s3``, ``gs``, ``http``, ...)."""
    m = _SCHEME.match(url)
    if not m:
        return "file"
    scheme = m.group(1).lower()
    return {"s3a": "s3", "gcs": "gs", "local": "file"}.get(scheme, scheme)


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file:///x`` or ``/x``)."""
    if not is_local(url):
        raise ValueError(f"not a local path: {redact(url)}")
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join path components onto a URL or path with ``/`` (no normalisation of the scheme part)."""
    out = base
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


_S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_GCS_ENDPOINT_ENV = "STORAGE_EMULATOR_HOST"


def endpoint_of(url: str, cfg: Optional[StorageConfig] = None) -> Tuple[Optional[str], str]:
    """``(endpoint, origin)`` that calls on ``url`` go to: the endpoint (None: the provider's own)
    and what chose it, a config key (``storage.endpoint_url``, ``data.storage.endpoint_url``, ...)
    or an environment variable. ``(None, "")`` for schemes without a configurable endpoint."""
    cfg = _effective(cfg)
    proto = protocol(url)
    if proto == "s3":
        field_name, env_names, provider = "endpoint_url", _S3_ENDPOINT_ENV, "AWS"
    elif proto == "gs":
        field_name, env_names, provider = "gcs_endpoint_url", (_GCS_ENDPOINT_ENV,), "Google"
    else:
        return None, ""
    endpoint, origin = getattr(cfg, field_name), cfg.key(field_name)
    for name in env_names:
        if endpoint:
            break
        endpoint, origin = os.environ.get(name), name
    if not endpoint:
        return None, f"{provider}'s default (none of {', '.join((cfg.key(field_name),) + env_names)} is set)"
    if proto == "gs" and "://" not in endpoint:  # STORAGE_EMULATOR_HOST is often host:port
        endpoint = "http://" + endpoint
    return endpoint, origin


def describe_endpoint(url: str, cfg: Optional[StorageConfig] = None) -> str:
    """``S3 endpoint http://host:9000 (set by storage.endpoint_url)`` for messages; "" when ``url``
    has no configurable endpoint."""
    endpoint, origin = endpoint_of(url, cfg)
    if not origin:
        return ""
    kind = "S3" if protocol(url) == "s3" else "GCS"
    return f"{kind} endpoint {redact(endpoint)} (set by {origin})" if endpoint else f"{kind} endpoint: {origin}"
